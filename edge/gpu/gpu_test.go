//go:build cgo

package gpu_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"

	"github.com/llorch/llorch/edge/gpu"
	"github.com/llorch/llorch/internal/clock"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// a100Memory is what the dgxa100 mock reports per GPU: 40960 MiB.
const a100Memory = 40960 * 1024 * 1024

// newDGXA100 returns go-nvml's DGX A100 mock (8 GPUs, driver 550.54.15, CUDA
// 12040) with the readings it leaves unset filled in: GPU i is 10*i+5 %
// busy, 30+i °C, and has i GiB in use.
func newDGXA100(t testing.TB) *server.Server {
	t.Helper()
	s := dgxa100.New()
	for i := range s.Devices {
		d := mockDevice(t, s, i)
		d.MemoryInfo.Used = uint64(i) << 30
		d.MemoryInfo.Free = d.MemoryInfo.Total - d.MemoryInfo.Used
		d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
			return nvml.Utilization{Gpu: uint32(10*i + 5), Memory: 99}, nvml.SUCCESS
		}
		d.GetTemperatureFunc = func(sensor nvml.TemperatureSensors) (uint32, nvml.Return) {
			if sensor != nvml.TEMPERATURE_GPU {
				return 0, nvml.ERROR_INVALID_ARGUMENT
			}
			return uint32(30 + i), nvml.SUCCESS
		}
	}
	return s
}

func mockDevice(t testing.TB, s *server.Server, i int) *server.Device {
	t.Helper()
	d, ok := s.Devices[i].(*server.Device)
	if !ok {
		t.Fatalf("mock device %d is %T", i, s.Devices[i])
	}
	return d
}

// wantDevice is what newDGXA100's GPU i should be reported as.
func wantDevice(t testing.TB, s *server.Server, i int) gpu.Device {
	t.Helper()
	return gpu.Device{
		Index:              i,
		UUID:               mockDevice(t, s, i).UUID,
		Name:               "Mock NVIDIA A100-SXM4-40GB",
		MemoryTotalBytes:   a100Memory,
		MemoryUsedBytes:    uint64(i) << 30,
		UtilizationPercent: uint32(10*i + 5),
		TemperatureC:       uint32(30 + i),
	}
}

func newSource(t testing.TB, lib nvml.Interface, logger *slog.Logger) gpu.Source {
	t.Helper()
	src := gpu.FromInterface(lib, logger)
	t.Cleanup(func() { _ = src.Close() })
	return src
}

// logBuffer collects text logs from any goroutine.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) count(substr string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), substr)
}

func newLogger() (*slog.Logger, *logBuffer) {
	b := &logBuffer{}
	return slog.New(slog.NewTextHandler(b, nil)), b
}

func TestDGXA100(t *testing.T) {
	s := newDGXA100(t)
	inv := newSource(t, s, nil).Inventory(t.Context())

	if inv.Unavailable != "" {
		t.Fatalf("Unavailable = %q, want empty", inv.Unavailable)
	}
	if inv.DriverVersion != "550.54.15" {
		t.Errorf("DriverVersion = %q, want 550.54.15", inv.DriverVersion)
	}
	if inv.CUDAVersion != "12.4" {
		t.Errorf("CUDAVersion = %q, want 12.4", inv.CUDAVersion)
	}
	if len(inv.Devices) != 8 {
		t.Fatalf("got %d devices, want 8", len(inv.Devices))
	}
	seen := map[string]bool{}
	for i, got := range inv.Devices {
		if want := wantDevice(t, s, i); got != want {
			t.Errorf("device %d = %+v, want %+v", i, got, want)
		}
		if !strings.HasPrefix(got.UUID, "GPU-") || seen[got.UUID] {
			t.Errorf("device %d UUID %q: want a distinct GPU-... UUID", i, got.UUID)
		}
		seen[got.UUID] = true
	}
}

func TestCUDAVersion(t *testing.T) {
	tests := []struct {
		name string
		v    int
		want string
	}{
		{"12.4", 12040, "12.4"},
		{"11.8", 11080, "11.8"},
		{"12.10", 12100, "12.10"},
		{"13.0", 13000, "13.0"},
		{"odd units digit", 12025, "12.2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newDGXA100(t)
			s.SystemGetCudaDriverVersionFunc = func() (int, nvml.Return) { return tt.v, nvml.SUCCESS }
			if got := newSource(t, s, nil).Inventory(t.Context()).CUDAVersion; got != tt.want {
				t.Errorf("CUDAVersion for %d = %q, want %q", tt.v, got, tt.want)
			}
		})
	}
}

func TestInitFails(t *testing.T) {
	tests := []struct {
		ret  nvml.Return
		want []string
	}{
		{nvml.ERROR_DRIVER_NOT_LOADED, []string{"NVML init failed", nvml.ERROR_DRIVER_NOT_LOADED.Error()}},
		{nvml.ERROR_NO_PERMISSION, []string{"NVML init failed", nvml.ERROR_NO_PERMISSION.Error()}},
		{nvml.ERROR_LIBRARY_NOT_FOUND, []string{"NVML library not found", "driver installed", nvml.ERROR_LIBRARY_NOT_FOUND.Error()}},
	}
	for _, tt := range tests {
		t.Run(tt.ret.Error(), func(t *testing.T) {
			s := newDGXA100(t)
			s.InitFunc = func() nvml.Return { return tt.ret }
			logger, logs := newLogger()
			src := newSource(t, s, logger)

			for range 3 {
				inv := src.Inventory(t.Context())
				for _, w := range tt.want {
					if !strings.Contains(inv.Unavailable, w) {
						t.Errorf("Unavailable = %q, want it to contain %q", inv.Unavailable, w)
					}
				}
				if len(inv.Devices) != 0 || inv.DriverVersion != "" || inv.CUDAVersion != "" {
					t.Errorf("inventory = %+v, want only Unavailable", inv)
				}
			}
			if n := len(s.DeviceGetCountCalls()); n != 0 {
				t.Errorf("DeviceGetCount called %d times after a failed Init", n)
			}
			if n := logs.count("GPU inventory unavailable"); n != 1 {
				t.Errorf("init failure logged %d times, want once", n)
			}
			if err := src.Close(); err != nil || len(s.ShutdownCalls()) != 0 {
				t.Errorf("Close = %v with %d Shutdown calls; want nil and no Shutdown", err, len(s.ShutdownCalls()))
			}
		})
	}
}

func TestDeviceCountFails(t *testing.T) {
	s := newDGXA100(t)
	s.DeviceGetCountFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_GPU_IS_LOST }
	inv := newSource(t, s, nil).Inventory(t.Context())
	if !strings.Contains(inv.Unavailable, nvml.ERROR_GPU_IS_LOST.Error()) || len(inv.Devices) != 0 {
		t.Errorf("inventory = %+v, want no devices and Unavailable naming %s", inv, nvml.ERROR_GPU_IS_LOST)
	}
}

func TestNoDevices(t *testing.T) {
	s := dgxa100.NewWithGPUs()
	inv := newSource(t, s, nil).Inventory(t.Context())
	if inv.Unavailable != "" || len(inv.Devices) != 0 || inv.DriverVersion != "550.54.15" {
		t.Errorf("inventory = %+v, want zero devices, driver 550.54.15, Unavailable empty", inv)
	}
}

// One device failing one query is still reported, with everything else it
// could read; the other devices are untouched; each distinct error is logged
// once however many heartbeats see it.
func TestDeviceQueryFails(t *testing.T) {
	const bad = 3
	tests := []struct {
		name  string
		query string // as logged
		fails int    // queries that fail on the device
		fail  func(d *server.Device, ret nvml.Return)
		want  func(d gpu.Device) gpu.Device
	}{
		{
			name:  "temperature",
			query: "query=temperature",
			fails: 1,
			fail: func(d *server.Device, ret nvml.Return) {
				d.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 0, ret }
			},
			want: func(d gpu.Device) gpu.Device { d.TemperatureC = 0; return d },
		},
		{
			name:  "utilization",
			query: "query=utilization",
			fails: 1,
			fail: func(d *server.Device, ret nvml.Return) {
				d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{}, ret }
			},
			want: func(d gpu.Device) gpu.Device { d.UtilizationPercent = 0; return d },
		},
		{
			name:  "memory",
			query: "query=memory",
			fails: 1,
			fail: func(d *server.Device, ret nvml.Return) {
				d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) { return nvml.Memory{}, ret }
			},
			want: func(d gpu.Device) gpu.Device { d.MemoryTotalBytes, d.MemoryUsedBytes = 0, 0; return d },
		},
		{
			name:  "UUID and name",
			query: "query=UUID",
			fails: 2,
			fail: func(d *server.Device, ret nvml.Return) {
				d.GetUUIDFunc = func() (string, nvml.Return) { return "", ret }
				d.GetNameFunc = func() (string, nvml.Return) { return "", ret }
			},
			want: func(d gpu.Device) gpu.Device { d.UUID, d.Name = "", ""; return d },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newDGXA100(t)
			tt.fail(mockDevice(t, s, bad), nvml.ERROR_NOT_SUPPORTED)
			logger, logs := newLogger()
			src := newSource(t, s, logger)

			check := func() {
				t.Helper()
				inv := src.Inventory(t.Context())
				if inv.Unavailable != "" || len(inv.Devices) != 8 {
					t.Fatalf("Unavailable %q with %d devices; want 8 devices", inv.Unavailable, len(inv.Devices))
				}
				for i, got := range inv.Devices {
					want := wantDevice(t, s, i)
					if i == bad {
						want = tt.want(want)
					}
					if got != want {
						t.Errorf("device %d = %+v, want %+v", i, got, want)
					}
				}
			}
			for range 3 {
				check()
			}
			if n := logs.count(tt.query); n != 1 {
				t.Errorf("%s failure logged %d times over 3 reads, want once:\n%s", tt.name, n, logs.buf.String())
			}
			if n := logs.count(fmt.Sprintf("gpu_index=%d", bad)); n != tt.fails {
				t.Errorf("GPU %d logged %d times, want %d (once per failing query)", bad, n, tt.fails)
			}

			// A different error is news, and logged again (once).
			tt.fail(mockDevice(t, s, bad), nvml.ERROR_GPU_IS_LOST)
			check()
			check()
			if n := logs.count(tt.query); n != 2 {
				t.Errorf("after a new error, %s failures logged %d times, want 2", tt.name, n)
			}
			if n := logs.count(nvml.ERROR_GPU_IS_LOST.Error()); n == 0 {
				t.Errorf("new error %s not logged", nvml.ERROR_GPU_IS_LOST)
			}
		})
	}
}

func TestDeviceHandleFails(t *testing.T) {
	s := newDGXA100(t)
	handle := s.DeviceGetHandleByIndexFunc
	s.DeviceGetHandleByIndexFunc = func(i int) (nvml.Device, nvml.Return) {
		if i == 5 {
			return nil, nvml.ERROR_UNKNOWN
		}
		return handle(i)
	}
	inv := newSource(t, s, nil).Inventory(t.Context())
	if len(inv.Devices) != 8 {
		t.Fatalf("got %d devices, want 8", len(inv.Devices))
	}
	for i, got := range inv.Devices {
		want := wantDevice(t, s, i)
		if i == 5 {
			want = gpu.Device{Index: 5}
		}
		if got != want {
			t.Errorf("device %d = %+v, want %+v", i, got, want)
		}
	}
}

func TestSystemQueriesFail(t *testing.T) {
	s := newDGXA100(t)
	s.SystemGetDriverVersionFunc = func() (string, nvml.Return) { return "", nvml.ERROR_UNKNOWN }
	s.SystemGetCudaDriverVersionFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_FUNCTION_NOT_FOUND }
	inv := newSource(t, s, nil).Inventory(t.Context())
	if inv.Unavailable != "" || len(inv.Devices) != 8 || inv.DriverVersion != "" || inv.CUDAVersion != "" {
		t.Errorf("inventory = %+v, want 8 devices and empty versions", inv)
	}
}

// A mock missing a function panics; the source reports that instead of
// passing the panic on.
func TestPanicReported(t *testing.T) {
	s := dgxa100.New() // GetUtilizationRates and GetTemperature left nil
	inv := newSource(t, s, nil).Inventory(t.Context())
	if !strings.Contains(inv.Unavailable, "panicked") || len(inv.Devices) != 0 {
		t.Errorf("inventory = %+v, want Unavailable reporting the panic", inv)
	}
}

func TestInitRetry(t *testing.T) {
	s := newDGXA100(t)
	var mu sync.Mutex
	initRet := nvml.ERROR_DRIVER_NOT_LOADED
	s.InitFunc = func() nvml.Return {
		mu.Lock()
		defer mu.Unlock()
		return initRet
	}
	clk := clock.NewFake(t0)
	src := gpu.FromInterfaceWithClock(s, nil, clk)
	t.Cleanup(func() { _ = src.Close() })

	step := func(name string, wantInits, wantDevices int) {
		t.Helper()
		inv := src.Inventory(t.Context())
		if n := len(s.InitCalls()); n != wantInits {
			t.Errorf("%s: Init called %d times, want %d", name, n, wantInits)
		}
		if len(inv.Devices) != wantDevices || (wantDevices == 0) != (inv.Unavailable != "") {
			t.Errorf("%s: %d devices, Unavailable %q; want %d devices", name, len(inv.Devices), inv.Unavailable, wantDevices)
		}
	}

	step("first read", 1, 0)
	step("same instant", 1, 0)
	clk.Advance(gpu.InitRetryInterval - time.Second)
	step("just before the retry interval", 1, 0)
	clk.Advance(time.Second)
	step("at the retry interval, still failing", 2, 0)

	mu.Lock()
	initRet = nvml.SUCCESS
	mu.Unlock()
	clk.Advance(time.Second)
	step("driver fixed, interval not yet over", 2, 0)
	clk.Advance(gpu.InitRetryInterval)
	step("driver fixed, retried", 3, 8)
	clk.Advance(10 * gpu.InitRetryInterval)
	step("working: Init not called again", 3, 8)

	if err := src.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n := len(s.ShutdownCalls()); n != 1 {
		t.Errorf("Shutdown called %d times, want 1", n)
	}
}

func TestClose(t *testing.T) {
	t.Run("shuts down once", func(t *testing.T) {
		s := newDGXA100(t)
		src := gpu.FromInterface(s, nil)
		if inv := src.Inventory(t.Context()); len(inv.Devices) != 8 {
			t.Fatalf("got %d devices before Close, want 8", len(inv.Devices))
		}
		for range 2 {
			if err := src.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}
		if n := len(s.ShutdownCalls()); n != 1 {
			t.Errorf("Shutdown called %d times, want 1", n)
		}
		if inv := src.Inventory(t.Context()); inv.Unavailable == "" || len(inv.Devices) != 0 {
			t.Errorf("after Close: %+v, want Unavailable and no devices", inv)
		}
		if n := len(s.InitCalls()); n != 1 {
			t.Errorf("Init called %d times, want 1 (not again after Close)", n)
		}
	})
	t.Run("never initialized", func(t *testing.T) {
		s := newDGXA100(t)
		if err := gpu.FromInterface(s, nil).Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if n := len(s.ShutdownCalls()); n != 0 {
			t.Errorf("Shutdown called %d times without Init", n)
		}
	})
	t.Run("shutdown fails", func(t *testing.T) {
		s := newDGXA100(t)
		s.ShutdownFunc = func() nvml.Return { return nvml.ERROR_UNKNOWN }
		src := gpu.FromInterface(s, nil)
		src.Inventory(t.Context())
		if err := src.Close(); !errors.Is(err, nvml.ERROR_UNKNOWN) {
			t.Errorf("Close = %v, want it to wrap %s", err, nvml.ERROR_UNKNOWN)
		}
	})
}

func TestWaitHonoursContext(t *testing.T) {
	s := newDGXA100(t)
	entered, release := make(chan struct{}), make(chan struct{})
	count := s.DeviceGetCountFunc
	s.DeviceGetCountFunc = func() (int, nvml.Return) {
		close(entered)
		<-release
		return count()
	}
	src := newSource(t, s, nil)
	done := make(chan gpu.Inventory)
	go func() { done <- src.Inventory(context.Background()) }()
	<-entered

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if inv := src.Inventory(ctx); !strings.Contains(inv.Unavailable, context.Canceled.Error()) || len(inv.Devices) != 0 {
		t.Errorf("waiting read with a cancelled ctx = %+v, want Unavailable naming %v", inv, context.Canceled)
	}
	close(release)
	if inv := <-done; len(inv.Devices) != 8 {
		t.Errorf("blocked read got %d devices, want 8", len(inv.Devices))
	}
}

func TestConcurrentInventory(t *testing.T) {
	s := newDGXA100(t)
	src := gpu.FromInterface(s, nil)
	const readers, reads = 16, 25
	read := func(allowClosed bool) {
		for range reads {
			inv := src.Inventory(t.Context())
			if allowClosed && inv.Unavailable != "" && len(inv.Devices) == 0 {
				continue
			}
			if inv.Unavailable != "" || len(inv.Devices) != 8 {
				t.Errorf("Unavailable %q with %d devices; want 8 devices", inv.Unavailable, len(inv.Devices))
				return
			}
			for i, got := range inv.Devices {
				if want := wantDevice(t, s, i); got != want {
					t.Errorf("device %d = %+v, want %+v", i, got, want)
				}
			}
		}
	}

	var wg sync.WaitGroup
	for range readers {
		wg.Go(func() { read(false) })
	}
	wg.Wait()
	if n := len(s.InitCalls()); n != 1 {
		t.Errorf("Init called %d times by concurrent readers, want 1", n)
	}

	// Close racing with readers: every read is complete or unavailable.
	for range readers {
		wg.Go(func() { read(true) })
	}
	wg.Go(func() {
		if err := src.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	wg.Wait()
	if n := len(s.ShutdownCalls()); n != 1 {
		t.Errorf("Shutdown called %d times, want 1", n)
	}
}

// This machine's real NVML: without a driver it reports why, and never
// panics; with one (a GPU host) it reports devices.
func TestNewNVML(t *testing.T) {
	logger, logs := newLogger()
	src := gpu.NewNVML(logger)
	inv := src.Inventory(t.Context())
	t.Logf("inventory: %+v", inv)
	if inv.Unavailable != "" {
		if len(inv.Devices) != 0 {
			t.Errorf("Unavailable %q with %d devices", inv.Unavailable, len(inv.Devices))
		}
		if !strings.Contains(inv.Unavailable, "NVML") {
			t.Errorf("Unavailable = %q, want it to name NVML", inv.Unavailable)
		}
		if strings.Contains(inv.Unavailable, "library not found") && !strings.Contains(inv.Unavailable, "libnvidia-ml.so.1") {
			t.Errorf("Unavailable = %q, want it to name libnvidia-ml.so.1", inv.Unavailable)
		}
		if logs.count("GPU inventory unavailable") != 1 {
			t.Errorf("reason not logged once:\n%s", logs.buf.String())
		}
	} else {
		for _, d := range inv.Devices {
			if d.UUID == "" || d.Name == "" || d.MemoryTotalBytes == 0 {
				t.Errorf("real device %+v lacks UUID, name or memory", d)
			}
		}
	}
	if again := src.Inventory(t.Context()); again.Unavailable != inv.Unavailable {
		t.Errorf("second read Unavailable = %q, want %q", again.Unavailable, inv.Unavailable)
	}
	if err := src.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}
