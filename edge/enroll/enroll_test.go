package enroll_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge/enroll"
	"github.com/llorch/llorch/edge/internal/edgetest"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/refusal"
)

// enrollService is a fake EnrollService: refuse says what to do with each
// call (counted from 1); nil, or a nil answer, enrolls node-1.
type enrollService struct {
	llorchv1connect.UnimplementedEnrollServiceHandler
	ca     *edgetest.CA
	refuse func(call int) error

	mu    sync.Mutex
	calls int
	csrs  [][]byte
}

func (s *enrollService) Enroll(_ context.Context, req *connect.Request[llorchv1.EnrollRequest]) (*connect.Response[llorchv1.EnrollResponse], error) {
	s.mu.Lock()
	s.calls++
	call := s.calls
	s.csrs = append(s.csrs, req.Msg.GetCsr())
	s.mu.Unlock()
	if s.refuse != nil {
		if err := s.refuse(call); err != nil {
			return nil, err
		}
	}
	if _, err := certs.ParseJoinToken(req.Msg.GetToken()); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	chain, err := s.ca.IssueCSR(req.Msg.GetCsr(), "node-1", time.Hour)
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	return connect.NewResponse(&llorchv1.EnrollResponse{
		NodeId: "node-1", NodeName: req.Msg.GetHostname(), SpiffeId: certs.NodeSPIFFEID(edgetest.TrustDomain, "node-1"),
		CertificateChain: chain, CaCertificates: [][]byte{s.ca.Root.Raw},
		Labels: map[string]string{"zone": "lab"},
	}), nil
}

func (s *enrollService) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

type env struct {
	ca  *edgetest.CA
	svc *enrollService
	srv *edgetest.Server
	clk *edgetest.Clock
	cfg enroll.Config
	out *bytes.Buffer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ca := edgetest.NewCA(t)
	svc := &enrollService{ca: ca}
	mux := http.NewServeMux()
	mux.Handle(llorchv1connect.NewEnrollServiceHandler(svc))
	srv := edgetest.NewServer(t, ca, mux)
	e := &env{ca: ca, svc: svc, srv: srv, clk: edgetest.NewClock(), out: &bytes.Buffer{}}
	e.cfg = enroll.Config{
		StateDir: t.TempDir(), ControlURL: srv.URL, Token: token(t, ca), Hostname: "gpu-host",
		Clock: e.clk, Progress: e.out,
	}
	return e
}

func token(t *testing.T, ca *edgetest.CA) string {
	t.Helper()
	tok, err := certs.NewJoinToken(ca.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	return tok.String()
}

const enrollPath = llorchv1connect.EnrollServiceEnrollProcedure

func TestEnrollSavesAndSpendsOneToken(t *testing.T) {
	e := newEnv(t)
	res, err := enroll.Enroll(context.Background(), e.cfg)
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	if res.AlreadyEnrolled || res.Identity.NodeID != "node-1" || res.Identity.NodeName != "gpu-host" || res.Identity.ControlURL != e.srv.URL {
		t.Errorf("result = %+v", res)
	}
	if !res.Identity.EnrolledAt.Equal(e.clk.Now()) {
		t.Errorf("EnrolledAt = %v, want the clock's %v", res.Identity.EnrolledAt, e.clk.Now())
	}
	saved, err := state.Load(e.cfg.StateDir)
	if err != nil {
		t.Fatalf("Load after Enroll: %v", err)
	}
	if saved.NodeID != "node-1" || saved.Labels["zone"] != "lab" || saved.CAFingerprint != e.ca.Fingerprint() {
		t.Errorf("saved identity = %+v", saved)
	}

	again, err := enroll.Enroll(context.Background(), e.cfg)
	if err != nil || !again.AlreadyEnrolled || again.Identity.NodeID != "node-1" {
		t.Fatalf("second Enroll = %+v, %v; want already enrolled", again, err)
	}
	if n := e.svc.count(); n != 1 {
		t.Errorf("the control plane saw %d enrollments, want 1 (the second spends no token)", n)
	}
	// The lock was given back.
	release, err := state.Lock(e.cfg.StateDir)
	if err != nil {
		t.Fatalf("Lock after Enroll: %v", err)
	}
	release()
}

func TestWrongFingerprintSendsNoToken(t *testing.T) {
	e := newEnv(t)
	e.cfg.Token = token(t, edgetest.NewCA(t)) // another control plane's
	_, err := enroll.Enroll(context.Background(), e.cfg)
	var mismatch *certs.FingerprintMismatchError
	if !errors.As(err, &mismatch) || !strings.Contains(err.Error(), "refusing to send the token") {
		t.Fatalf("Enroll = %v, want a fingerprint mismatch", err)
	}
	if n := e.srv.Requests(enrollPath); n != 0 {
		t.Errorf("the control plane got %d requests, want none: the token must not be sent", n)
	}
	if _, err := state.Load(e.cfg.StateDir); !errors.Is(err, state.ErrNotEnrolled) {
		t.Errorf("state after a refused enrollment: %v, want not enrolled", err)
	}
}

func TestMalformedTokenRejectedWithoutDial(t *testing.T) {
	e := newEnv(t)
	for _, tok := range []string{"", "nope", e.cfg.Token[:len(e.cfg.Token)-1]} {
		e.cfg.Token = tok
		if _, err := enroll.Enroll(context.Background(), e.cfg); !errors.Is(err, certs.ErrMalformedToken) {
			t.Errorf("Enroll with token %q = %v, want ErrMalformedToken", tok, err)
		}
	}
	if n := e.srv.Conns(); n != 0 {
		t.Errorf("the control plane saw %d connections, want none", n)
	}
}

func TestRateLimitedThenEnrolled(t *testing.T) {
	e := newEnv(t)
	e.svc.refuse = func(call int) error {
		if call <= 2 {
			return edgetest.Refusal(connect.CodeResourceExhausted, refusal.RateLimited, 3*time.Second, "too many enrollments from 127.0.0.1")
		}
		return nil
	}
	done := make(chan error, 1)
	go func() {
		_, err := enroll.Enroll(context.Background(), e.cfg)
		done <- err
	}()
	for range 2 {
		e.clk.WaitAfter(t, 3*time.Second)
		e.clk.Advance(3 * time.Second)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Enroll = %v, want success after the rate limit", err)
		}
	case <-time.After(edgetest.WaitLimit):
		t.Fatal("Enroll did not finish")
	}
	if n := e.svc.count(); n != 3 {
		t.Errorf("%d calls, want 3", n)
	}
	line := "enrollment rate-limited by the control plane; retrying in 3s\n"
	if got := e.out.String(); got != line+line {
		t.Errorf("progress = %q, want the line twice", got)
	}
	if _, err := state.Load(e.cfg.StateDir); err != nil {
		t.Errorf("Load: %v", err)
	}
}

func TestRateLimitedTooLong(t *testing.T) {
	e := newEnv(t)
	e.svc.refuse = func(int) error {
		return edgetest.Refusal(connect.CodeResourceExhausted, refusal.RateLimited, 50*time.Second, "too many enrollments")
	}
	done := make(chan error, 1)
	go func() {
		_, err := enroll.Enroll(context.Background(), e.cfg)
		done <- err
	}()
	for range 2 { // 100s of 120s; a third wait would pass the bound
		e.clk.WaitAfter(t, 50*time.Second)
		e.clk.Advance(50 * time.Second)
	}
	var err error
	select {
	case err = <-done:
	case <-time.After(edgetest.WaitLimit):
		t.Fatal("Enroll did not give up")
	}
	if err == nil || !strings.Contains(err.Error(), "enrollment still refused after 2m0s of retries; try again later: rate-limited by the control plane: too many enrollments") {
		t.Errorf("Enroll = %v, want it to give up saying why", err)
	}
	if n := e.svc.count(); n != 3 {
		t.Errorf("%d calls, want 3", n)
	}
}

func TestOtherRefusalIsNotRetried(t *testing.T) {
	e := newEnv(t)
	e.svc.refuse = func(int) error {
		return connect.NewError(connect.CodePermissionDenied, errors.New("join token has already been used"))
	}
	_, err := enroll.Enroll(context.Background(), e.cfg)
	if err == nil || err.Error() != "enrollment refused: join token has already been used" {
		t.Errorf("Enroll = %v", err)
	}
	if n := e.svc.count(); n != 1 || e.out.Len() != 0 {
		t.Errorf("%d calls, progress %q; want one call and no retry", n, e.out)
	}
}

func TestLockedStateDirRefused(t *testing.T) {
	e := newEnv(t)
	release, err := state.Lock(e.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	_, err = enroll.Enroll(context.Background(), e.cfg)
	if !errors.Is(err, state.ErrLocked) || !strings.Contains(err.Error(), "in use by another edge agent") {
		t.Fatalf("Enroll = %v, want ErrLocked", err)
	}
	if n := e.srv.Requests(enrollPath); n != 0 {
		t.Errorf("%d requests while the directory was locked, want none", n)
	}
}

// A valid identity is reported without the lock, so `edge enroll` beside a
// running agent says "already enrolled".
func TestAlreadyEnrolledWhileLocked(t *testing.T) {
	e := newEnv(t)
	if _, err := enroll.Enroll(context.Background(), e.cfg); err != nil {
		t.Fatal(err)
	}
	release, err := state.Lock(e.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	res, err := enroll.Enroll(context.Background(), e.cfg)
	if err != nil || !res.AlreadyEnrolled {
		t.Fatalf("Enroll beside a running agent = %+v, %v; want already enrolled", res, err)
	}
}
