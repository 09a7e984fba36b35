package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/registry"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// DefaultRegisterTimeout bounds the wait for an edge's first message.
const DefaultRegisterTimeout = 30 * time.Second

type sessionHTTPKey struct{}

// sessionHTTP is what Connect needs of a session's HTTP request that Connect
// RPC hides: the response controller (read deadlines) and the request body.
type sessionHTTP struct {
	ctl  *http.ResponseController
	body *sessionBody
}

// SessionHTTP wraps the SessionService handler so that Connect can set its
// stream's read deadline (an edge that never registers, or a session the
// control plane ends, gets its pending receive to fail at once) and wait for
// the next message on the request body itself (see sessionBody).
func SessionHTTP(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := &sessionHTTP{ctl: http.NewResponseController(w), body: &sessionBody{ReadCloser: r.Body}}
		r = r.WithContext(context.WithValue(r.Context(), sessionHTTPKey{}, h))
		r.Body = h.body
		next.ServeHTTP(w, r)
	})
}

// sessionBody lets the session handler wait for the edge's next message
// with a shallow stack. A goroutine keeps the stack of the deepest point it
// parks at (the runtime halves a stack only while a quarter of it is
// unused), and Connect RPC's Receive parks deep enough to keep 16 KiB per
// session; waiting here keeps 8 KiB. wait blocks until the first byte of the
// next message has arrived; Receive then decodes it, through Read, without
// parking.
type sessionBody struct {
	io.ReadCloser
	next     [1]byte
	buffered bool  // next holds the first byte of the next message
	err      error // what wait's read returned; Read returns it
}

// wait blocks until the next message starts or the body fails.
func (b *sessionBody) wait() {
	if b.buffered || b.err != nil {
		return
	}
	n, err := b.ReadCloser.Read(b.next[:])
	b.buffered = n == 1
	if n == 0 {
		b.err = err
	}
}

func (b *sessionBody) Read(p []byte) (int, error) {
	switch {
	case len(p) == 0:
		return 0, nil
	case b.buffered:
		p[0], b.buffered = b.next[0], false
		return 1, nil
	case b.err != nil:
		return 0, b.err
	}
	return b.ReadCloser.Read(p)
}

type bidiStream = connect.BidiStream[llorchv1.ConnectRequest, llorchv1.ConnectResponse]

// Connect holds one edge's session on this one goroutine: a Register first,
// then heartbeats, each acknowledged. Commands are pushed by the registry on
// the same stream, from a goroutine of its own. While it waits, a session
// costs this goroutine and nothing more; its frame stays small, because it
// is on the stack the whole session long.
func (s *Server) Connect(ctx context.Context, stream *bidiStream) error {
	h, ok := ctx.Value(sessionHTTPKey{}).(*sessionHTTP)
	if !ok {
		return s.fail(ctx, errors.New("session handler mounted without SessionHTTP"))
	}
	out := &sessionStream{stream: stream, ctl: h.ctl}
	defer out.finish()
	sess, interval, err := s.openSession(ctx, out)
	if sess == nil {
		return err
	}
	return s.serveSession(ctx, sess, out, h.body, interval)
}

// openSession admits the session, waits for Register, registers the node
// and answers Registered. A nil session means the stream is over, with the
// error to return.
func (s *Server) openSession(ctx context.Context, out *sessionStream) (*registry.Session, *durationpb.Duration, error) {
	c, err := s.nodeCaller(ctx)
	if err != nil {
		return nil, nil, err
	}
	if ok, wait := s.cfg.NodeSessions.Allow(c.NodeID); !ok {
		s.cfg.Metrics.Limited("node_sessions")
		return nil, nil, s.fail(ctx, &control.RetryLater{Err: fmt.Errorf("%w: node %s opens sessions too often", control.ErrRateLimited, c.NodeID), After: wait})
	}
	if ok, wait := s.cfg.Registry.Admit(); !ok {
		return nil, nil, s.fail(ctx, &control.RetryLater{Err: fmt.Errorf("%w: too many sessions registering at once", control.ErrBusy), After: wait})
	}
	// Deadlines on the stream run on the wall clock, as the HTTP/2 server does.
	if err := out.ctl.SetReadDeadline(time.Now().Add(s.cfg.RegisterTimeout)); err != nil {
		return nil, nil, s.fail(ctx, fmt.Errorf("session read deadline: %w", err))
	}
	first, err := out.stream.Receive()
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return nil, nil, s.fail(ctx, fmt.Errorf("no Register message within %s: %w", s.cfg.RegisterTimeout, context.DeadlineExceeded))
	}
	if err != nil {
		return nil, nil, receiveFailed(ctx, s, err)
	}
	out.ctl.SetReadDeadline(time.Time{})
	reg := first.GetRegister()
	if reg == nil {
		return nil, nil, s.fail(ctx, fmt.Errorf("%w: the first message of a session must be Register", control.ErrInvalidArgument))
	}
	// Registered goes out before any command the registry pushes.
	out.sendMu.Lock()
	defer out.sendMu.Unlock()
	sess, registered, err := s.cfg.Registry.Connect(c.NodeID, reg.GetSystem(), reg.GetStatus(), out)
	if err != nil {
		return nil, nil, s.fail(ctx, err)
	}
	if err := out.stream.Send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_Registered{Registered: registered}}); err != nil {
		sess.Close(false, "session lost: "+lostReason(err))
		return nil, nil, nil
	}
	s.log.InfoContext(ctx, "session opened", "node_id", c.NodeID, "hostname", reg.GetSystem().GetHostname(), "agent_version", reg.GetSystem().GetAgentVersion())
	return sess, registered.GetHeartbeatInterval(), nil
}

// serveSession receives heartbeats and acknowledges them until the stream
// ends, the edge says goodbye, or the control plane ends the session.
func (s *Server) serveSession(ctx context.Context, sess *registry.Session, out *sessionStream, body *sessionBody, interval *durationpb.Duration) error {
	for {
		body.wait()
		msg, err := out.stream.Receive()
		if err != nil {
			return s.endSession(ctx, sess, err)
		}
		switch m := msg.GetMessage().(type) {
		case *llorchv1.ConnectRequest_Heartbeat:
			if err := sess.Heartbeat(m.Heartbeat.GetStatus()); err != nil {
				return s.fail(ctx, err)
			}
			ack := &llorchv1.HeartbeatAck{Seq: m.Heartbeat.GetSeq(), HeartbeatInterval: interval}
			if err := out.send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_HeartbeatAck{HeartbeatAck: ack}}); err != nil {
				sess.Close(false, "session lost: "+lostReason(err))
				return nil
			}
		case *llorchv1.ConnectRequest_Goodbye:
			reason := m.Goodbye.GetReason()
			if reason == "" {
				reason = "shutdown"
			}
			sess.Close(true, reason)
			s.log.InfoContext(ctx, "session closed by the edge", "node_id", sess.NodeID(), "reason", reason)
			return nil
		default:
			sess.Close(false, "protocol error")
			return s.fail(ctx, fmt.Errorf("%w: unexpected message %T after Register", control.ErrInvalidArgument, m))
		}
	}
}

// endSession closes a session whose stream failed with err, and says what
// the edge is told: why the control plane ended it; or, when the stream was
// lost or the control plane disconnected it, nothing more, unless its
// message was refused as too large (it should know).
func (s *Server) endSession(ctx context.Context, sess *registry.Session, err error) error {
	why := sess.Ended()
	switch {
	case why == nil:
		sess.Close(false, "session lost: "+lostReason(err))
		return receiveFailed(ctx, s, err)
	case errors.Is(why, control.ErrDisconnected):
		sess.Close(false, why.Error())
		return nil
	}
	sess.Close(false, why.Error())
	return s.fail(ctx, why)
}

// receiveFailed is what the edge is told when receiving its next message
// failed: that it was too large (Connect's read limit), or nothing (the
// stream is gone).
func receiveFailed(ctx context.Context, s *Server, err error) error {
	if connect.CodeOf(err) == connect.CodeResourceExhausted {
		return s.fail(ctx, err)
	}
	return nil
}

// sessionStream is the registry's handle on a session's stream. Commands are
// pushed from the registry's goroutine while the handler receives and
// acknowledges on its own, so sends are serialized; once the handler
// returns, the stream is never touched again (the HTTP/2 server forbids it).
type sessionStream struct {
	stream *bidiStream
	ctl    *http.ResponseController

	sendMu sync.Mutex // one Send at a time; held across a Send
	mu     sync.Mutex // guards done for End, which must not wait for a Send
	done   bool       // the handler has returned; written with both locks held
}

var errStreamDone = errors.New("the session's stream is closed")

func (s *sessionStream) send(m *llorchv1.ConnectResponse) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	if s.done {
		return errStreamDone
	}
	return s.stream.Send(m)
}

// Push implements registry.Stream.
func (s *sessionStream) Push(c *llorchv1.Command) error {
	return s.send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_Command{Command: c}})
}

// pastDeadline is any time before now: a read deadline there fails a
// pending receive at once.
var pastDeadline = time.Unix(1, 0)

// End implements registry.Stream: the pending receive fails at once.
func (s *sessionStream) End() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done {
		s.ctl.SetReadDeadline(pastDeadline)
	}
}

// finish marks the stream done as the handler returns, after any push in
// flight.
func (s *sessionStream) finish() {
	s.sendMu.Lock()
	s.mu.Lock()
	s.done = true
	s.mu.Unlock()
	s.sendMu.Unlock()
}

func lostReason(err error) string {
	if connect.CodeOf(err) == connect.CodeCanceled || errors.Is(err, context.Canceled) {
		return "connection closed"
	}
	return err.Error()
}
