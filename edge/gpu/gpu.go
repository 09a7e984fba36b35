// Package gpu owns the edge's GPU inventory: which GPUs the machine has and
// how full, busy and hot they are, read through NVML
// (github.com/NVIDIA/go-nvml). The agent reads it through a Source with every
// heartbeat; nothing else in the edge talks to NVML.
//
// NVML needs cgo. A build without cgo still compiles: its Source reports no
// GPUs and says why in Inventory.Unavailable. Where the driver is missing the
// edge likewise reports zero GPUs and the reason, and keeps working.
package gpu

import (
	"context"
	"time"
)

// Device is one GPU as the edge reports it. A field that could not be read
// (the error is logged) is left at its zero value.
type Device struct {
	Index              int    // NVML index, 0-based
	UUID               string // "GPU-..."; empty: unreadable
	Name               string // e.g. "NVIDIA H100 80GB HBM3"; empty: unreadable
	MemoryTotalBytes   uint64 // 0: unreadable
	MemoryUsedBytes    uint64
	UtilizationPercent uint32 // GPU (SM) utilization over NVML's last sample period
	TemperatureC       uint32 // GPU core temperature; 0: unreadable
}

// Inventory is what the edge knows about its GPUs at one moment.
type Inventory struct {
	Devices       []Device // by index; empty when Unavailable is set
	DriverVersion string   // e.g. "550.54.15"; empty: unreadable or unavailable
	CUDAVersion   string   // highest CUDA the driver supports, e.g. "12.4"; empty: unreadable or unavailable
	// Unavailable says why there are no GPUs when NVML cannot be used
	// ("NVML library not found ...", "built without cgo ..."); empty when
	// NVML works, even with zero devices.
	Unavailable string
}

// Source reads the inventory. Implementations are safe for concurrent use.
//
// Inventory never fails: when NVML cannot be used the reason lands in
// Unavailable; a device that errors is still reported with what could be
// read, and each distinct error is logged once. ctx bounds only the wait for
// a read already in progress; NVML calls themselves cannot be cancelled.
// Close releases NVML; Inventory after Close reports Unavailable.
type Source interface {
	Inventory(ctx context.Context) Inventory
	Close() error
}

// initRetryInterval is how long a Source waits after a failed NVML init
// before trying again, so a driver installed later is picked up.
const initRetryInterval = 60 * time.Second
