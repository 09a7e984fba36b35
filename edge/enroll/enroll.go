// Package enroll makes an edge's identity: it checks it reached the control
// plane its join token pins, sends the token with a fresh key's certificate
// request, checks what comes back and saves it atomically. With a valid
// identity already on disk it spends no token.
package enroll

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

// Config is one enrollment.
type Config struct {
	StateDir   string
	ControlURL string // https://host:port
	Token      string
	Hostname   string    // sent for the node's default name
	Now        time.Time // zero: time.Now()
	Timeout    time.Duration
}

// Result is the identity now on disk.
type Result struct {
	Identity state.Identity
	// AlreadyEnrolled is true when a valid identity was on disk and no token was spent.
	AlreadyEnrolled bool
}

// Enroll enrolls the machine unless it already holds a valid identity.
func Enroll(ctx context.Context, cfg Config) (Result, error) {
	now := cfg.Now
	if now.IsZero() {
		now = time.Now()
	}
	existing, err := state.Load(cfg.StateDir)
	switch {
	case err == nil && !existing.Expired(now):
		return Result{Identity: existing, AlreadyEnrolled: true}, nil
	case err != nil && !errors.Is(err, state.ErrNotEnrolled):
		return Result{}, fmt.Errorf("state directory %s holds a damaged identity (%w); move it away to enroll afresh", cfg.StateDir, err)
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
	client := llorchv1connect.NewEnrollServiceClient(hc, cfg.ControlURL)
	resp, err := client.Enroll(ctx, connect.NewRequest(&llorchv1.EnrollRequest{
		Token: token.String(), Csr: csr, Hostname: cfg.Hostname,
	}))
	if err != nil {
		return Result{}, explain(err, cfg.ControlURL)
	}
	id, err := identityFrom(resp.Msg, key, token.Fingerprint, cfg.ControlURL)
	if err != nil {
		return Result{}, fmt.Errorf("the control plane's answer is unusable: %w", err)
	}
	id.EnrolledAt = now
	if err := state.Save(cfg.StateDir, id); err != nil {
		return Result{}, fmt.Errorf("save identity (the token is spent; fix the state directory and enroll with a new token): %w", err)
	}
	return Result{Identity: id}, nil
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
