package agent_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/agent"
	"github.com/llorch/llorch/edge/gpu"
	"github.com/llorch/llorch/edge/handoff"
	"github.com/llorch/llorch/edge/internal/edgetest"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/refusal"
)

// fakeGPUs is a machine with one GPU.
type fakeGPUs struct{}

func (fakeGPUs) Inventory(context.Context) gpu.Inventory {
	return gpu.Inventory{DriverVersion: "550.54.15", CUDAVersion: "12.4", Devices: []gpu.Device{{Index: 0, UUID: "GPU-0", Name: "Test GPU", MemoryTotalBytes: 1 << 30}}}
}
func (fakeGPUs) Close() error { return nil }

// controlPlane is a fake control plane that serves every session stream as
// a well-behaved one would, keeping the reports it gets.
type controlPlane struct {
	srv *edgetest.Server
	ca  *edgetest.CA

	mu      sync.Mutex
	reports []*llorchv1.NodeStatusReport
	streams []*edgetest.Stream
}

func newControlPlane(t *testing.T, interval time.Duration) *controlPlane {
	t.Helper()
	cp := &controlPlane{ca: edgetest.NewCA(t)}
	svc := edgetest.NewSessionService()
	mux := http.NewServeMux()
	mux.Handle(llorchv1connect.NewSessionServiceHandler(svc))
	cp.srv = edgetest.NewServer(t, cp.ca, mux)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); cp.srv.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			select {
			case st := <-svc.Streams():
				cp.mu.Lock()
				cp.streams = append(cp.streams, st)
				cp.mu.Unlock()
				wg.Go(func() {
					st.Serve(interval, func(r *llorchv1.NodeStatusReport) {
						cp.mu.Lock()
						defer cp.mu.Unlock()
						cp.reports = append(cp.reports, r)
					})
				})
			case <-ctx.Done():
				return
			}
		}
	})
	return cp
}

// waitReport polls the reports until one satisfies ok, and returns it.
func (cp *controlPlane) waitReport(t *testing.T, what string, ok func(*llorchv1.NodeStatusReport) bool) *llorchv1.NodeStatusReport {
	t.Helper()
	deadline := time.Now().Add(edgetest.WaitLimit)
	for {
		cp.mu.Lock()
		var last *llorchv1.NodeStatusReport
		if n := len(cp.reports); n > 0 {
			last = cp.reports[n-1]
		}
		cp.mu.Unlock()
		if last != nil && ok(last) {
			return last
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last report: %v", what, last)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stream returns the latest session stream.
func (cp *controlPlane) stream(t *testing.T) *edgetest.Stream {
	t.Helper()
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if len(cp.streams) == 0 {
		t.Fatal("no session")
	}
	return cp.streams[len(cp.streams)-1]
}

// running is an agent started in the background.
type running struct {
	done     chan error    // Run's error
	finished chan struct{} // closed when Run has returned
	cancel   context.CancelFunc
}

func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		return err
	case <-time.After(edgetest.WaitLimit):
		t.Fatal("agent did not stop")
		return nil
	}
}

func startAgent(t *testing.T, cfg agent.Config, id state.Identity) *running {
	t.Helper()
	if cfg.GPUs == nil {
		cfg.GPUs = fakeGPUs{}
	}
	if cfg.EnginesDir == "" {
		cfg.EnginesDir = filepath.Join(t.TempDir(), "engines")
	}
	cfg.BackoffMax = 200 * time.Millisecond
	cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{done: make(chan error, 1), finished: make(chan struct{}), cancel: cancel}
	go func() {
		r.done <- agent.New(cfg, id).Run(ctx)
		close(r.finished)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.finished:
		case <-time.After(edgetest.WaitLimit):
			t.Error("agent did not stop")
		}
	})
	return r
}

func TestSecondAgentOnStateDirRefused(t *testing.T) {
	cp := newControlPlane(t, time.Hour)
	dir, id := cp.ca.Enrolled(t, "node-1", cp.srv.URL)
	first := startAgent(t, agent.Config{StateDir: dir}, id)
	cp.waitReport(t, "the first agent to register", func(*llorchv1.NodeStatusReport) bool { return true })

	// Bounded, so a second agent that is let in fails the test instead of hanging it.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := agent.New(agent.Config{StateDir: dir, GPUs: fakeGPUs{}}, id).Run(ctx)
	if !errors.Is(err, state.ErrLocked) {
		t.Fatalf("second agent = %v, want ErrLocked", err)
	}
	want := fmt.Sprintf("state directory %s is in use by another edge agent (pid %d); stop it first", dir, os.Getpid())
	if err.Error() != want {
		t.Errorf("second agent says %q\nwant %q", err, want)
	}

	// Released when Run returns: another agent can take over.
	if err := first.stop(t); err != nil {
		t.Fatalf("first agent = %v after cancel, want nil", err)
	}
	third := startAgent(t, agent.Config{StateDir: dir}, id)
	deadline := time.Now().Add(edgetest.WaitLimit)
	for {
		cp.mu.Lock()
		n := len(cp.streams)
		cp.mu.Unlock()
		if n >= 2 {
			break
		}
		select {
		case err := <-third.done:
			t.Fatalf("agent after the first stopped = %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the agent started after the first stopped did not connect")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func handoffJSON(pool, replica, url string) string {
	return fmt.Sprintf(`{"pool_id":%q,"replica_id":%q,"engine":"llamacpp","engine_version":"b3600","url":%q,"slots":2}`, pool, replica, url)
}

func writeHandoff(t *testing.T, dir, name, content string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, "."+name)
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func healthyEngine(t *testing.T) string {
	t.Helper()
	eng := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			fmt.Fprint(w, `{"status":"ok"}`)
			return
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(eng.Close)
	return eng.URL
}

func readyPool(id string) func(*llorchv1.NodeStatusReport) bool {
	return func(r *llorchv1.NodeStatusReport) bool {
		for _, p := range r.GetPools() {
			if p.GetId() == id && p.GetReady() {
				return true
			}
		}
		return false
	}
}

func TestHandoffFilesInHeartbeat(t *testing.T) {
	cp := newControlPlane(t, 100*time.Millisecond)
	dir, id := cp.ca.Enrolled(t, "node-1", cp.srv.URL)
	engines := filepath.Join(t.TempDir(), "engines")
	startAgent(t, agent.Config{StateDir: dir, EnginesDir: engines}, id)
	cp.waitReport(t, "a first report", func(r *llorchv1.NodeStatusReport) bool { return len(r.GetGpuInventory().GetGpus()) == 1 })

	writeHandoff(t, engines, "pool-0-r0.json", handoffJSON("pool-0", "r0", healthyEngine(t)))
	writeHandoff(t, engines, "broken.json", "{")
	r := cp.waitReport(t, "the handed-off replica, ready", readyPool("pool-0"))
	p := r.GetPools()[0]
	if len(p.GetReplicas()) != 1 || p.GetReplicas()[0].GetFile() != "pool-0-r0.json" || p.GetSlotsTotal() != 2 || p.GetSlotsFree() != 2 {
		t.Errorf("pool = %v, want pool-0 with its one replica and 2 of 2 slots free", p)
	}
	if errs := r.GetHandoffErrors(); len(errs) != 1 || errs[0].GetFile() != "broken.json" || !strings.Contains(errs[0].GetReason(), "invalid JSON") {
		t.Errorf("handoff errors = %v, want broken.json's", errs)
	}
	if r.GetDroppedReplicas() != 0 || r.GetDroppedHandoffErrors() != 0 {
		t.Errorf("dropped %d replicas, %d errors; want none", r.GetDroppedReplicas(), r.GetDroppedHandoffErrors())
	}

	// Past the caps, the report counts what it left out.
	for i := range handoff.MaxReplicas + 1 {
		writeHandoff(t, engines, fmt.Sprintf("many-%03d.json", i), handoffJSON("pool-1", fmt.Sprintf("r%03d", i), "http://127.0.0.1:1"))
	}
	for i := range handoff.MaxErrors {
		writeHandoff(t, engines, fmt.Sprintf("bad-%03d.json", i), "{")
	}
	r = cp.waitReport(t, "the dropped counts", func(r *llorchv1.NodeStatusReport) bool {
		return r.GetDroppedReplicas() == 2 && r.GetDroppedHandoffErrors() == 1
	})
	n := 0
	for _, p := range r.GetPools() {
		n += len(p.GetReplicas())
	}
	if n != handoff.MaxReplicas || len(r.GetHandoffErrors()) != handoff.MaxErrors {
		t.Errorf("report holds %d replicas and %d errors, want %d and %d", n, len(r.GetHandoffErrors()), handoff.MaxReplicas, handoff.MaxErrors)
	}
}

func TestDrainMarksPoolsDraining(t *testing.T) {
	cp := newControlPlane(t, 100*time.Millisecond)
	dir, id := cp.ca.Enrolled(t, "node-1", cp.srv.URL)
	engines := filepath.Join(t.TempDir(), "engines")
	writeHandoff(t, engines, "a.json", handoffJSON("pool-0", "r0", healthyEngine(t)))
	startAgent(t, agent.Config{StateDir: dir, EnginesDir: engines}, id)
	cp.waitReport(t, "the pool, ready", readyPool("pool-0"))

	cp.stream(t).Command(t, &llorchv1.Command{Kind: llorchv1.CommandKind_COMMAND_KIND_DRAIN, Reason: "maintenance"})
	r := cp.waitReport(t, "the drain", func(r *llorchv1.NodeStatusReport) bool { return r.GetDraining() })
	if p := r.GetPools(); len(p) != 1 || !p[0].GetDraining() || p[0].GetSlotsFree() != 0 || p[0].GetSlotsTotal() != 2 {
		t.Errorf("pools while draining = %v, want pool-0 draining with no free slots", p)
	}

	cp.stream(t).Command(t, &llorchv1.Command{Kind: llorchv1.CommandKind_COMMAND_KIND_UNDRAIN})
	r = cp.waitReport(t, "the undrain", func(r *llorchv1.NodeStatusReport) bool { return !r.GetDraining() })
	if p := r.GetPools(); len(p) != 1 || p[0].GetDraining() || p[0].GetSlotsFree() != 2 {
		t.Errorf("pools after undrain = %v, want pool-0 with its 2 slots free", p)
	}
}

// The first of the agent's parts to fail stops the others: a revoked node's
// session ends Run, watcher and renewal included, with the refusal.
func TestRevokedStopsTheAgent(t *testing.T) {
	ca := edgetest.NewCA(t)
	svc := edgetest.NewSessionService()
	mux := http.NewServeMux()
	mux.Handle(llorchv1connect.NewSessionServiceHandler(svc))
	srv := edgetest.NewServer(t, ca, mux)
	dir, id := ca.Enrolled(t, "node-1", srv.URL)
	r := startAgent(t, agent.Config{StateDir: dir}, id)
	svc.Next(t).End(edgetest.Refusal(connect.CodePermissionDenied, refusal.Revoked, 0, "node node-1 has been removed"))
	select {
	case err := <-r.done:
		if !errors.Is(err, edge.ErrRevoked) {
			t.Fatalf("Run = %v, want ErrRevoked", err)
		}
	case <-time.After(edgetest.WaitLimit):
		t.Fatal("a revoked agent kept running")
	}
	// The lock went with it.
	release, err := state.Lock(dir)
	if err != nil {
		t.Fatalf("Lock after Run returned: %v", err)
	}
	release()
}

// A lost session's connection is not reused: the next session dials a new
// one (after a partition the old one may be dead without TCP knowing).
func TestLostSessionGetsANewConnection(t *testing.T) {
	cp := newControlPlane(t, 100*time.Millisecond)
	dir, id := cp.ca.Enrolled(t, "node-1", cp.srv.URL)
	startAgent(t, agent.Config{StateDir: dir}, id)
	cp.waitReport(t, "a heartbeat", func(*llorchv1.NodeStatusReport) bool { return true })
	first := cp.stream(t)
	first.End(connect.NewError(connect.CodeUnavailable, errors.New("lost")))
	deadline := time.Now().Add(edgetest.WaitLimit)
	for cp.stream(t) == first {
		if time.Now().After(deadline) {
			t.Fatal("no second session")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := cp.srv.Conns(); n != 2 {
		t.Errorf("%d connections for two sessions, want a new one for the second", n)
	}
}
