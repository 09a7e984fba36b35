// Package registry is the control plane's live view of the fleet: which nodes
// are connected, when each was last heard from, what it reported (GPUs,
// engine pools), and the status transitions that follow. Liveness lives in
// memory; a heartbeat never writes to the store. Status transitions are
// queued for the store at once and written by one writer in batches (group
// commit); last-seen times are flushed every few seconds.
//
// States (see docs/ARCHITECTURE.md): enrolled -> online (registered) ->
// disconnected (session lost) -> offline (no heartbeat for OfflineAfter);
// offline or disconnected -> online on reconnect; online -> offline at once
// on a goodbye ("shutdown"). After a control-plane restart, nodes that were
// online are unknown until they reconnect or RestartGrace passes.
package registry

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"sync"
	"time"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/metrics"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// Defaults.
const (
	DefaultHeartbeatInterval = 10 * time.Second
	DefaultOfflineAfter      = 30 * time.Second
	DefaultFlushInterval     = 5 * time.Second
	// MinRestartGrace covers an edge's longest reconnect backoff (10s) plus
	// a handshake and a heartbeat, so no node is called offline because of
	// the control plane's own downtime.
	MinRestartGrace = 20 * time.Second
)

// Store is what the registry persists to.
type Store interface {
	ListNodes(ctx context.Context) ([]control.Node, error)
	SetNodeStatuses(ctx context.Context, changes []control.StatusChange, now time.Time) error
	UpdateLastSeen(ctx context.Context, seen map[string]time.Time) error
	SetDraining(ctx context.Context, id string, draining bool, reason string, now time.Time) (control.Node, error)
	RemoveNode(ctx context.Context, id, reason string, now time.Time) (control.Node, error)
}

// Config configures a Registry.
type Config struct {
	Store             Store
	HeartbeatInterval time.Duration // 0: 10s
	OfflineAfter      time.Duration // 0: 30s
	// RestartGrace is how long nodes stay unknown after a restart before
	// they are offline; 0: the longest of OfflineAfter, MinRestartGrace and
	// the time the whole fleet needs to get back in through the admission
	// pacing (see Load).
	RestartGrace  time.Duration
	FlushInterval time.Duration // last-seen flushes; 0: 5s
	// StallAfter: when the sweeper itself was held up this long (the process
	// was paused, the machine suspended), the gap is not counted against the
	// nodes: they get a full OfflineAfter from the resume. 0: a heartbeat
	// interval plus one sweep tick, at least 2s; negative: never (tests that
	// jump a fake clock).
	StallAfter time.Duration
	// Admission paces new sessions; the zero value admits everything.
	Admission Admission
	// Rand returns a float in [0,1) for the spread of retry hints (nil:
	// math/rand/v2 Float64).
	Rand    func() float64
	Clock   clock.Clock      // nil: the wall clock
	Logger  *slog.Logger     // nil: discard
	Metrics *metrics.Metrics // nil: none
}

// Validate checks the timing settings.
func (c Config) Validate() error {
	hb, off := c.HeartbeatInterval, c.OfflineAfter
	if hb == 0 {
		hb = DefaultHeartbeatInterval
	}
	if off == 0 {
		off = DefaultOfflineAfter
	}
	if hb < 100*time.Millisecond || hb > 10*time.Minute {
		return fmt.Errorf("heartbeat interval %s: must be between 100ms and 10m", hb)
	}
	if off < 2*hb {
		return fmt.Errorf("offline-after %s must be at least twice the heartbeat interval %s, or a single late heartbeat takes a node offline", off, hb)
	}
	return nil
}

// View is what the registry knows about one node.
type View struct {
	control.Node
	System *llorchv1.NodeSystem
	Report *llorchv1.NodeStatusReport
}

type entry struct {
	node     control.Node
	system   *llorchv1.NodeSystem
	report   *llorchv1.NodeStatusReport
	session  *Session
	dirty    bool // last seen not flushed yet
	lastBeat time.Time
	flap     flap
}

// A node that changes status more than FlapBudget times within FlapWindow
// is flapping: its further moves in the window change its status without
// an event each, and when the window ends one event sums them up (with
// their count in Event.Coalesced). So a node that reconnects as fast as it
// may costs the event log a bounded number of rows, whatever it does.
const (
	FlapWindow = 10 * time.Minute
	FlapBudget = 20
)

// flap counts a node's moves in the current window.
type flap struct {
	start time.Time
	moves int
	quiet int                // moves written without an event
	from  control.NodeStatus // the status before the first quiet move
}

// Registry is the live fleet. It is safe for concurrent use.
type Registry struct {
	cfg     Config
	clock   clock.Clock
	rand    func() float64
	log     *slog.Logger
	metrics *metrics.Metrics

	mu        sync.Mutex
	nodes     map[string]*entry
	startedAt time.Time
	grace     time.Duration // how long nodes stay unknown after startedAt
	stopping  bool          // shutting down: silence is ours, not the nodes'
	resumedAt time.Time     // end of the last stall of our own; silence counts from here
	admission bucket

	writes chan control.StatusChange
	wg     sync.WaitGroup
}

// New returns a registry; Load fills it, Run keeps it.
func New(cfg Config) *Registry {
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if cfg.OfflineAfter == 0 {
		cfg.OfflineAfter = DefaultOfflineAfter
	}
	if cfg.FlushInterval == 0 {
		cfg.FlushInterval = DefaultFlushInterval
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	r := &Registry{
		cfg: cfg, clock: cfg.Clock, log: cfg.Logger, metrics: cfg.Metrics, rand: cfg.Rand,
		nodes:  map[string]*entry{},
		writes: make(chan control.StatusChange, 65536),
	}
	r.metrics.CountNodes(r.countByStatus)
	return r
}

// HeartbeatInterval is the interval edges are told to use.
func (r *Registry) HeartbeatInterval() time.Duration { return r.cfg.HeartbeatInterval }

// Load reads the nodes from the store. Nodes that were online or
// disconnected when the control plane stopped become unknown: their silence
// is the control plane's own downtime, not theirs.
func (r *Registry) Load(ctx context.Context) error {
	nodes, err := r.cfg.Store.ListNodes(ctx)
	if err != nil {
		return fmt.Errorf("load registry: %w", err)
	}
	now := r.clock.Now()
	var changes []control.StatusChange
	r.mu.Lock()
	r.startedAt = now
	r.grace = r.restartGrace(len(nodes))
	for _, n := range nodes {
		if n.Status == control.StatusRemoved {
			continue
		}
		if n.Status == control.StatusOnline || n.Status == control.StatusDisconnected {
			changes = append(changes, control.StatusChange{NodeID: n.ID, Status: control.StatusUnknown, Reason: "control plane restarted"})
			n.Status, n.StatusReason = control.StatusUnknown, "control plane restarted"
		}
		r.nodes[n.ID] = &entry{node: n}
	}
	r.mu.Unlock()
	if len(changes) > 0 {
		if err := r.cfg.Store.SetNodeStatuses(ctx, changes, now); err != nil {
			return fmt.Errorf("load registry: %w", err)
		}
		r.log.Info("nodes that were connected are unknown until they reconnect", "nodes", len(changes), "grace", r.grace)
	}
	return nil
}

// maxReconnectSpread bounds the window over which a control plane that
// shuts down spreads its edges' return.
const maxReconnectSpread = 10 * time.Second

// reconnectSpread is the window over which edges are told to come back after
// a shutdown: about a millisecond per node, between 1s and maxReconnectSpread.
func reconnectSpread(nodes int) time.Duration {
	return min(max(time.Duration(nodes)*time.Millisecond, time.Second), maxReconnectSpread)
}

// restartGrace is how long nodes stay unknown after a start, unless
// Config.RestartGrace says: at least OfflineAfter and MinRestartGrace, and at
// least the longest retry hint of a shutdown plus four times the time the
// admission pacing needs to let every node in: refused attempts slow the
// return, and the pacing is not always the bound (edges whose TLS session
// tickets expired do full handshakes, which on a small machine run at about
// half the default rate). So a large fleet coming back is never called
// offline for the control plane's own restart: 10,000 nodes at 1000/s get
// 52s.
func (r *Registry) restartGrace(nodes int) time.Duration {
	if r.cfg.RestartGrace > 0 {
		return r.cfg.RestartGrace
	}
	grace := max(r.cfg.OfflineAfter, MinRestartGrace)
	if rate := r.cfg.Admission.Rate; rate > 0 {
		paced := time.Duration(4 * float64(nodes) / rate * float64(time.Second))
		grace = max(grace, restartFloor+maxReconnectSpread+paced)
	}
	return grace
}

// Run sweeps for silent nodes, flushes last-seen times and writes queued
// transitions until ctx ends; then it flushes once more and returns.
func (r *Registry) Run(ctx context.Context) error {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.writer(ctx)
	}()
	tick := min(r.cfg.HeartbeatInterval/2, time.Second)
	stallAfter := r.cfg.StallAfter
	if stallAfter == 0 {
		stallAfter = max(r.cfg.HeartbeatInterval+tick, 2*time.Second)
	}
	lastFlush, lastTick := r.clock.Now(), r.clock.Now()
	for {
		select {
		case <-ctx.Done():
			r.wg.Wait()
			flushCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			r.drainWrites(flushCtx)
			r.flushLastSeen(flushCtx)
			return nil
		case <-r.clock.After(tick):
		}
		now := r.clock.Now()
		if gap := now.Sub(lastTick); stallAfter > 0 && gap > stallAfter {
			r.stalled(now, gap)
		}
		lastTick = now
		r.Sweep(now)
		if now.Sub(lastFlush) >= r.cfg.FlushInterval {
			// Not cut short by the shutdown: the final flush follows it.
			r.flushLastSeen(context.WithoutCancel(ctx))
			lastFlush = now
		}
	}
}

// stalled excuses the nodes for a gap that was the control plane's own.
func (r *Registry) stalled(now time.Time, gap time.Duration) {
	r.log.Warn("the control plane was held up; not counting the gap against nodes", "gap", gap.Round(time.Millisecond))
	r.mu.Lock()
	r.resumedAt = now
	r.mu.Unlock()
}

// Sweep moves nodes that have been silent too long to offline.
func (r *Registry) Sweep(now time.Time) {
	r.mu.Lock()
	if r.stopping {
		r.mu.Unlock()
		return
	}
	for id, e := range r.nodes {
		if e.flap.quiet > 0 && now.Sub(e.flap.start) >= FlapWindow {
			r.endFlap(id, e, now)
		}
		switch e.node.Status {
		case control.StatusOnline, control.StatusDisconnected:
			since := e.lastSeen()
			if r.resumedAt.After(since) {
				since = r.resumedAt
			}
			if silent := now.Sub(since); silent > r.cfg.OfflineAfter {
				r.transition(id, e, control.StatusOffline, fmt.Sprintf("no heartbeat for %s", silent.Round(time.Second)))
			}
		case control.StatusUnknown:
			if now.Sub(r.startedAt) > r.grace {
				r.transition(id, e, control.StatusOffline, "not seen since the control plane restarted")
			}
		}
	}
	r.mu.Unlock()
}

func (e *entry) lastSeen() time.Time {
	if e.lastBeat.After(e.node.LastSeen) {
		return e.lastBeat
	}
	return e.node.LastSeen
}

// transition changes a node's status in memory and queues the write, with
// its event unless the node is flapping. r.mu is held.
func (r *Registry) transition(id string, e *entry, to control.NodeStatus, reason string) {
	from := e.node.Status
	if from == to {
		return
	}
	now := r.clock.Now()
	if now.Sub(e.flap.start) >= FlapWindow {
		r.endFlap(id, e, now)
	}
	e.node.Status, e.node.StatusReason = to, reason
	r.metrics.Transition(string(from), string(to))
	change := control.StatusChange{NodeID: id, Status: to, Reason: reason}
	if e.flap.moves++; e.flap.moves > FlapBudget {
		if e.flap.quiet == 0 {
			e.flap.from = from
			r.log.Warn("node is flapping; its status changes are summed up in one event per window", "node_id", id, "changes", FlapBudget, "window", FlapWindow)
		}
		e.flap.quiet++
		change.Quiet = true
	} else {
		r.log.Info("node status", "node_id", id, "from", from, "to", to, "reason", reason)
	}
	r.writes <- change
}

// endFlap closes a node's flapping window: the moves written without events
// get one that sums them up, and a new window starts at now. r.mu is held.
func (r *Registry) endFlap(id string, e *entry, now time.Time) {
	if q := e.flap.quiet; q > 0 {
		reason := fmt.Sprintf("flapping: %d status changes in %s summed up in this event", q, now.Sub(e.flap.start).Round(time.Second))
		r.writes <- control.StatusChange{NodeID: id, Status: e.node.Status, Reason: reason, Coalesced: q, From: e.flap.from}
		r.log.Info("node status", "node_id", id, "from", e.flap.from, "to", e.node.Status, "reason", reason)
	}
	e.flap = flap{start: now}
}

// writer writes queued transitions, batching whatever has queued up into
// one transaction. A failed write (a full disk) is retried, never dropped.
func (r *Registry) writer(ctx context.Context) {
	var batch []control.StatusChange
	backoff := 100 * time.Millisecond
	for {
		if len(batch) == 0 {
			select {
			case <-ctx.Done():
				return
			case c := <-r.writes:
				batch = append(batch, c)
			}
		}
	more:
		for len(batch) < 1024 {
			select {
			case c := <-r.writes:
				batch = append(batch, c)
			default:
				break more
			}
		}
		if err := r.cfg.Store.SetNodeStatuses(ctx, batch, r.clock.Now()); err != nil {
			if ctx.Err() != nil {
				r.requeue(batch)
				return
			}
			r.metrics.StoreError()
			r.log.Error("cannot record node status changes; retrying", "changes", len(batch), "err", err)
			select {
			case <-ctx.Done():
				r.requeue(batch)
				return
			case <-r.clock.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		batch, backoff = batch[:0], 100*time.Millisecond
	}
}

// requeue puts unwritten changes back for the final drain.
func (r *Registry) requeue(batch []control.StatusChange) {
	for _, c := range batch {
		select {
		case r.writes <- c:
		default:
		}
	}
}

// drainWrites writes whatever is still queued (at shutdown).
func (r *Registry) drainWrites(ctx context.Context) {
	var batch []control.StatusChange
	for {
		select {
		case c := <-r.writes:
			batch = append(batch, c)
			continue
		default:
		}
		break
	}
	if len(batch) == 0 {
		return
	}
	if err := r.cfg.Store.SetNodeStatuses(ctx, batch, r.clock.Now()); err != nil {
		r.log.Error("cannot record node status changes at shutdown", "changes", len(batch), "err", err)
	}
}

// flushLastSeen writes the last-seen times that changed since the last flush.
func (r *Registry) flushLastSeen(ctx context.Context) {
	seen := map[string]time.Time{}
	r.mu.Lock()
	for id, e := range r.nodes {
		if e.dirty {
			seen[id] = e.lastBeat
			e.dirty = false
		}
	}
	r.mu.Unlock()
	if err := r.cfg.Store.UpdateLastSeen(ctx, seen); err != nil {
		r.metrics.StoreError()
		r.log.Error("cannot record last-seen times; will retry", "nodes", len(seen), "err", err)
		r.mu.Lock()
		for id := range seen {
			if e, ok := r.nodes[id]; ok {
				e.dirty = true
			}
		}
		r.mu.Unlock()
	}
}

// countByStatus counts the nodes in each status, for the metrics scrape.
func (r *Registry) countByStatus() map[string]int {
	counts := map[string]int{}
	r.mu.Lock()
	for _, e := range r.nodes {
		counts[string(e.node.Status)]++
	}
	r.mu.Unlock()
	return counts
}

// Node returns the live view of one node.
func (r *Registry) Node(id string) (View, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.nodes[id]
	if !ok {
		return View{}, false
	}
	return e.view(), true
}

// Nodes returns the live view of every node (removed ones excluded), by
// enrollment time.
func (r *Registry) Nodes() []View {
	r.mu.Lock()
	out := make([]View, 0, len(r.nodes))
	for _, e := range r.nodes {
		out = append(out, e.view())
	}
	r.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if !out[i].EnrolledAt.Equal(out[j].EnrolledAt) {
			return out[i].EnrolledAt.Before(out[j].EnrolledAt)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

func (e *entry) view() View {
	n := e.node
	n.LastSeen = e.lastSeen()
	return View{Node: n, System: e.system, Report: e.report}
}

// Enrolled adds a newly enrolled node.
func (r *Registry) Enrolled(n control.Node) {
	r.mu.Lock()
	if _, ok := r.nodes[n.ID]; !ok {
		r.nodes[n.ID] = &entry{node: n}
	}
	r.mu.Unlock()
}

// Drain marks a node draining (or not), persists it, and tells the node if
// it is connected.
func (r *Registry) Drain(ctx context.Context, id string, draining bool, reason string) (View, error) {
	n, err := r.cfg.Store.SetDraining(ctx, id, draining, reason, r.clock.Now())
	if err != nil {
		return View{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.nodes[id]
	if !ok {
		return View{Node: n}, nil
	}
	e.node.Draining = n.Draining
	if e.session != nil {
		kind := llorchv1.CommandKind_COMMAND_KIND_UNDRAIN
		if draining {
			kind = llorchv1.CommandKind_COMMAND_KIND_DRAIN
		}
		e.session.send(&llorchv1.Command{Kind: kind, Reason: reason})
	}
	return e.view(), nil
}

// Remove revokes a node: it is removed in the store and its session, if
// any, is closed.
func (r *Registry) Remove(ctx context.Context, id, reason string) (control.Node, error) {
	n, err := r.cfg.Store.RemoveNode(ctx, id, reason, r.clock.Now())
	if err != nil {
		return control.Node{}, err
	}
	r.mu.Lock()
	if e, ok := r.nodes[id]; ok {
		if e.session != nil {
			// The session ends once the edge has been told why.
			e.session.send(&llorchv1.Command{Kind: llorchv1.CommandKind_COMMAND_KIND_DISCONNECT, Reason: "node removed: " + reason})
			e.session = nil
			r.metrics.SessionClosed()
		}
		delete(r.nodes, id)
	}
	r.mu.Unlock()
	return n, nil
}

// RenewNow asks a connected node to renew its certificate now.
func (r *Registry) RenewNow(id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.nodes[id]
	if !ok {
		return fmt.Errorf("node %s: %w", id, control.ErrUnknownNode)
	}
	if e.session == nil {
		return fmt.Errorf("node %s: %w", id, control.ErrNotConnected)
	}
	e.session.send(&llorchv1.Command{Kind: llorchv1.CommandKind_COMMAND_KIND_RENEW_NOW, Reason: "requested by operator"})
	return nil
}

// DisconnectAll closes every session with a retry hint of restartFloor plus
// a part of the reconnect spread drawn uniformly, so that edges come back to
// the next process, spread out rather than all at once; new sessions are
// refused. It is called when the control plane shuts down, and stops
// sweeping: from then on a node's silence is the control plane's doing.
func (r *Registry) DisconnectAll(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopping = true
	spread := reconnectSpread(len(r.nodes))
	for _, e := range r.nodes {
		if e.session == nil {
			continue
		}
		wait := restartFloor + r.jitter(spread)
		e.session.send(&llorchv1.Command{Kind: llorchv1.CommandKind_COMMAND_KIND_DISCONNECT, Reason: reason, RetryAfter: durationProto(wait)})
	}
}
