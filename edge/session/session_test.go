package session_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/internal/edgetest"
	"github.com/llorch/llorch/edge/session"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/refusal"
)

// registerTimeout is the session's wait for Registered.
const registerTimeout = 30 * time.Second

// env is one edge session against a fake control plane, on a fake clock.
type env struct {
	svc      *edgetest.SessionService
	srv      *edgetest.Server
	clk      *edgetest.Clock
	cfg      session.Config
	commands chan *llorchv1.Command
	acks     chan time.Duration
	logs     *logBuffer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ca := edgetest.NewCA(t)
	svc := edgetest.NewSessionService()
	mux := http.NewServeMux()
	mux.Handle(llorchv1connect.NewSessionServiceHandler(svc))
	srv := edgetest.NewServer(t, ca, mux)
	hc := client.HTTPClient(client.NewIdentity(ca.Identity(t, "node-1", srv.URL)))
	t.Cleanup(func() { hc.CloseIdleConnections() })
	e := &env{svc: svc, srv: srv, clk: edgetest.NewClock(), commands: make(chan *llorchv1.Command, 8), acks: make(chan time.Duration, 8), logs: &logBuffer{}}
	e.cfg = session.Config{
		Dial: func() session.Dialer { return llorchv1connect.NewSessionServiceClient(hc, srv.URL) },
		// As the agent does: a lost session's connection is not reused.
		Lost:   func() { old := hc; hc = client.Fresh(old); old.CloseIdleConnections() },
		System: &llorchv1.NodeSystem{Hostname: "gpu-host", Os: "linux", Arch: "amd64"},
		Report: func(context.Context) *llorchv1.NodeStatusReport {
			return &llorchv1.NodeStatusReport{Pools: []*llorchv1.Pool{{Id: "pool-0"}}}
		},
		OnCommand: func(c *llorchv1.Command) { e.commands <- c },
		OnAck:     func(rtt time.Duration) { e.acks <- rtt },
		Clock:     e.clk,
		Logger:    slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	return e
}

// start runs the session until the test ends; the channel gets Run's error.
func (e *env) start(t *testing.T) (done <-chan error, cancel context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		errc <- session.Run(ctx, e.cfg)
		close(finished)
	}()
	t.Cleanup(func() {
		cancel()
		// Run may be waiting on the fake clock (goodbye waits 2s for the
		// stream to end).
		deadline := time.After(edgetest.WaitLimit)
		for {
			select {
			case <-finished:
				return
			case <-deadline:
				t.Error("Run did not return after its context ended")
				return
			case <-time.After(10 * time.Millisecond):
				e.clk.Advance(time.Second)
			}
		}
	})
	return errc, cancel
}

func waitDone(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(edgetest.WaitLimit):
		t.Fatal("Run did not return")
		return nil
	}
}

// logBuffer collects the session's log lines.
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

func TestRegistersAndHeartbeatsAtTheServersInterval(t *testing.T) {
	e := newEnv(t)
	e.start(t)
	st := e.svc.Next(t)
	reg := st.Register(t, 7*time.Second)
	if reg.GetSystem().GetHostname() != "gpu-host" || len(reg.GetStatus().GetPools()) != 1 {
		t.Errorf("Register = %v, want the system and the report", reg)
	}
	if peers := e.srv.Peers(llorchv1connect.SessionServiceConnectProcedure); len(peers) != 1 || peers[0] != "node-1" {
		t.Errorf("client certificates seen: %v, want node-1's", peers)
	}

	e.clk.WaitAfter(t, 7*time.Second)
	st.NothingWithin(t, 50*time.Millisecond) // nothing before the interval
	e.clk.Advance(7 * time.Second)
	hb := st.Recv(t).GetHeartbeat()
	if hb.GetSeq() != 1 || len(hb.GetStatus().GetPools()) != 1 {
		t.Fatalf("first heartbeat = %v, want seq 1 with the report", hb)
	}

	// The ack sets a new interval, used from the next heartbeat on.
	st.Send(t, &llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_HeartbeatAck{HeartbeatAck: &llorchv1.HeartbeatAck{
		Seq: 1, HeartbeatInterval: durationpb.New(3 * time.Second),
	}}})
	select {
	case rtt := <-e.acks:
		if rtt != 0 {
			t.Errorf("round trip %v on a clock that did not move, want 0", rtt)
		}
	case <-time.After(edgetest.WaitLimit):
		t.Fatal("the ack was not seen")
	}
	e.clk.Advance(7 * time.Second) // the timer set before the ack
	if hb := st.Recv(t).GetHeartbeat(); hb.GetSeq() != 2 {
		t.Fatalf("second heartbeat = %v, want seq 2", hb)
	}
	// Acked, or the edge gives up on a control plane silent for three intervals.
	st.Send(t, &llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_HeartbeatAck{HeartbeatAck: &llorchv1.HeartbeatAck{Seq: 2}}})
	<-e.acks
	e.clk.WaitAfter(t, 3*time.Second)
	e.clk.Advance(3 * time.Second)
	if hb := st.Recv(t).GetHeartbeat(); hb.GetSeq() != 3 {
		t.Fatalf("third heartbeat = %v, want seq 3", hb)
	}
}

// A control plane that falls silent (a partition, as far as the edge can
// tell) loses the session after three intervals, and the next session is
// dialed on a new connection: the old one may be dead without TCP knowing,
// and would hold the next attempt until the path heals.
func TestLostSessionDialsAFreshConnection(t *testing.T) {
	e := newEnv(t)
	e.start(t)
	st := e.svc.Next(t)
	st.Register(t, time.Second)
	for i := 1; i <= 4; i++ { // heartbeats that get no ack
		e.clk.WaitAfter(t, time.Second)
		e.clk.Advance(time.Second)
		if i < 4 {
			st.Recv(t)
		}
	}
	st.WaitClosed(t)
	st.End(nil)
	backoff := e.clk.NextAfter(t)
	e.clk.Advance(backoff)
	e.svc.Next(t).Register(t, time.Hour)
	if n := e.srv.Conns(); n != 2 {
		t.Errorf("%d connections for two sessions, want a new one for the second", n)
	}
}

func TestChangedSendsAHeartbeatAtOnce(t *testing.T) {
	e := newEnv(t)
	changed := make(chan struct{}, 1)
	e.cfg.Changed = changed
	e.start(t)
	st := e.svc.Next(t)
	st.Register(t, time.Hour)
	e.clk.WaitAfter(t, time.Hour)
	changed <- struct{}{}
	if hb := st.Recv(t).GetHeartbeat(); hb.GetSeq() != 1 {
		t.Fatalf("heartbeat = %v, want seq 1 at once", hb)
	}
}

func TestCommandsReachOnCommand(t *testing.T) {
	e := newEnv(t)
	e.start(t)
	st := e.svc.Next(t)
	st.Register(t, time.Hour)
	for _, kind := range []llorchv1.CommandKind{llorchv1.CommandKind_COMMAND_KIND_DRAIN, llorchv1.CommandKind_COMMAND_KIND_UNDRAIN} {
		st.Command(t, &llorchv1.Command{Kind: kind, Reason: "maintenance"})
		select {
		case c := <-e.commands:
			if c.GetKind() != kind || c.GetReason() != "maintenance" {
				t.Errorf("OnCommand got %v, want %v", c, kind)
			}
		case <-time.After(edgetest.WaitLimit):
			t.Fatalf("%v did not reach OnCommand", kind)
		}
	}
}

func TestDisconnectWaitsRetryAfter(t *testing.T) {
	e := newEnv(t)
	e.start(t)
	st := e.svc.Next(t)
	st.Register(t, time.Hour)
	st.Command(t, &llorchv1.Command{Kind: llorchv1.CommandKind_COMMAND_KIND_DISCONNECT, Reason: "control plane shutting down", RetryAfter: durationpb.New(42 * time.Second)})
	st.WaitClosed(t)
	st.End(nil)
	select {
	case c := <-e.commands:
		t.Errorf("DISCONNECT reached OnCommand: %v", c)
	default:
	}

	// The next dial waits the hint, not the backoff (at most 500ms here).
	e.clk.WaitAfter(t, 42*time.Second)
	e.clk.Advance(41 * time.Second)
	e.svc.NoStreamWithin(t, 100*time.Millisecond)
	e.clk.Advance(time.Second)
	e.svc.Next(t).Register(t, time.Hour)
}

func TestFatalRefusals(t *testing.T) {
	for _, tt := range []struct {
		reason string
		code   connect.Code
		want   error
	}{
		{refusal.Revoked, connect.CodePermissionDenied, edge.ErrRevoked},
		{refusal.Expired, connect.CodeUnauthenticated, edge.ErrCertExpired},
		{refusal.Superseded, connect.CodePermissionDenied, edge.ErrSuperseded},
	} {
		t.Run(tt.reason, func(t *testing.T) {
			e := newEnv(t)
			done, _ := e.start(t)
			e.svc.Next(t).End(edgetest.Refusal(tt.code, tt.reason, 0, "node node-1: refused"))
			err := waitDone(t, done)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Run = %v, want %v", err, tt.want)
			}
			if _, ok := errors.AsType[*edge.RefusalError](err); !ok {
				t.Errorf("Run = %T, want an *edge.RefusalError", err)
			}
			e.svc.NoStreamWithin(t, 100*time.Millisecond)
		})
	}
}

// A refusal with a retry hint (pacing on Unavailable, a rate limit on
// ResourceExhausted) delays the next dial by the hint.
func TestRetryHintDelaysRedial(t *testing.T) {
	for _, tt := range []struct {
		name   string
		code   connect.Code
		reason string
	}{
		{"rate limited", connect.CodeResourceExhausted, refusal.RateLimited},
		{"paced", connect.CodeUnavailable, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			done, _ := e.start(t)
			e.svc.Next(t).End(edgetest.Refusal(tt.code, tt.reason, 4*time.Second, "slow down"))
			e.clk.WaitAfter(t, 4*time.Second)
			e.clk.Advance(4*time.Second - time.Millisecond)
			e.svc.NoStreamWithin(t, 100*time.Millisecond)
			e.clk.Advance(time.Millisecond)
			e.svc.Next(t).Register(t, time.Hour)
			select {
			case err := <-done:
				t.Fatalf("Run returned %v on a retryable refusal", err)
			default:
			}
		})
	}
}

func TestGoodbyeOnCancel(t *testing.T) {
	e := newEnv(t)
	done, cancel := e.start(t)
	st := e.svc.Next(t)
	st.Register(t, time.Hour)
	cancel()
	bye := st.Recv(t).GetGoodbye()
	if bye.GetReason() != "shutdown" {
		t.Fatalf("after cancel the edge sent %v, want Goodbye{shutdown}", bye)
	}
	st.End(nil)
	if err := waitDone(t, done); err != nil {
		t.Errorf("Run = %v after cancel, want nil", err)
	}
}

func TestNoAnswerToRegister(t *testing.T) {
	e := newEnv(t)
	e.start(t)
	st := e.svc.Next(t)
	if st.Recv(t).GetRegister() == nil {
		t.Fatal("first message is not Register")
	}
	e.clk.WaitAfter(t, registerTimeout)
	e.clk.Advance(registerTimeout)
	st.WaitClosed(t) // the edge gave the stream up
	st.End(nil)
	backoff := e.clk.NextAfter(t)
	if backoff > 500*time.Millisecond {
		t.Errorf("first backoff %v, want at most 500ms", backoff)
	}
	e.clk.Advance(backoff)
	e.svc.Next(t).Register(t, time.Hour)
	if n := e.logs.count("no answer to Register within 30s"); n != 1 {
		t.Errorf("logged the Register timeout %d times, want once", n)
	}
}

// A report refused as too large is logged at ERROR, at most once a minute,
// and retried with the backoff.
func TestTooLargeLoggedOnceAMinute(t *testing.T) {
	const line = "the control plane refused this node's report as too large"
	for _, reason := range []string{refusal.TooLarge, ""} {
		t.Run("reason "+reason, func(t *testing.T) {
			e := newEnv(t)
			done, _ := e.start(t)
			refuse := func() {
				t.Helper()
				e.svc.Next(t).End(edgetest.Refusal(connect.CodeResourceExhausted, reason, 0, "message is larger than 1 MiB"))
				e.clk.Advance(e.clk.AfterOtherThan(t, registerTimeout))
			}
			refuse()
			refuse()
			refuse()
			if n := e.logs.count("level=ERROR msg=\"" + line); n != 1 {
				t.Errorf("%d ERROR lines after three refusals within a minute, want 1", n)
			}
			e.clk.Advance(time.Minute)
			refuse()
			if n := e.logs.count("level=ERROR msg=\"" + line); n != 2 {
				t.Errorf("%d ERROR lines after a minute more, want 2", n)
			}
			e.svc.Next(t).Register(t, time.Hour) // still retrying
			select {
			case err := <-done:
				t.Fatalf("Run returned %v", err)
			default:
			}
		})
	}
}

func TestReconnectPresentsNewCertificate(t *testing.T) {
	e := newEnv(t)
	reconnect := make(chan struct{}, 1)
	e.cfg.Reconnect = reconnect
	dials := 0
	dial := e.cfg.Dial
	e.cfg.Dial = func() session.Dialer { dials++; return dial() }
	e.start(t)
	st := e.svc.Next(t)
	st.Register(t, time.Hour)
	reconnect <- struct{}{}
	st.WaitClosed(t)
	st.End(nil)
	e.svc.Next(t).Register(t, time.Hour) // at once: no timer advanced
	if dials != 2 {
		t.Errorf("Dial called %d times, want 2 (once per session)", dials)
	}
}
