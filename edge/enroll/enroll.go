// Package enroll makes an edge's identity: it checks it reached the control
// plane its join token pins, sends the token with a fresh key's certificate
// request, checks what comes back and saves it atomically. With a valid
// identity already on disk it spends no token. It holds the state
// directory's lock while it enrolls, and waits out the control plane's rate
// limits for a while.
package enroll

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/state"
	"github.com/llorch/llorch/internal/backoff"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

// Config is one enrollment.
type Config struct {
	StateDir   string
	ControlURL string // https://host:port
	Token      string
	Hostname   string        // sent for the node's default name
	Clock      clock.Clock   // nil: the wall clock
	Timeout    time.Duration // one attempt's limit; 0: 30s
	// RetryFor bounds how long Enroll keeps trying while the control plane
	// rate-limits enrollments; 0: 2 minutes.
	RetryFor time.Duration
	// Progress receives a line each time Enroll waits for a rate limit
	// (the `edge` command passes stderr); nil: discard.
	Progress io.Writer
}

// Result is the identity now on disk.
type Result struct {
	Identity state.Identity
	// AlreadyEnrolled is true when a valid identity was on disk and no token was spent.
	AlreadyEnrolled bool
}

// Enroll enrolls the machine unless it already holds a valid identity (it
// then spends no token, and needs no lock: an agent may be running on the
// directory). To enroll it holds the state directory's lock (state.Lock),
// so it is refused with an error wrapping state.ErrLocked while an agent or
// another enrollment holds it.
//
// When the control plane rate-limits enrollments, Enroll waits as long as
// it asks (a line on Progress each time) and tries again, for at most
// RetryFor. A refused attempt spends no token; only a success does.
func Enroll(ctx context.Context, cfg Config) (Result, error) {
	clk := cfg.Clock
	if clk == nil {
		clk = clock.Real{}
	}
	if res, ok, err := enrolled(cfg.StateDir, clk.Now()); ok || err != nil {
		return res, err
	}
	// Nothing valid on disk (or an expired identity, which enrolling replaces).
	token, err := certs.ParseJoinToken(cfg.Token)
	if err != nil {
		return Result{}, err
	}
	u, err := url.Parse(cfg.ControlURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return Result{}, fmt.Errorf("control URL %q: must be https://host:port", cfg.ControlURL)
	}
	release, err := state.Lock(cfg.StateDir)
	if err != nil {
		return Result{}, err
	}
	defer release()
	// Another enrollment may have finished since the look above.
	if res, ok, err := enrolled(cfg.StateDir, clk.Now()); ok || err != nil {
		return res, err
	}

	key, err := certs.NewKey()
	if err != nil {
		return Result{}, err
	}
	csr, err := certs.NewCSR(key)
	if err != nil {
		return Result{}, err
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	transport := &http.Transport{
		TLSClientConfig:   certs.PinnedTLSConfig(token.Fingerprint, u.Hostname()),
		ForceAttemptHTTP2: true,
	}
	defer transport.CloseIdleConnections()
	hc := &http.Client{Timeout: timeout, Transport: transport}
	enrollments := llorchv1connect.NewEnrollServiceClient(hc, cfg.ControlURL)
	req := &llorchv1.EnrollRequest{Token: token.String(), Csr: csr, Hostname: cfg.Hostname}
	msg, err := call(ctx, cfg, clk, func() (*llorchv1.EnrollResponse, error) {
		resp, err := enrollments.Enroll(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	})
	if err != nil {
		return Result{}, err
	}
	id, err := identityFrom(msg, key, token.Fingerprint, cfg.ControlURL)
	if err != nil {
		return Result{}, fmt.Errorf("the control plane's answer is unusable: %w", err)
	}
	id.EnrolledAt = clk.Now()
	if err := state.Save(cfg.StateDir, id); err != nil {
		return Result{}, fmt.Errorf("save identity (the token is spent; fix the state directory and enroll with a new token): %w", err)
	}
	return Result{Identity: id}, nil
}

// enrolled looks for a valid identity in dir: ok when there is one; an
// error when dir holds a damaged one.
func enrolled(dir string, now time.Time) (res Result, ok bool, err error) {
	existing, err := state.Load(dir)
	switch {
	case err == nil && !existing.Expired(now):
		return Result{Identity: existing, AlreadyEnrolled: true}, true, nil
	case err != nil && !errors.Is(err, state.ErrNotEnrolled):
		return Result{}, false, fmt.Errorf("state directory %s holds a damaged identity (%w); move it away to enroll afresh", dir, err)
	}
	return Result{}, false, nil
}

// defaultRetryFor bounds the waits for a rate limit.
const defaultRetryFor = 2 * time.Minute

// call makes the enrollment call, and again after the wait the control
// plane asks for while it rate-limits, for at most cfg.RetryFor. The same
// request is sent each time: a refused one spent nothing.
func call(ctx context.Context, cfg Config, clk clock.Clock, enroll func() (*llorchv1.EnrollResponse, error)) (*llorchv1.EnrollResponse, error) {
	retryFor := cfg.RetryFor
	if retryFor <= 0 {
		retryFor = defaultRetryFor
	}
	progress := cfg.Progress
	if progress == nil {
		progress = io.Discard
	}
	giveUp := clk.Now().Add(retryFor)
	for attempt := 0; ; attempt++ {
		msg, err := enroll()
		if err == nil {
			return msg, nil
		}
		ref, ok := errors.AsType[*edge.RefusalError](client.Explain(err))
		if !ok || !errors.Is(ref, edge.ErrRateLimited) {
			return nil, explain(err, cfg.ControlURL)
		}
		wait := ref.RetryAfter
		if wait <= 0 { // no hint: back off on our own
			wait = max(backoff.FullJitter(attempt, time.Second, 30*time.Second, rand.Float64()), time.Second)
		}
		if clk.Now().Add(wait).After(giveUp) {
			return nil, fmt.Errorf("enrollment still refused after %s of retries; try again later: %w", retryFor, ref)
		}
		fmt.Fprintf(progress, "enrollment rate-limited by the control plane; retrying in %s\n", roundWait(wait))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-clk.After(wait):
		}
	}
}

// roundWait shows a wait as people read it: 3s, 1.5s, 250ms.
func roundWait(d time.Duration) time.Duration {
	if d >= 10*time.Second {
		return d.Round(time.Second)
	}
	if d >= time.Second {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(10 * time.Millisecond)
}

// identityFrom checks the control plane's answer: the certificate is for our
// key, chains to the pinned root and names the node ID we were given.
func identityFrom(msg *llorchv1.EnrollResponse, key *ecdsa.PrivateKey, fingerprint, usedURL string) (state.Identity, error) {
	chain, err := certs.ParseCertsDER(msg.GetCertificateChain())
	if err != nil {
		return state.Identity{}, err
	}
	roots, err := certs.ParseCertsDER(msg.GetCaCertificates())
	if err != nil {
		return state.Identity{}, fmt.Errorf("CA bundle: %w", err)
	}
	var pinned *x509.Certificate
	for _, r := range roots {
		if certs.Fingerprint(r) == fingerprint {
			pinned = r
		}
	}
	if pinned == nil {
		return state.Identity{}, errors.New("CA bundle does not contain the pinned root")
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != msg.GetSpiffeId() {
		return state.Identity{}, fmt.Errorf("certificate does not carry the SPIFFE ID %q", msg.GetSpiffeId())
	}
	td, nodeID := leaf.URIs[0].Host, msg.GetNodeId()
	pool := x509.NewCertPool()
	pool.AddCert(pinned)
	if err := certs.CheckNodeCertificate(chain, &key.PublicKey, pool, td, nodeID); err != nil {
		return state.Identity{}, err
	}
	controlURL := msg.GetControlUrl()
	if controlURL == "" {
		controlURL = usedURL
	}
	return state.Identity{
		NodeID: nodeID, NodeName: msg.GetNodeName(), SPIFFEID: msg.GetSpiffeId(), TrustDomain: td,
		ControlURL: controlURL, CAFingerprint: fingerprint, Labels: msg.GetLabels(),
		Key: key, Chain: chain, Roots: []*x509.Certificate{pinned},
	}, nil
}

// explain says what went wrong in words an operator can act on.
func explain(err error, controlURL string) error {
	var mismatch *certs.FingerprintMismatchError
	if errors.As(err, &mismatch) {
		return fmt.Errorf("refusing to send the token to %s: %w", controlURL, mismatch)
	}
	var cerr *connect.Error
	if errors.As(err, &cerr) {
		if !connect.IsWireError(cerr) {
			return fmt.Errorf("cannot reach the control plane at %s: %s", controlURL, cerr.Message())
		}
		return fmt.Errorf("enrollment refused: %s", cerr.Message())
	}
	return err
}
