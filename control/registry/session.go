package registry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/control"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// ErrSessionReplaced says the node opened a newer session; this one is over.
var ErrSessionReplaced = errors.New("session replaced by a newer one from the same node")

// Session is one edge's connected stream, as the registry sees it.
type Session struct {
	r        *Registry
	nodeID   string
	ctx      context.Context
	cancel   context.CancelFunc
	commands chan *llorchv1.Command
}

// Connect registers a node's new session and marks the node online. A
// session the node already had is ended: the newest one wins (the old TCP
// path may be half-dead). The session ends when ctx does.
func (r *Registry) Connect(ctx context.Context, nodeID string, system *llorchv1.NodeSystem, report *llorchv1.NodeStatusReport) (*Session, *llorchv1.Registered, error) {
	ctx, cancel := context.WithCancel(ctx)
	s := &Session{r: r, nodeID: nodeID, ctx: ctx, cancel: cancel, commands: make(chan *llorchv1.Command, 16)}
	now := r.clock.Now()
	r.mu.Lock()
	e, ok := r.nodes[nodeID]
	if !ok {
		r.mu.Unlock()
		cancel()
		return nil, nil, fmt.Errorf("node %s: %w", nodeID, ErrUnknownNode)
	}
	reason := "registered"
	if old := e.session; old != nil {
		old.cancel()
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
	r.mu.Unlock()
	return s, registered, nil
}

// Context ends when the session must end (replaced, node removed).
func (s *Session) Context() context.Context { return s.ctx }

// Commands delivers the commands to push to the edge.
func (s *Session) Commands() <-chan *llorchv1.Command { return s.commands }

// send queues a command; a session too slow to take its commands is ended.
// r.mu is held.
func (s *Session) send(c *llorchv1.Command) {
	select {
	case s.commands <- c:
	default:
		s.r.log.Warn("session not reading its commands; closing it", "node_id", s.nodeID)
		s.cancel()
	}
}

// Heartbeat records a heartbeat: in memory only.
func (s *Session) Heartbeat(report *llorchv1.NodeStatusReport) error {
	now := s.r.clock.Now()
	r := s.r
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.nodes[s.nodeID]
	if !ok || e.session != s {
		return ErrSessionReplaced
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

// Close ends the session. With goodbye the edge left on purpose and the node
// is offline at once; otherwise the stream was lost and the node is
// disconnected until it reconnects or OfflineAfter passes.
func (s *Session) Close(goodbye bool, reason string) {
	s.cancel()
	r := s.r
	r.mu.Lock()
	e, ok := r.nodes[s.nodeID]
	if !ok || e.session != s {
		r.mu.Unlock()
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
	r.mu.Unlock()
}

func durationProto(d time.Duration) *durationpb.Duration { return durationpb.New(d) }
