package edgetest

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/refusal"
)

// SessionService is a fake SessionService: each stream an edge opens is
// handed to the test (Next), which plays the control plane's side of it.
// Mount it with llorchv1connect.NewSessionServiceHandler.
type SessionService struct {
	streams chan *Stream
}

// NewSessionService returns a SessionService with no stream yet.
func NewSessionService() *SessionService {
	return &SessionService{streams: make(chan *Stream, 16)}
}

// Next waits for the next stream an edge opens.
func (s *SessionService) Next(tb testing.TB) *Stream {
	tb.Helper()
	select {
	case st := <-s.streams:
		return st
	case <-time.After(WaitLimit):
		tb.Fatal("no session stream opened")
		return nil
	}
}

// Streams delivers the streams edges open, for a test that serves them on
// goroutines of its own (Serve) instead of with Next.
func (s *SessionService) Streams() <-chan *Stream { return s.streams }

// NoStreamWithin fails the test if the edge opens a stream within d. It
// cannot prove that none comes later; tests use it only beside a check
// that does (the timer the edge asked for).
func (s *SessionService) NoStreamWithin(tb testing.TB, d time.Duration) {
	tb.Helper()
	select {
	case <-s.streams:
		tb.Fatalf("a session stream was opened within %s", d)
	case <-time.After(d):
	}
}

// Connect implements llorchv1connect.SessionServiceHandler: it hands the
// stream to the test and serves it until the test ends it, the edge says
// goodbye or closes its side, or the edge goes.
func (s *SessionService) Connect(ctx context.Context, bidi *connect.BidiStream[llorchv1.ConnectRequest, llorchv1.ConnectResponse]) error {
	st := &Stream{ctx: ctx, bidi: bidi, sendMu: &sync.Mutex{}, in: make(chan *llorchv1.ConnectRequest, 64), end: make(chan error, 1), received: make(chan struct{})}
	go st.receive()
	s.streams <- st
	var err error
	select {
	case err = <-st.end:
	case <-ctx.Done():
		err = ctx.Err()
	}
	// No Send may run once the handler returns.
	st.sendMu.Lock()
	st.closed = true
	st.sendMu.Unlock()
	return err
}

// Stream is one session stream, the control plane's side.
type Stream struct {
	ctx      context.Context
	bidi     *connect.BidiStream[llorchv1.ConnectRequest, llorchv1.ConnectResponse]
	sendMu   *sync.Mutex // Serve's acks and the test's commands
	closed   bool        // the handler returned; under sendMu
	in       chan *llorchv1.ConnectRequest
	recvErr  error         // why receiving stopped; read after received is closed
	received chan struct{} // closed when receiving stops
	end      chan error
}

// receive hands the edge's messages to the test. Like the control plane, it
// ends the stream after a Goodbye and when the edge closes its side.
func (st *Stream) receive() {
	defer close(st.received)
	for {
		m, err := st.bidi.Receive()
		if err != nil {
			st.recvErr = err
			st.End(nil)
			return
		}
		st.in <- m
		if m.GetGoodbye() != nil {
			st.End(nil)
		}
	}
}

// Recv returns the next message from the edge.
func (st *Stream) Recv(tb testing.TB) *llorchv1.ConnectRequest {
	tb.Helper()
	select {
	case m := <-st.in:
		return m
	case <-st.received:
		select {
		case m := <-st.in:
			return m
		default:
		}
		tb.Fatalf("the edge ended the stream (%v) instead of sending", st.recvErr)
	case <-time.After(WaitLimit):
		tb.Fatal("no message from the edge")
	}
	return nil
}

// NothingWithin fails the test if the edge sends a message within d.
func (st *Stream) NothingWithin(tb testing.TB, d time.Duration) {
	tb.Helper()
	select {
	case m := <-st.in:
		tb.Fatalf("unexpected message from the edge: %v", m)
	case <-time.After(d):
	}
}

// Register receives the edge's Register and answers Registered with the
// heartbeat interval.
func (st *Stream) Register(tb testing.TB, interval time.Duration) *llorchv1.Register {
	tb.Helper()
	m := st.Recv(tb)
	reg := m.GetRegister()
	if reg == nil {
		tb.Fatalf("first message %v, want Register", m)
	}
	st.Send(tb, &llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_Registered{Registered: &llorchv1.Registered{
		NodeId: "node-1", HeartbeatInterval: durationpb.New(interval),
	}}})
	return reg
}

// Send sends msg to the edge.
func (st *Stream) Send(tb testing.TB, msg *llorchv1.ConnectResponse) {
	tb.Helper()
	if err := st.send(msg); err != nil {
		tb.Fatalf("send %v: %v", msg, err)
	}
}

func (st *Stream) send(msg *llorchv1.ConnectResponse) error {
	st.sendMu.Lock()
	defer st.sendMu.Unlock()
	if st.closed {
		return errors.New("stream ended")
	}
	return st.bidi.Send(msg)
}

// Serve plays a well-behaved control plane on the stream until it ends:
// Registered with interval, then an ack for every heartbeat. The report of
// Register and of each heartbeat goes to report. It needs no testing.TB, so
// it can run on a goroutine of its own; commands can be sent meanwhile.
func (st *Stream) Serve(interval time.Duration, report func(*llorchv1.NodeStatusReport)) error {
	for {
		var m *llorchv1.ConnectRequest
		select {
		case m = <-st.in:
		case <-st.received:
			return st.recvErr
		case <-st.ctx.Done():
			return st.ctx.Err()
		}
		var err error
		switch {
		case m.GetRegister() != nil:
			report(m.GetRegister().GetStatus())
			err = st.send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_Registered{Registered: &llorchv1.Registered{
				NodeId: "node-1", HeartbeatInterval: durationpb.New(interval),
			}}})
		case m.GetHeartbeat() != nil:
			report(m.GetHeartbeat().GetStatus())
			err = st.send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_HeartbeatAck{HeartbeatAck: &llorchv1.HeartbeatAck{
				Seq: m.GetHeartbeat().GetSeq(), HeartbeatInterval: durationpb.New(interval),
			}}})
		}
		if err != nil {
			return err
		}
	}
}

// Command sends a command to the edge.
func (st *Stream) Command(tb testing.TB, cmd *llorchv1.Command) {
	tb.Helper()
	st.Send(tb, &llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_Command{Command: cmd}})
}

// End ends the stream with err (nil: a clean end).
func (st *Stream) End(err error) {
	select {
	case st.end <- err:
	default:
	}
}

// WaitClosed waits until the edge has closed its side of the stream (its
// sending side, or the whole stream) and returns what receiving said
// (io.EOF for a clean close).
func (st *Stream) WaitClosed(tb testing.TB) error {
	tb.Helper()
	select {
	case <-st.received:
		return st.recvErr
	case <-st.ctx.Done():
		return st.ctx.Err()
	case <-time.After(WaitLimit):
		tb.Fatal("the edge did not close the stream")
		return nil
	}
}

// Refusal is a Connect error as the control plane refuses with: code,
// Llorch-Reason (reason; "" none) and Llorch-Retry-After-Ms (retryAfter; 0 none).
func Refusal(code connect.Code, reason string, retryAfter time.Duration, msg string) *connect.Error {
	cerr := connect.NewError(code, errors.New(msg))
	if reason != "" {
		cerr.Meta().Set(refusal.ReasonHeader, reason)
	}
	if retryAfter > 0 {
		cerr.Meta().Set(refusal.RetryAfterHeader, strconv.FormatInt(retryAfter.Milliseconds(), 10))
	}
	return cerr
}
