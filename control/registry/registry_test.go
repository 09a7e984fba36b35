package registry_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/registry"
	"github.com/llorch/llorch/control/store"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// countingStore counts the writes that reach the real store.
type countingStore struct {
	*store.Store
	statusWrites, lastSeenWrites atomic.Int64
	// failLastSeen fails that many last-seen writes, as a full disk would.
	failLastSeen atomic.Int64
}

func (c *countingStore) SetNodeStatuses(ctx context.Context, ch []control.StatusChange, now time.Time) error {
	c.statusWrites.Add(1)
	return c.Store.SetNodeStatuses(ctx, ch, now)
}

func (c *countingStore) UpdateLastSeen(ctx context.Context, seen map[string]time.Time) error {
	if len(seen) > 0 && c.failLastSeen.Add(-1) >= 0 {
		return errors.New("disk full")
	}
	err := c.Store.UpdateLastSeen(ctx, seen)
	if len(seen) > 0 {
		c.lastSeenWrites.Add(1) // after the write, so a test that saw the count sees the data
	}
	return err
}

type env struct {
	st    *countingStore
	clock *clock.Fake
	reg   *registry.Registry
	stop  func() // stops reg, as the control plane's exit does
	dir   string
	// stallAfter is -1 (off): these tests jump the fake clock on purpose.
	stallAfter time.Duration
	admission  registry.Admission
}

const (
	interval = time.Second
	offline  = 3 * time.Second
)

func openStore(tb testing.TB, dir string) *countingStore {
	tb.Helper()
	st, err := store.Open(context.Background(), filepath.Join(dir, "llorch.db"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	return &countingStore{Store: st}
}

// newEnv is a registry over a real store on a fake clock, with nodes
// enrolled. Its stall detection is off: these tests jump the clock on purpose.
func newEnv(tb testing.TB, nodes ...string) *env { return newEnvStall(tb, -1, nodes...) }

func newEnvStall(tb testing.TB, stallAfter time.Duration, nodes ...string) *env {
	tb.Helper()
	dir := tb.TempDir()
	e := &env{st: openStore(tb, dir), clock: clock.NewFake(time.Now()), dir: dir, stallAfter: stallAfter}
	ctx := context.Background()
	for i, id := range nodes {
		tokID := strings.Repeat(string(rune('a'+i)), 12)
		hash := make([]byte, 32)
		if err := e.st.CreateToken(ctx, control.JoinToken{ID: tokID, SecretHash: hash, CreatedAt: e.clock.Now(), ExpiresAt: e.clock.Now().Add(time.Hour), MaxUses: 1}); err != nil {
			tb.Fatal(err)
		}
		if err := e.st.EnrollNode(ctx, tokID, hash, e.clock.Now(), control.Node{ID: id, Name: id, CertSerial: "01", CertNotAfter: e.clock.Now().Add(24 * time.Hour)}); err != nil {
			tb.Fatal(err)
		}
	}
	e.restart(tb)
	return e
}

// restart stops the running registry, if any, then loads a new one from the
// store and runs it until the test ends: a control-plane restart.
func (e *env) restart(tb testing.TB) {
	tb.Helper()
	if e.stop != nil {
		e.stop()
	}
	reg := registry.New(registry.Config{Store: e.st, HeartbeatInterval: interval, OfflineAfter: offline, Clock: e.clock, StallAfter: e.stallAfter, Admission: e.admission})
	if err := reg.Load(context.Background()); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { reg.Run(ctx); close(done) }()
	var once sync.Once
	e.reg, e.stop = reg, func() { once.Do(func() { cancel(); <-done }) }
	tb.Cleanup(e.stop)
}

func (e *env) status(tb testing.TB, id string) control.NodeStatus {
	tb.Helper()
	v, ok := e.reg.Node(id)
	if !ok {
		tb.Fatalf("node %s not in the registry", id)
	}
	return v.Status
}

// waitEvent polls the store until an event with the reason appears.
// waitEvent waits for a status event of node id whose move and reason,
// written "<from> -> <to>: <reason>", contain move.
func (e *env) waitEvent(tb testing.TB, id, move string) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		evs, err := e.st.ListEvents(context.Background(), id, 50)
		if err != nil {
			tb.Fatal(err)
		}
		for _, ev := range evs {
			if ev.Kind == control.EventStatus && strings.Contains(fmt.Sprintf("%s -> %s: %s", ev.From, ev.To, ev.Reason), move) {
				return
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	tb.Fatalf("no event %q for node %s", move, id)
}

// fakeStream is a session's stream: it records the commands the registry
// pushes and whether the registry ended the session.
type fakeStream struct {
	pushed  chan *llorchv1.Command
	ended   chan struct{}
	endOnce sync.Once
	// hold, when not nil, makes Push wait for it: an edge that is not reading.
	hold chan struct{}
}

func newFakeStream() *fakeStream {
	return &fakeStream{pushed: make(chan *llorchv1.Command, 64), ended: make(chan struct{})}
}

func (f *fakeStream) Push(c *llorchv1.Command) error {
	if f.hold != nil {
		<-f.hold
	}
	f.pushed <- c
	return nil
}

func (f *fakeStream) End() { f.endOnce.Do(func() { close(f.ended) }) }

// next returns the next pushed command, failing the test after a while.
func (f *fakeStream) next(tb testing.TB) *llorchv1.Command {
	tb.Helper()
	select {
	case c := <-f.pushed:
		return c
	case <-time.After(5 * time.Second):
		tb.Fatal("no command pushed to the session")
		return nil
	}
}

// waitEnded fails the test unless the registry ends the session.
func (f *fakeStream) waitEnded(tb testing.TB) {
	tb.Helper()
	select {
	case <-f.ended:
	case <-time.After(5 * time.Second):
		tb.Fatal("the registry did not end the session")
	}
}

type testSession struct {
	*registry.Session
	stream *fakeStream
}

func connect(tb testing.TB, reg *registry.Registry, id string) testSession {
	tb.Helper()
	stream := newFakeStream()
	s, reply, err := reg.Connect(id, &llorchv1.NodeSystem{Hostname: id}, &llorchv1.NodeStatusReport{}, stream)
	if err != nil {
		tb.Fatalf("connect %s: %v", id, err)
	}
	if reply.GetHeartbeatInterval().AsDuration() != interval {
		tb.Errorf("heartbeat interval %v, want %v", reply.GetHeartbeatInterval().AsDuration(), interval)
	}
	return testSession{s, stream}
}

func TestTransitions(t *testing.T) {
	tests := []struct {
		name   string
		run    func(t *testing.T, e *env, s *registry.Session)
		want   control.NodeStatus
		reason string
	}{
		{"register", func(t *testing.T, e *env, s *registry.Session) {}, control.StatusOnline, "enrolled -> online: registered"},
		{"heartbeats keep it online", func(t *testing.T, e *env, s *registry.Session) {
			for range 10 {
				e.clock.Advance(interval)
				s.Heartbeat(nil)
				e.reg.Sweep(e.clock.Now())
			}
		}, control.StatusOnline, "registered"},
		{"silence past the threshold", func(t *testing.T, e *env, s *registry.Session) {
			e.clock.Advance(offline)
			e.reg.Sweep(e.clock.Now())
			if got := e.status(t, "n1"); got != control.StatusOnline {
				t.Fatalf("at exactly the threshold: %s, want still online", got)
			}
			e.clock.Advance(time.Millisecond)
			e.reg.Sweep(e.clock.Now())
		}, control.StatusOffline, "online -> offline: no heartbeat for 3s"},
		{"heartbeat resumes", func(t *testing.T, e *env, s *registry.Session) {
			e.clock.Advance(offline + time.Second)
			e.reg.Sweep(e.clock.Now())
			s.Heartbeat(nil)
		}, control.StatusOnline, "offline -> online: heartbeat resumed"},
		{"goodbye", func(t *testing.T, e *env, s *registry.Session) {
			s.Close(true, "shutdown")
		}, control.StatusOffline, "online -> offline: shutdown"},
		{"stream lost", func(t *testing.T, e *env, s *registry.Session) {
			s.Close(false, "session lost: connection closed")
		}, control.StatusDisconnected, "online -> disconnected: session lost: connection closed"},
		{"lost, then silent", func(t *testing.T, e *env, s *registry.Session) {
			s.Close(false, "session lost")
			e.clock.Advance(offline + time.Millisecond)
			e.reg.Sweep(e.clock.Now())
		}, control.StatusOffline, "disconnected -> offline: no heartbeat for 3s"},
		{"lost, then back", func(t *testing.T, e *env, s *registry.Session) {
			s.Close(false, "session lost")
			connect(t, e.reg, "n1")
		}, control.StatusOnline, "disconnected -> online: registered"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, "n1")
			if got := e.status(t, "n1"); got != control.StatusEnrolled {
				t.Fatalf("before connecting: %s", got)
			}
			s := connect(t, e.reg, "n1")
			tt.run(t, e, s.Session)
			if got := e.status(t, "n1"); got != tt.want {
				t.Fatalf("status %s, want %s", got, tt.want)
			}
			e.waitEvent(t, "n1", tt.reason)
		})
	}
}

func TestRestartGrace(t *testing.T) {
	e := newEnv(t, "back", "gone", "never")
	connect(t, e.reg, "back")
	connect(t, e.reg, "gone")
	e.waitEvent(t, "gone", "registered")

	// The control plane restarts: a new registry on the same store.
	e.restart(t)
	reg := e.reg
	for _, id := range []string{"back", "gone"} {
		if got := e.status(t, id); got != control.StatusUnknown {
			t.Fatalf("%s after restart: %s, want unknown", id, got)
		}
	}
	if got := e.status(t, "never"); got != control.StatusEnrolled {
		t.Fatalf("a node that never connected: %s, want enrolled", got)
	}
	e.waitEvent(t, "gone", "online -> unknown: control plane restarted")

	// Inside the grace, silence is not the node's fault.
	e.clock.Advance(registry.MinRestartGrace - time.Second)
	reg.Sweep(e.clock.Now())
	connect(t, reg, "back")
	if got := e.status(t, "gone"); got != control.StatusUnknown {
		t.Fatalf("inside the grace: %s, want unknown", got)
	}
	e.clock.Advance(2 * time.Second)
	reg.Sweep(e.clock.Now())
	if got := e.status(t, "gone"); got != control.StatusOffline {
		t.Fatalf("after the grace: %s, want offline", got)
	}
	if got := e.status(t, "back"); got != control.StatusOnline {
		t.Fatalf("reconnected node: %s, want online", got)
	}
	e.waitEvent(t, "gone", "unknown -> offline: not seen since the control plane restarted")
}

// A large fleet needs longer than the offline threshold to get back in
// through the pacing: the restart grace grows with it, so none of it is
// called offline for the control plane's own restart.
func TestRestartGraceCoversThePacedFleet(t *testing.T) {
	nodes := make([]string, 30)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("n%02d", i)
	}
	e := newEnv(t, nodes...)
	e.admission = registry.Admission{Rate: 1, Burst: 1} // 30 nodes need 30s to get in
	for _, id := range nodes {
		connect(t, e.reg, id)
	}
	e.restart(t)
	// 2s floor + 10s spread + four times 30s of pacing.
	e.clock.Advance(131 * time.Second)
	e.reg.Sweep(e.clock.Now())
	if got := e.status(t, "n07"); got != control.StatusUnknown {
		t.Fatalf("131s after the restart: %s, want unknown", got)
	}
	e.clock.Advance(2 * time.Second)
	e.reg.Sweep(e.clock.Now())
	if got := e.status(t, "n07"); got != control.StatusOffline {
		t.Fatalf("133s after the restart: %s, want offline", got)
	}
}

func TestDrainAndRemove(t *testing.T) {
	e := newEnv(t, "n1")
	s := connect(t, e.reg, "n1")
	ctx := context.Background()
	if _, err := e.reg.Drain(ctx, "n1", true, "maintenance"); err != nil {
		t.Fatal(err)
	}
	if cmd := s.stream.next(t); cmd.GetKind() != llorchv1.CommandKind_COMMAND_KIND_DRAIN || cmd.GetReason() != "maintenance" {
		t.Fatalf("command %v, want DRAIN", cmd)
	}
	// Draining survives a restart.
	e.restart(t)
	if v, _ := e.reg.Node("n1"); !v.Draining {
		t.Fatal("draining lost across a restart")
	}
	s = connect(t, e.reg, "n1")
	if _, err := e.reg.Remove(ctx, "n1", "decommissioned"); err != nil {
		t.Fatal(err)
	}
	// The edge is told why, then the session ends.
	if cmd := s.stream.next(t); cmd.GetKind() != llorchv1.CommandKind_COMMAND_KIND_DISCONNECT || cmd.GetReason() != "node removed: decommissioned" {
		t.Fatalf("command %v, want DISCONNECT", cmd)
	}
	s.stream.waitEnded(t)
	if why := s.Ended(); !errors.Is(why, control.ErrDisconnected) {
		t.Fatalf("Ended() = %v, want ErrDisconnected", why)
	}
	if _, ok := e.reg.Node("n1"); ok {
		t.Fatal("removed node still in the registry")
	}
	if _, _, err := e.reg.Connect("n1", nil, nil, newFakeStream()); !errors.Is(err, control.ErrUnknownNode) {
		t.Fatalf("connect after removal: %v, want ErrUnknownNode", err)
	}
}

// Commands reach the edge in the order they were given, one at a time.
func TestCommandsInOrder(t *testing.T) {
	e := newEnv(t, "n1")
	s := connect(t, e.reg, "n1")
	ctx := context.Background()
	for i := range 5 {
		if _, err := e.reg.Drain(ctx, "n1", i%2 == 0, "flip"); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.reg.RenewNow("n1"); err != nil {
		t.Fatal(err)
	}
	want := []llorchv1.CommandKind{
		llorchv1.CommandKind_COMMAND_KIND_DRAIN, llorchv1.CommandKind_COMMAND_KIND_UNDRAIN,
		llorchv1.CommandKind_COMMAND_KIND_DRAIN, llorchv1.CommandKind_COMMAND_KIND_UNDRAIN,
		llorchv1.CommandKind_COMMAND_KIND_DRAIN, llorchv1.CommandKind_COMMAND_KIND_RENEW_NOW,
	}
	for i, kind := range want {
		if got := s.stream.next(t).GetKind(); got != kind {
			t.Fatalf("command %d: %s, want %s", i, got, kind)
		}
	}
	if why := s.Ended(); why != nil {
		t.Fatalf("session ended: %v", why)
	}
}

// DisconnectAll tells every edge when to come back, then ends its session;
// a session the handler has closed gets nothing.
func TestDisconnectAll(t *testing.T) {
	e := newEnv(t, "n1", "n2", "n3")
	s1, s2, s3 := connect(t, e.reg, "n1"), connect(t, e.reg, "n2"), connect(t, e.reg, "n3")
	s3.Close(false, "session lost: connection reset")
	e.reg.DisconnectAll("control plane shutting down")
	for _, s := range []testSession{s1, s2} {
		cmd := s.stream.next(t)
		if cmd.GetKind() != llorchv1.CommandKind_COMMAND_KIND_DISCONNECT {
			t.Fatalf("command %v, want DISCONNECT", cmd)
		}
		// Three nodes: the floor of 2s plus a spread of 1s (the least).
		if wait := cmd.GetRetryAfter().AsDuration(); wait < 2*time.Second || wait > 3*time.Second {
			t.Errorf("retry after %s, want 2s plus up to 1s", wait)
		}
		s.stream.waitEnded(t)
	}
	select {
	case cmd := <-s3.stream.pushed:
		t.Fatalf("a closed session got %v", cmd)
	case <-s3.stream.ended:
		t.Fatal("a closed session was ended")
	case <-time.After(50 * time.Millisecond):
	}
}

// An edge that does not take its commands is not waited for: the registry
// stays responsive, and the session ends once too many are queued.
func TestStuckEdgeIsEnded(t *testing.T) {
	e := newEnv(t, "n1")
	s := connect(t, e.reg, "n1")
	s.stream.hold = make(chan struct{})
	defer close(s.stream.hold)
	for range 20 {
		if err := e.reg.RenewNow("n1"); err != nil {
			t.Fatal(err)
		}
	}
	s.stream.waitEnded(t)
	if why := s.Ended(); !errors.Is(why, control.ErrTooSlow) {
		t.Fatalf("Ended() = %v, want ErrTooSlow", why)
	}
}

func TestNewestSessionWins(t *testing.T) {
	e := newEnv(t, "n1")
	old := connect(t, e.reg, "n1")
	cur := connect(t, e.reg, "n1")
	old.stream.waitEnded(t)
	if why := old.Ended(); !errors.Is(why, control.ErrSessionReplaced) {
		t.Fatalf("Ended() = %v, want ErrSessionReplaced", why)
	}
	if err := old.Heartbeat(nil); !errors.Is(err, control.ErrSessionReplaced) {
		t.Fatalf("heartbeat on the replaced session: %v", err)
	}
	old.Close(false, "late close of the old session")
	if got := e.status(t, "n1"); got != control.StatusOnline {
		t.Fatalf("closing the old session changed the status to %s", got)
	}
	if err := cur.Heartbeat(nil); err != nil {
		t.Fatal(err)
	}
	if why := cur.Ended(); why != nil {
		t.Fatalf("the new session ended: %v", why)
	}
}

// Heartbeats stay in memory: no store write per heartbeat, last-seen times
// flushed in batches.
func TestHeartbeatsDoNotWrite(t *testing.T) {
	e := newEnv(t, "n1", "n2")
	s1, s2 := connect(t, e.reg, "n1"), connect(t, e.reg, "n2")
	e.waitEvent(t, "n2", "registered")
	before := e.st.statusWrites.Load() + e.st.lastSeenWrites.Load()
	for range 1000 {
		s1.Heartbeat(nil)
		s2.Heartbeat(nil)
	}
	if after := e.st.statusWrites.Load() + e.st.lastSeenWrites.Load(); after != before {
		t.Fatalf("1000 heartbeats made %d store writes", after-before)
	}
	// The flush writes both nodes' last-seen times in one write.
	e.clock.Advance(registry.DefaultFlushInterval)
	deadline := time.Now().Add(5 * time.Second)
	for e.st.lastSeenWrites.Load() == 0 && time.Now().Before(deadline) {
		e.clock.Advance(500 * time.Millisecond)
		time.Sleep(5 * time.Millisecond)
	}
	n, err := e.st.GetNode(context.Background(), "n1")
	if err != nil {
		t.Fatal(err)
	}
	if n.LastSeen.IsZero() {
		t.Fatal("last seen not flushed")
	}
}

// A last-seen flush that fails is retried with the next one; the times are
// not dropped.
func TestLastSeenRetriedAfterAFailedWrite(t *testing.T) {
	e := newEnv(t, "n1")
	s := connect(t, e.reg, "n1")
	e.waitEvent(t, "n1", "registered")
	e.st.failLastSeen.Store(1)
	if err := s.Heartbeat(nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.st.lastSeenWrites.Load() == 0 && time.Now().Before(deadline) {
		e.clock.Advance(500 * time.Millisecond)
		time.Sleep(5 * time.Millisecond)
	}
	if e.st.failLastSeen.Load() >= 0 {
		t.Fatal("the failing write was never tried")
	}
	n, err := e.st.GetNode(context.Background(), "n1")
	if err != nil {
		t.Fatal(err)
	}
	if n.LastSeen.IsZero() {
		t.Fatal("last seen lost after a failed write")
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []registry.Config{
		{HeartbeatInterval: 10 * time.Millisecond},
		{HeartbeatInterval: 10 * time.Second, OfflineAfter: 15 * time.Second},
		{HeartbeatInterval: time.Hour},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) accepted", c)
		}
	}
	if err := (registry.Config{HeartbeatInterval: time.Second, OfflineAfter: 3 * time.Second}).Validate(); err != nil {
		t.Errorf("1s/3s: %v", err)
	}
}

// BenchmarkHeartbeat is the control plane's per-heartbeat work once a
// session is up: the registry update, with the real store behind it. It
// reports heartbeats/s and the store writes made per heartbeat (0).
func BenchmarkHeartbeat(b *testing.B) {
	ids := make([]string, 1000)
	for i := range ids {
		ids[i] = "node-" + string(rune('a'+i%26)) + string(rune('a'+i/26%26)) + string(rune('a'+i/676))
	}
	e := newEnv(b, ids...)
	sessions := make([]testSession, len(ids))
	for i, id := range ids {
		sessions[i] = connect(b, e.reg, id)
	}
	report := &llorchv1.NodeStatusReport{GpuInventory: &llorchv1.GpuInventory{Gpus: []*llorchv1.Gpu{{Name: "A100"}}}}
	time.Sleep(100 * time.Millisecond) // let the registrations' writes land before counting
	before := e.st.statusWrites.Load() + e.st.lastSeenWrites.Load()
	var i atomic.Int64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			n := i.Add(1)
			if err := sessions[n%int64(len(sessions))].Heartbeat(report); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	writes := e.st.statusWrites.Load() + e.st.lastSeenWrites.Load() - before
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "heartbeats/s")
	b.ReportMetric(float64(writes)/float64(b.N), "writes/heartbeat")
}

// A control plane that was itself held up (SIGSTOP, a suspended VM) does not
// blame the nodes for the gap: they get a full OfflineAfter from the resume.
func TestOwnStallIsNotTheNodesFault(t *testing.T) {
	e := newEnvStall(t, 0, "n1") // the default detection
	connect(t, e.reg, "n1")
	waitFor := func(cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatal("timed out")
			}
			time.Sleep(time.Millisecond)
		}
	}
	// The sweeper is waiting on its tick; the process "freezes" for twice
	// the offline threshold, then resumes.
	waitFor(func() bool { return e.clock.Waiters() > 0 })
	e.clock.Advance(2 * offline)
	waitFor(func() bool { return e.clock.Waiters() > 0 }) // the sweep after the resume ran
	if got := e.status(t, "n1"); got != control.StatusOnline {
		t.Fatalf("after our own stall: %s, want online", got)
	}
	// A node that really is silent goes offline a full threshold after the
	// resume. Time now moves in sweep ticks, as it does when nothing stalls.
	for elapsed := time.Duration(0); elapsed < offline+interval; elapsed += interval / 2 {
		if elapsed == offline && e.status(t, "n1") != control.StatusOnline {
			t.Fatalf("offline %s after the resume, before the threshold", elapsed)
		}
		e.clock.Advance(interval / 2)
		waitFor(func() bool { return e.clock.Waiters() > 0 })
	}
	waitFor(func() bool { return e.status(t, "n1") == control.StatusOffline })
}

// A node that reconnects as fast as it can is recorded in a bounded number
// of events: FlapBudget moves one by one, then one event that sums up the
// rest when the window ends. Its status stays current in the store, and
// other nodes are recorded as always.
func TestFlappingNodeCoalesced(t *testing.T) {
	e := newEnv(t, "flap", "calm")
	const cycles = 500
	for range cycles {
		s := connect(t, e.reg, "flap")
		s.Close(false, "session lost: reset")
	}
	connect(t, e.reg, "calm")
	e.waitEvent(t, "calm", "enrolled -> online: registered")
	statusEvents := func(id string) []control.Event {
		evs, err := e.st.ListEvents(context.Background(), id, 10000)
		if err != nil {
			t.Fatal(err)
		}
		var out []control.Event
		for _, ev := range evs {
			if ev.Kind == control.EventStatus {
				out = append(out, ev)
			}
		}
		return out
	}
	waitFor(t, "the flapping node's moves written", func() bool {
		n, _ := e.st.GetNode(context.Background(), "flap")
		return n.Status == control.StatusDisconnected && len(statusEvents("flap")) == registry.FlapBudget
	})
	if got := len(statusEvents("flap")); got != registry.FlapBudget {
		t.Fatalf("%d status events for %d moves, want %d", got, 2*cycles, registry.FlapBudget)
	}
	e.clock.Advance(registry.FlapWindow)
	e.reg.Sweep(e.clock.Now())
	// The window's end sums the flapping up; ten minutes of silence also
	// took the node offline, recorded after the summary.
	waitFor(t, "the summary", func() bool { return len(statusEvents("flap")) == registry.FlapBudget+2 })
	evs := statusEvents("flap")
	sum, off := evs[1], evs[0]
	if sum.Coalesced != 2*cycles-registry.FlapBudget || sum.From != control.StatusDisconnected || sum.To != control.StatusDisconnected {
		t.Errorf("summary %+v, want %d moves from disconnected to disconnected", sum, 2*cycles-registry.FlapBudget)
	}
	if off.To != control.StatusOffline || off.Coalesced != 0 {
		t.Errorf("after the summary %+v, want the move to offline", off)
	}
	// A new window: moves are recorded one by one again.
	connect(t, e.reg, "flap")
	e.waitEvent(t, "flap", "offline -> online: registered")
	for _, ev := range statusEvents("calm") {
		if ev.Coalesced != 0 {
			t.Errorf("the calm node's moves were coalesced: %+v", ev)
		}
	}
}

func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
