package registry

import (
	"fmt"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/control"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// maxQueuedCommands bounds the commands waiting for one edge; a session
// whose queue overflows is ended.
const maxQueuedCommands = 16

// Stream is a connected edge's stream, as the registry drives it. The
// session's handler receives on it; the registry pushes commands and can end
// it.
type Stream interface {
	// Push sends a command to the edge. It may block while the connection
	// is slow; the registry calls it from a goroutine of its own, never
	// under its lock, one command at a time, in order. An error means the
	// stream is gone.
	Push(*llorchv1.Command) error
	// End makes the session's handler return: its pending receive fails at
	// once. It does not block, and does nothing once the handler returned.
	End()
}

// Session is one edge's connected stream, as the registry sees it.
//
// No goroutine waits on a session: its handler receives on the stream, and
// commands are pushed by a goroutine that lives only while commands are
// queued. At ten thousand edges every goroutine per session costs tens of
// megabytes (see docs/BENCHMARKS.md).
type Session struct {
	r      *Registry
	nodeID string
	stream Stream

	mu      sync.Mutex
	queue   []*llorchv1.Command
	pushing bool  // a goroutine is delivering the queue
	ended   error // why the control plane ended the session; nil while it runs
	closed  bool  // the handler closed it; nothing more is pushed
}

// Connect registers a node's new session and marks the node online. A
// session the node already had is ended: the newest one wins (the old TCP
// path may be half-dead). Commands for the node are pushed on stream from
// now on, so the caller must have sent Registered before anything else can
// be sent on it.
func (r *Registry) Connect(nodeID string, system *llorchv1.NodeSystem, report *llorchv1.NodeStatusReport, stream Stream) (*Session, *llorchv1.Registered, error) {
	s := &Session{r: r, nodeID: nodeID, stream: stream}
	now := r.clock.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.nodes[nodeID]
	if !ok {
		return nil, nil, fmt.Errorf("node %s: %w", nodeID, control.ErrUnknownNode)
	}
	reason := "registered"
	if old := e.session; old != nil {
		old.end(control.ErrSessionReplaced)
		reason = "reconnected (replacing its previous session)"
	} else {
		r.metrics.SessionOpened()
	}
	e.session, e.system, e.report = s, system, report
	e.lastBeat, e.dirty = now, true
	r.transition(nodeID, e, control.StatusOnline, reason)
	registered := &llorchv1.Registered{
		NodeId:            nodeID,
		HeartbeatInterval: durationProto(r.cfg.HeartbeatInterval),
		Draining:          e.node.Draining,
	}
	return s, registered, nil
}

// NodeID is the node the session belongs to.
func (s *Session) NodeID() string { return s.nodeID }

// Ended says why the control plane ended the session (wrapping
// control.ErrSessionReplaced, control.ErrDisconnected or control.ErrTooSlow); nil if it did not.
func (s *Session) Ended() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ended
}

// send queues a command for the edge. r.mu may be held: it never blocks.
func (s *Session) send(c *llorchv1.Command) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended != nil || s.closed {
		return
	}
	if len(s.queue) >= maxQueuedCommands {
		s.r.log.Warn("session not taking its commands; closing it", "node_id", s.nodeID)
		s.endLocked(control.ErrTooSlow)
		return
	}
	s.queue = append(s.queue, c)
	if !s.pushing {
		s.pushing = true
		go s.push()
	}
}

// push delivers the queued commands in order, and ends the session after a
// DISCONNECT has gone out.
func (s *Session) push() {
	for {
		s.mu.Lock()
		if len(s.queue) == 0 || s.ended != nil || s.closed {
			s.queue, s.pushing = nil, false
			s.mu.Unlock()
			return
		}
		c := s.queue[0]
		s.queue = s.queue[1:]
		s.mu.Unlock()
		if err := s.stream.Push(c); err != nil {
			s.end(fmt.Errorf("session lost: cannot push a command: %w", err))
			continue
		}
		if c.GetKind() == llorchv1.CommandKind_COMMAND_KIND_DISCONNECT {
			s.end(fmt.Errorf("%w: %s", control.ErrDisconnected, c.GetReason()))
		}
	}
}

// end ends the session from the control plane's side.
func (s *Session) end(why error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endLocked(why)
}

func (s *Session) endLocked(why error) {
	if s.ended != nil || s.closed {
		return
	}
	s.ended = why
	s.stream.End()
}

// Heartbeat records a heartbeat: in memory only.
func (s *Session) Heartbeat(report *llorchv1.NodeStatusReport) error {
	now := s.r.clock.Now()
	r := s.r
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.nodes[s.nodeID]
	if !ok || e.session != s {
		return control.ErrSessionReplaced
	}
	e.lastBeat, e.dirty = now, true
	if report != nil {
		e.report = report
	}
	if e.node.Status != control.StatusOnline {
		r.transition(s.nodeID, e, control.StatusOnline, "heartbeat resumed")
	}
	r.metrics.Heartbeat()
	return nil
}

// Close is called by the session's handler when it is done with the stream:
// nothing is pushed on it from now on. With goodbye the edge left on purpose
// and the node is offline at once; otherwise the stream was lost (or the
// control plane ended it) and the node is disconnected until it reconnects
// or OfflineAfter passes.
func (s *Session) Close(goodbye bool, reason string) {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	r := s.r
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.nodes[s.nodeID]
	if !ok || e.session != s {
		return
	}
	e.session = nil
	r.metrics.SessionClosed()
	switch {
	case goodbye:
		r.transition(s.nodeID, e, control.StatusOffline, reason)
	case e.node.Status == control.StatusOnline:
		// An offline node whose dead stream is found only now stays offline.
		r.transition(s.nodeID, e, control.StatusDisconnected, reason)
	}
}

func durationProto(d time.Duration) *durationpb.Duration { return durationpb.New(d) }
