//go:build cgo

package gpu

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/llorch/llorch/internal/clock"
)

// defaultLibrary is the shared library nvml.New loads.
const defaultLibrary = "libnvidia-ml.so.1"

// NewNVML returns the Source backed by the machine's NVML library. It calls
// nvml.Init lazily on the first Inventory and, while that fails, again at
// most every 60 seconds, so a driver installed later is picked up; once Init
// succeeds it is not called again. Close calls nvml.Shutdown. logger nil:
// discard.
func NewNVML(logger *slog.Logger) Source {
	s := newSource(nvml.New(), logger, clock.Real{})
	s.libName = defaultLibrary
	return s
}

// FromInterface returns a Source reading lib, which may be the real library
// (nvml.New) or one of go-nvml's mocks. It behaves as NewNVML does. logger
// nil: discard.
func FromInterface(lib nvml.Interface, logger *slog.Logger) Source {
	return newSource(lib, logger, clock.Real{})
}

// source is the NVML-backed Source.
type source struct {
	lib     nvml.Interface
	libName string // for messages; empty: unknown
	log     *slog.Logger
	clock   clock.Clock

	// sem admits one caller at a time to lib and to the fields below; a
	// channel rather than a mutex so waiting honours ctx.
	sem      chan struct{}
	ready    bool      // Init succeeded and Close has not run
	closed   bool      // Close ran
	tried    bool      // Init was called at least once
	lastTry  time.Time // when Init was last called
	initFail string    // why the last Init failed
	logged   map[string]bool
}

func newSource(lib nvml.Interface, logger *slog.Logger, clk clock.Clock) *source {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &source{
		lib:    lib,
		log:    logger,
		clock:  clk,
		sem:    make(chan struct{}, 1),
		logged: make(map[string]bool),
	}
}

// Inventory implements Source.
func (s *source) Inventory(ctx context.Context) (inv Inventory) {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return Inventory{Unavailable: "GPU inventory not read: " + context.Cause(ctx).Error()}
	}
	defer func() { <-s.sem }()
	// A Go panic inside the binding (or a mock missing a function) must not
	// take the agent down with it; report it as unavailable instead.
	defer func() {
		if r := recover(); r != nil {
			inv = Inventory{Unavailable: fmt.Sprintf("GPU inventory failed: NVML call panicked: %v", r)}
			s.warnOnce(ctx, inv.Unavailable, "GPU inventory unavailable", "reason", inv.Unavailable)
		}
	}()

	if s.closed {
		return Inventory{Unavailable: "GPU inventory closed"}
	}
	if reason := s.init(ctx); reason != "" {
		return Inventory{Unavailable: reason}
	}

	n, ret := s.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		reason := "NVML device count failed: " + ret.Error()
		s.warnOnce(ctx, reason, "GPU inventory unavailable", "reason", reason)
		return Inventory{Unavailable: reason}
	}
	if v, ok := query(ctx, s, -1, "driver version", s.lib.SystemGetDriverVersion); ok {
		inv.DriverVersion = v
	}
	if v, ok := query(ctx, s, -1, "CUDA driver version", s.lib.SystemGetCudaDriverVersion); ok {
		inv.CUDAVersion = cudaVersion(v)
	}
	inv.Devices = make([]Device, 0, n)
	for i := range n {
		inv.Devices = append(inv.Devices, s.device(ctx, i))
	}
	return inv
}

// init calls Init when it has never run or last failed long enough ago, and
// returns why NVML is unusable, or "" once it works. The caller holds sem.
func (s *source) init(ctx context.Context) string {
	if s.ready {
		return ""
	}
	now := s.clock.Now()
	// A clock that went backwards counts as due.
	if since := now.Sub(s.lastTry); s.tried && since >= 0 && since < initRetryInterval {
		return s.initFail
	}
	s.tried, s.lastTry = true, now
	ret := s.lib.Init()
	if ret == nvml.SUCCESS {
		s.ready, s.initFail = true, ""
		s.log.InfoContext(ctx, "NVML initialized")
		return ""
	}
	s.initFail = s.initFailure(ret)
	s.warnOnce(ctx, s.initFail, "GPU inventory unavailable; reporting no GPUs", "reason", s.initFail, "retry_every", initRetryInterval)
	return s.initFail
}

// initFailure explains a failed Init.
func (s *source) initFailure(ret nvml.Return) string {
	if ret == nvml.ERROR_LIBRARY_NOT_FOUND {
		lib := ""
		if s.libName != "" {
			lib = " (" + s.libName + ")"
		}
		return fmt.Sprintf("NVML library not found%s: is the NVIDIA driver installed? [%s]", lib, ret.Error())
	}
	return "NVML init failed: " + ret.Error()
}

// device reads device i, leaving what cannot be read at its zero value.
func (s *source) device(ctx context.Context, i int) Device {
	d := Device{Index: i}
	h, ok := query(ctx, s, i, "handle", func() (nvml.Device, nvml.Return) { return s.lib.DeviceGetHandleByIndex(i) })
	if !ok {
		return d
	}
	if v, ok := query(ctx, s, i, "UUID", h.GetUUID); ok {
		d.UUID = v
	}
	if v, ok := query(ctx, s, i, "name", h.GetName); ok {
		d.Name = v
	}
	if v, ok := query(ctx, s, i, "memory", h.GetMemoryInfo); ok {
		d.MemoryTotalBytes, d.MemoryUsedBytes = v.Total, v.Used
	}
	if v, ok := query(ctx, s, i, "utilization", h.GetUtilizationRates); ok {
		d.UtilizationPercent = v.Gpu
	}
	temp := func() (uint32, nvml.Return) { return h.GetTemperature(nvml.TEMPERATURE_GPU) }
	if v, ok := query(ctx, s, i, "temperature", temp); ok {
		d.TemperatureC = v
	}
	return d
}

// query runs one NVML read for device index (-1: the system) and logs a
// failure once per distinct message.
func query[T any](ctx context.Context, s *source, index int, what string, read func() (T, nvml.Return)) (T, bool) {
	v, ret := read()
	if ret != nvml.SUCCESS {
		msg := fmt.Sprintf("GPU %d: %s: %s", index, what, ret.Error())
		if index < 0 {
			msg = fmt.Sprintf("system: %s: %s", what, ret.Error())
		}
		s.warnOnce(ctx, msg, "NVML query failed", "gpu_index", index, "query", what, "err", ret.Error())
		return v, false
	}
	return v, true
}

// warnOnce logs msg at warn level the first time key is seen. The caller
// holds sem. Keys are bounded: devices × queries × NVML return codes.
func (s *source) warnOnce(ctx context.Context, key, msg string, args ...any) {
	if s.logged[key] {
		return
	}
	s.logged[key] = true
	s.log.WarnContext(ctx, msg, args...)
}

// cudaVersion formats NVML's CUDA driver version (1000*major + 10*minor),
// e.g. 12040 as "12.4".
func cudaVersion(v int) string {
	return fmt.Sprintf("%d.%d", v/1000, (v%1000)/10)
}

// Close implements Source: it shuts NVML down if Init succeeded. Further
// calls do nothing.
func (s *source) Close() error {
	s.sem <- struct{}{}
	defer func() { <-s.sem }()
	if s.closed {
		return nil
	}
	s.closed = true
	if !s.ready {
		return nil
	}
	s.ready = false
	if ret := s.lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("nvml shutdown: %w", ret)
	}
	return nil
}
