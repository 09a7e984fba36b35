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
	// BackoffMin and BackoffMax bound the reconnect backoff; 0: 500ms and 10s.
	BackoffMin, BackoffMax time.Duration
	Clock                  clock.Clock  // nil: the wall clock
	Logger                 *slog.Logger // nil: discard
}

// Run keeps a session up until ctx ends, then says goodbye. It returns early
// only when the node can no longer act (revoked, expired, superseded).
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
	attempt := 0
	var interval time.Duration // the heartbeat interval of the last session; 0 before one
	for {
		res := runOnce(ctx, cfg, &interval)
		if ctx.Err() != nil {
			return nil
		}
		if res.fatal != nil {
			return res.fatal
		}
		if res.registered {
			attempt = 0
		}
		if res.reconnect {
			cfg.Logger.Info("reconnecting with the renewed certificate")
			continue
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
		cfg.Logger.Warn("session lost; reconnecting", "err", res.err, "in", wait.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return nil
		case <-cfg.Clock.After(wait):
		}
	}
}

type outcome struct {
	registered bool
	reconnect  bool
	retryAfter time.Duration
	err        error
	fatal      error
}

type incoming struct {
	msg *llorchv1.ConnectResponse
	err error
}

// runOnce runs one session from dial to loss.
func runOnce(ctx context.Context, cfg Config, lastInterval *time.Duration) (out outcome) {
	streamCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stream := cfg.Dial().Connect(streamCtx)
	defer func() {
		cancel()
		stream.CloseResponse()
	}()
	register := &llorchv1.Register{System: cfg.System, Status: cfg.Report(ctx)}
	if err := stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: register}}); err != nil {
		if errors.Is(err, io.EOF) {
			// The server ended the stream; the real error comes from Receive
			// (nothing else reads the stream yet).
			_, err = stream.Receive()
		}
		return classify(err)
	}
	msgs := make(chan incoming, 4)
	go func() {
		for {
			m, err := stream.Receive()
			select {
			case msgs <- incoming{m, err}:
			case <-streamCtx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()

	// The first answer must be Registered.
	var first incoming
	select {
	case first = <-msgs:
	case <-ctx.Done():
		// Stopped while registering: the control plane may have registered
		// the node already, so say goodbye all the same.
		goodbye(stream, msgs, cfg.Clock)
		return outcome{}
	case <-cfg.Clock.After(30 * time.Second):
		return outcome{err: errors.New("no answer to Register within 30s")}
	}
	if first.err != nil {
		return classify(first.err)
	}
	registered := first.msg.GetRegistered()
	if registered == nil {
		return outcome{err: fmt.Errorf("unexpected first message %T", first.msg.GetMessage())}
	}
	out.registered = true
	if cfg.OnRegistered != nil {
		cfg.OnRegistered(registered)
	}
	interval := registered.GetHeartbeatInterval().AsDuration()
	if interval <= 0 {
		interval = 10 * time.Second
	}
	*lastInterval = interval
	cfg.Logger.Info("session registered", "heartbeat_interval", interval, "draining", registered.GetDraining())

	var (
		seq       uint64
		sent      = map[uint64]time.Time{}
		lastHeard = cfg.Clock.Now()
		next      = cfg.Clock.After(interval)
	)
	beat := func() error {
		seq++
		now := cfg.Clock.Now()
		sent[seq] = now
		hb := &llorchv1.Heartbeat{Seq: seq, SentAt: timestamppb.New(now), Status: cfg.Report(ctx)}
		return stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Heartbeat{Heartbeat: hb}})
	}
	for {
		select {
		case <-ctx.Done():
			goodbye(stream, msgs, cfg.Clock)
			return outcome{}
		case <-next:
			if cfg.Clock.Now().Sub(lastHeard) > 3*interval {
				out.err = fmt.Errorf("no word from the control plane for %s", cfg.Clock.Now().Sub(lastHeard).Round(time.Second))
				return out
			}
			if err := beat(); err != nil {
				r := sendFailed(err, msgs, cfg.Clock)
				r.registered = true
				return r
			}
			next = cfg.Clock.After(interval)
		case <-cfg.Reconnect:
			stream.CloseRequest()
			return outcome{registered: true, reconnect: true}
		case <-cfg.Changed:
			if err := beat(); err != nil {
				r := sendFailed(err, msgs, cfg.Clock)
				r.registered = true
				return r
			}
		case in := <-msgs:
			if in.err != nil {
				r := classify(in.err)
				r.registered = true
				return r
			}
			lastHeard = cfg.Clock.Now()
			switch m := in.msg.GetMessage().(type) {
			case *llorchv1.ConnectResponse_HeartbeatAck:
				if at, ok := sent[m.HeartbeatAck.GetSeq()]; ok {
					if cfg.OnAck != nil {
						cfg.OnAck(cfg.Clock.Now().Sub(at))
					}
					delete(sent, m.HeartbeatAck.GetSeq())
				}
				if d := m.HeartbeatAck.GetHeartbeatInterval().AsDuration(); d > 0 && d != interval {
					interval, *lastInterval = d, d
				}
			case *llorchv1.ConnectResponse_Command:
				cmd := m.Command
				cfg.Logger.Info("command from the control plane", "kind", cmd.GetKind().String(), "reason", cmd.GetReason())
				if cmd.GetKind() == llorchv1.CommandKind_COMMAND_KIND_DISCONNECT {
					out.retryAfter = cmd.GetRetryAfter().AsDuration()
					out.err = fmt.Errorf("disconnected by the control plane: %s", cmd.GetReason())
					return out
				}
				if cfg.OnCommand != nil {
					cfg.OnCommand(cmd)
				}
			}
			// Keep the map of unacknowledged heartbeats small.
			for s, at := range sent {
				if cfg.Clock.Now().Sub(at) > 3*interval {
					delete(sent, s)
				}
			}
		}
	}
}

// goodbye tells the control plane the edge is leaving on purpose, then waits
// briefly for it to close the stream.
func goodbye(stream *connect.BidiStreamForClient[llorchv1.ConnectRequest, llorchv1.ConnectResponse], msgs <-chan incoming, clk clock.Clock) {
	err := stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Goodbye{Goodbye: &llorchv1.Goodbye{Reason: "shutdown"}}})
	stream.CloseRequest()
	if err != nil {
		return
	}
	deadline := clk.After(2 * time.Second)
	for {
		select {
		case in := <-msgs:
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
func sendFailed(err error, msgs <-chan incoming, clk clock.Clock) outcome {
	if errors.Is(err, io.EOF) {
		select {
		case in := <-msgs:
			if in.err != nil {
				err = in.err
			}
		case <-clk.After(2 * time.Second):
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
	return outcome{err: err, retryAfter: ref.RetryAfter}
}
