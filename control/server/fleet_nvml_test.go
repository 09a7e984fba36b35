//go:build cgo

package server_test

import (
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"

	"github.com/llorch/llorch/control/server/servertest"
	"github.com/llorch/llorch/edge/gpu"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// The NVML path end to end: go-nvml's DGX A100 mock behind the edge's GPU
// source, reported through the session and shown by the API.
func TestFleetNVMLMock(t *testing.T) {
	srv := servertest.Start(t, fastFleet)
	// The mock leaves utilization and temperature to the test.
	mock := dgxa100.New()
	for i, d := range mock.Devices {
		dev := d.(*dgxa100.Device)
		dev.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
			return nvml.Utilization{Gpu: uint32(10 * i)}, nvml.SUCCESS
		}
		dev.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return uint32(40 + i), nvml.SUCCESS }
	}
	e := newEdge(t, srv, "dgx", gpu.FromInterface(mock, nil), "")
	n := waitNode(t, srv, e.id, 2*testInterval+time.Second, "reporting 8 GPUs", func(n *llorchv1.Node) bool {
		return len(n.GetGpuInventory().GetGpus()) == 8
	})
	inv := n.GetGpuInventory()
	if inv.GetDriverVersion() != "550.54.15" || inv.GetCudaVersion() != "12.4" {
		t.Errorf("driver %q CUDA %q", inv.GetDriverVersion(), inv.GetCudaVersion())
	}
	for i, g := range inv.GetGpus() {
		if g.GetName() != "Mock NVIDIA A100-SXM4-40GB" || g.GetMemoryTotalBytes() != 40960<<20 || g.GetUuid() == "" || int(g.GetIndex()) != i ||
			g.GetUtilizationPercent() != uint32(10*i) || g.GetTemperatureC() != uint32(40+i) {
			t.Errorf("GPU %d = %v", i, g)
		}
	}
}
