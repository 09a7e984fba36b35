// Package session holds the edge's one long-lived session with the control
// plane: it dials out, registers, heartbeats at the interval the control plane
// sets, carries out the commands pushed back, and reconnects with
// exponential backoff and full jitter (honouring the control plane's retry
// hint) when the session is lost. The edge never listens on a port.
package session

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/internal/backoff"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// Dialer opens a session stream.
type Dialer interface {
	Connect(ctx context.Context) *connect.BidiStreamForClient[llorchv1.ConnectRequest, llorchv1.ConnectResponse]
}

// Config configures the session loop.
type Config struct {
	// Dial returns the dialer for the next session; it is called before
	// every attempt, so a renewed certificate is used from the next one on.
	Dial   func() Dialer
	System *llorchv1.NodeSystem
	// Report returns the status to send in the next heartbeat.
	Report func(ctx context.Context) *llorchv1.NodeStatusReport
	// Changed, when it fires, sends a heartbeat at once (nil: never).
	Changed <-chan struct{}
	// Reconnect, when it fires, ends the session and opens a new one at once
	// (after a renewal, so the new certificate is presented).
	Reconnect <-chan struct{}
	// OnRegistered and OnCommand let the agent act on what the control plane says.
	OnRegistered func(*llorchv1.Registered)
	OnCommand    func(*llorchv1.Command)
	// OnAck is called with each acknowledged heartbeat's round trip (for load tests).
	OnAck func(rtt time.Duration)
	// Lost, when not nil, is called when a session is lost, before the wait
	// for the next attempt: the agent drops its idle connections there, so
	// the next session dials afresh rather than reusing a connection the
	// network killed (after a partition TCP says so only once it heals, and
	// then seconds late).
	Lost func()
	// BackoffMin and BackoffMax bound the reconnect backoff; 0: 500ms and 10s.
	BackoffMin, BackoffMax time.Duration
	Clock                  clock.Clock  // nil: the wall clock
	Logger                 *slog.Logger // nil: discard
}

// registerTimeout is how long the edge waits for Registered before it gives
// the session up and reconnects.
const registerTimeout = 30 * time.Second

// tooLargeLogEvery is how often a report refused as too large is logged at
// ERROR while the refusals go on.
const tooLargeLogEvery = time.Minute

// Run keeps a session up until ctx ends, then says goodbye. It returns early
// only when the node can no longer act (revoked, expired, superseded): the
// error is then an *edge.RefusalError for which errors.Is(err,
// edge.ErrRevoked) (or ErrCertExpired, ErrSuperseded) holds.
//
// Every other loss is retried: after the control plane's retry hint when it
// gives one (a DISCONNECT's retry_after, or Llorch-Retry-After-Ms on an
// Unavailable or rate-limited refusal), else after the backoff. A report
// refused as too large is logged at ERROR (at most once a minute) and
// retried with the backoff, since the next report may be smaller.
func Run(ctx context.Context, cfg Config) error {
	if cfg.BackoffMin == 0 {
		cfg.BackoffMin = 500 * time.Millisecond
	}
	if cfg.BackoffMax == 0 {
		cfg.BackoffMax = 10 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	var (
		attempt        int
		interval       time.Duration // the heartbeat interval of the last session; 0 before one
		tooLargeLogged time.Time     // when a too-large refusal was last logged
	)
	for {
		res := runOnce(ctx, &cfg)
		if ctx.Err() != nil {
			return nil
		}
		if res.fatal != nil {
			return res.fatal
		}
		if res.interval > 0 {
			interval = res.interval
		}
		// A session that registered resets the backoff, unless its report
		// was refused: the next one would be refused again at once.
		if res.registered && !res.tooLarge {
			attempt = 0
		}
		if res.reconnect {
			cfg.Logger.Info("reconnecting with the renewed certificate")
			continue
		}
		if cfg.Lost != nil {
			cfg.Lost()
		}
		// Reconnect at least as often as the node heartbeats, so a passing
		// fault does not outlast the offline threshold (at least two
		// intervals); the control plane paces crowds with retry hints.
		ceiling := cfg.BackoffMax
		if interval > 0 {
			ceiling = min(ceiling, interval)
		}
		wait := backoff.FullJitter(attempt, cfg.BackoffMin, ceiling, rand.Float64())
		if res.retryAfter > 0 {
			wait = res.retryAfter
		}
		attempt++
		lost := cfg.Logger.Warn
		if res.tooLarge {
			lost = cfg.Logger.Debug
			if now := cfg.Clock.Now(); tooLargeLogged.IsZero() || now.Sub(tooLargeLogged) >= tooLargeLogEvery {
				tooLargeLogged = now
				cfg.Logger.Error("the control plane refused this node's report as too large; reduce the engine replicas or handoff files reported (dropped ones are counted)", "err", res.err)
			}
		}
		lost("session lost; reconnecting", "err", res.err, "in", wait.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return nil
		case <-cfg.Clock.After(wait):
		}
	}
}

// outcome is how one session ended.
type outcome struct {
	registered bool
	reconnect  bool          // to present a renewed certificate
	interval   time.Duration // the heartbeat interval the control plane set; 0: none
	retryAfter time.Duration // the control plane's retry hint; 0: none
	tooLarge   bool          // the control plane refused a message as too large
	err        error         // why the session ended; retried
	fatal      error         // the node can no longer act; not retried
}

type incoming struct {
	msg *llorchv1.ConnectResponse
	err error
}

type sessionStream = connect.BidiStreamForClient[llorchv1.ConnectRequest, llorchv1.ConnectResponse]

// session is one session from dial to loss.
type session struct {
	cfg       *Config
	stream    *sessionStream
	msgs      chan incoming // from the reader goroutine, once registering
	interval  time.Duration
	seq       uint64
	sent      map[uint64]time.Time // unacknowledged heartbeats
	lastHeard time.Time
}

// runOnce runs one session from dial to loss.
func runOnce(ctx context.Context, cfg *Config) outcome {
	streamCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s := &session{cfg: cfg, stream: cfg.Dial().Connect(streamCtx), sent: map[uint64]time.Time{}}
	defer func() {
		cancel()
		s.stream.CloseResponse()
	}()
	if out, ok := s.register(ctx, streamCtx); !ok {
		return out
	}
	out := s.run(ctx)
	out.registered, out.interval = true, s.interval
	return out
}

// register sends Register and waits for Registered; when it returns false
// the session is over and the outcome says why.
func (s *session) register(ctx, streamCtx context.Context) (outcome, bool) {
	register := &llorchv1.Register{System: s.cfg.System, Status: s.cfg.Report(ctx)}
	if err := s.stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: register}}); err != nil {
		if errors.Is(err, io.EOF) {
			// The server ended the stream; the real error comes from Receive
			// (nothing else reads the stream yet).
			_, err = s.stream.Receive()
		}
		return classify(err), false
	}
	s.msgs = make(chan incoming, 4)
	go s.receive(streamCtx)

	// The first answer must be Registered.
	var first incoming
	select {
	case first = <-s.msgs:
	case <-ctx.Done():
		// Stopped while registering: the control plane may have registered
		// the node already, so say goodbye all the same.
		s.goodbye()
		return outcome{}, false
	case <-s.cfg.Clock.After(registerTimeout):
		return outcome{err: fmt.Errorf("no answer to Register within %s", registerTimeout)}, false
	}
	if first.err != nil {
		return classify(first.err), false
	}
	registered := first.msg.GetRegistered()
	if registered == nil {
		return outcome{err: fmt.Errorf("unexpected first message %T", first.msg.GetMessage())}, false
	}
	if s.cfg.OnRegistered != nil {
		s.cfg.OnRegistered(registered)
	}
	s.interval = registered.GetHeartbeatInterval().AsDuration()
	if s.interval <= 0 {
		s.interval = 10 * time.Second
	}
	s.lastHeard = s.cfg.Clock.Now()
	s.cfg.Logger.Info("session registered", "heartbeat_interval", s.interval, "draining", registered.GetDraining())
	return outcome{}, true
}

// receive hands what the control plane sends to the session, until the
// stream fails or streamCtx ends.
func (s *session) receive(streamCtx context.Context) {
	for {
		m, err := s.stream.Receive()
		select {
		case s.msgs <- incoming{m, err}:
		case <-streamCtx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

// run heartbeats and handles what the control plane sends until the
// session is lost, ctx ends (goodbye) or a renewal asks for a reconnect.
func (s *session) run(ctx context.Context) outcome {
	next := s.cfg.Clock.After(s.interval)
	for {
		select {
		case <-ctx.Done():
			s.goodbye()
			return outcome{}
		case <-next:
			if silent := s.cfg.Clock.Now().Sub(s.lastHeard); silent > 3*s.interval {
				return outcome{err: fmt.Errorf("no word from the control plane for %s", silent.Round(time.Second))}
			}
			if err := s.beat(ctx); err != nil {
				return s.sendFailed(err)
			}
			next = s.cfg.Clock.After(s.interval)
		case <-s.cfg.Reconnect:
			s.stream.CloseRequest()
			return outcome{reconnect: true}
		case <-s.cfg.Changed:
			if err := s.beat(ctx); err != nil {
				return s.sendFailed(err)
			}
		case in := <-s.msgs:
			if in.err != nil {
				return classify(in.err)
			}
			if out, done := s.handle(in.msg); done {
				return out
			}
		}
	}
}

// beat sends the next heartbeat.
func (s *session) beat(ctx context.Context) error {
	s.seq++
	now := s.cfg.Clock.Now()
	s.sent[s.seq] = now
	hb := &llorchv1.Heartbeat{Seq: s.seq, SentAt: timestamppb.New(now), Status: s.cfg.Report(ctx)}
	return s.stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Heartbeat{Heartbeat: hb}})
}

// handle acts on one message from the control plane; done says the session
// is over (a DISCONNECT), and the outcome how.
func (s *session) handle(msg *llorchv1.ConnectResponse) (out outcome, done bool) {
	now := s.cfg.Clock.Now()
	s.lastHeard = now
	switch m := msg.GetMessage().(type) {
	case *llorchv1.ConnectResponse_HeartbeatAck:
		if at, ok := s.sent[m.HeartbeatAck.GetSeq()]; ok {
			if s.cfg.OnAck != nil {
				s.cfg.OnAck(now.Sub(at))
			}
			delete(s.sent, m.HeartbeatAck.GetSeq())
		}
		if d := m.HeartbeatAck.GetHeartbeatInterval().AsDuration(); d > 0 {
			s.interval = d
		}
	case *llorchv1.ConnectResponse_Command:
		cmd := m.Command
		s.cfg.Logger.Info("command from the control plane", "kind", cmd.GetKind().String(), "reason", cmd.GetReason())
		if cmd.GetKind() == llorchv1.CommandKind_COMMAND_KIND_DISCONNECT {
			return outcome{
				retryAfter: cmd.GetRetryAfter().AsDuration(),
				err:        fmt.Errorf("disconnected by the control plane: %s", cmd.GetReason()),
			}, true
		}
		if s.cfg.OnCommand != nil {
			s.cfg.OnCommand(cmd)
		}
	}
	// Keep the map of unacknowledged heartbeats small.
	for seq, at := range s.sent {
		if now.Sub(at) > 3*s.interval {
			delete(s.sent, seq)
		}
	}
	return outcome{}, false
}

// goodbye tells the control plane the edge is leaving on purpose, then waits
// briefly for it to close the stream.
func (s *session) goodbye() {
	err := s.stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Goodbye{Goodbye: &llorchv1.Goodbye{Reason: "shutdown"}}})
	s.stream.CloseRequest()
	if err != nil {
		return
	}
	deadline := s.cfg.Clock.After(2 * time.Second)
	for {
		select {
		case in := <-s.msgs:
			if in.err != nil {
				return
			}
		case <-deadline:
			return
		}
	}
}

// sendFailed explains a failed Send. Send says only io.EOF when the server
// ended the stream; the reason arrives on the reader goroutine, which owns
// Receive, so wait briefly for it there.
func (s *session) sendFailed(err error) outcome {
	if errors.Is(err, io.EOF) {
		select {
		case in := <-s.msgs:
			if in.err != nil {
				err = in.err
			}
		case <-s.cfg.Clock.After(2 * time.Second):
		}
	}
	return classify(err)
}

// classify turns a stream error into an outcome: refusals that mean the node
// can no longer act are fatal; anything else is retried, after the control
// plane's retry hint when it gave one.
func classify(err error) outcome {
	err = client.Explain(err)
	ref, ok := errors.AsType[*edge.RefusalError](err)
	if !ok {
		return outcome{err: err}
	}
	if errors.Is(ref, edge.ErrRevoked) || errors.Is(ref, edge.ErrCertExpired) || errors.Is(ref, edge.ErrSuperseded) {
		return outcome{fatal: err}
	}
	return outcome{err: err, retryAfter: ref.RetryAfter, tooLarge: errors.Is(ref, edge.ErrTooLarge)}
}
