// Package pki owns the control plane's private certificate authority: the root
// and intermediate keys on disk, the control plane's own TLS server
// certificate, and the signing of node certificates. Every node certificate is
// issued through SignNode, which goes through an embedded smallstep authority
// (github.com/smallstep/certificates/authority) so that step's validity
// bounds, name checks and one-time-token replay check apply; nothing else in
// the control plane holds a CA key.
//
// A node certificate names its node with exactly one URI SAN,
// spiffe://<trust domain>/node/<node ID>, chosen by the control plane: what
// the certificate request asks for is ignored.
package pki

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smallstep/certificates/authority"
	"go.step.sm/crypto/jose"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/internal/clock"
)

// Node certificate lifetime bounds and default.
const (
	DefaultNodeCertLifetime = 24 * time.Hour
	MinNodeCertLifetime     = 5 * time.Minute
	MaxNodeCertLifetime     = 30 * 24 * time.Hour
)

// Config configures the authority.
type Config struct {
	// Dir is where the CA material lives (e.g. DATA/ca); it is created with
	// mode 0700 if missing. Required.
	Dir string
	// TrustDomain names the SPIFFE trust domain, e.g. "llorch.local"; node
	// SPIFFE IDs are spiffe://<TrustDomain>/node/<id>. Required.
	TrustDomain string
	// SANs are the DNS names and IP addresses of the control plane's server
	// certificate; empty means localhost, 127.0.0.1 and ::1.
	SANs []string
	// NodeCertLifetime is how long a node certificate is valid; zero means
	// 24h. Allowed: 5m to 30 days.
	NodeCertLifetime time.Duration
	// Clock is the time source; nil means the wall clock. The embedded
	// smallstep authority checks its tokens against the wall clock, so a fake
	// clock must stay close to it for SignNode to work.
	Clock clock.Clock
	// Logger receives CA lifecycle events; nil discards them.
	Logger *slog.Logger
}

var defaultSANs = []string{"localhost", "127.0.0.1", "::1"}

// Validate checks the configuration; its error names the bad field.
func (c Config) Validate() error {
	if c.Dir == "" {
		return errors.New("pki config: Dir is empty")
	}
	if c.TrustDomain == "" {
		return errors.New("pki config: TrustDomain is empty")
	}
	if !certs.ValidTrustDomain(c.TrustDomain) {
		return fmt.Errorf("pki config: TrustDomain %q is not a valid SPIFFE trust domain (lowercase letters, digits, '.', '-', '_')", c.TrustDomain)
	}
	for _, s := range c.SANs {
		if err := validSAN(s); err != nil {
			return fmt.Errorf("pki config: SANs: %w", err)
		}
	}
	if l := c.NodeCertLifetime; l != 0 && (l < MinNodeCertLifetime || l > MaxNodeCertLifetime) {
		return fmt.Errorf("pki config: NodeCertLifetime %v is outside %v..%v", l, MinNodeCertLifetime, MaxNodeCertLifetime)
	}
	return nil
}

func validSAN(s string) error {
	if net.ParseIP(s) != nil {
		return nil
	}
	if s == "" || len(s) > 253 {
		return fmt.Errorf("%q is not a DNS name or IP address", s)
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("%q is not a DNS name or IP address", s)
		}
		for i, r := range label {
			ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
				r == '-' && i > 0 && i < len(label)-1 || r == '*' && label == "*"
			if !ok {
				return fmt.Errorf("%q is not a DNS name or IP address", s)
			}
		}
	}
	return nil
}

// withDefaults returns c with its zero values filled in.
func (c Config) withDefaults() Config {
	if len(c.SANs) == 0 {
		c.SANs = defaultSANs
	}
	c.SANs = append([]string(nil), c.SANs...)
	if c.NodeCertLifetime == 0 {
		c.NodeCertLifetime = DefaultNodeCertLifetime
	}
	if c.Clock == nil {
		c.Clock = clock.Real{}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return c
}

// TrustDomainMismatchError says the CA directory holds a root made for
// another trust domain than the configured one.
type TrustDomainMismatchError struct {
	Dir    string
	Stored string // the trust domain the root was made for
	Config string // the configured trust domain
}

func (e *TrustDomainMismatchError) Error() string {
	return fmt.Sprintf("CA directory %s holds a root for trust domain %q, but the configured trust domain is %q; "+
		"use the same trust domain or another directory", e.Dir, e.Stored, e.Config)
}

// Authority is the control plane's CA. It is safe for concurrent use.
type Authority struct {
	cfg         Config
	created     bool
	root        *x509.Certificate
	inter       *x509.Certificate
	interKey    *ecdsa.PrivateKey
	fingerprint string

	// server is the current server certificate, served by GetCertificate;
	// renewMu serializes its re-issue.
	server  atomic.Pointer[tls.Certificate]
	renewMu sync.Mutex

	// tickets are the session ticket keys, newest first (tickets.go).
	ticketMu sync.Mutex
	tickets  []ticketKey

	// The embedded smallstep authority and what SignNode needs to talk to it.
	step     *authority.Authority
	ottKey   jose.Signer
	audience string

	closeOnce sync.Once
	closed    atomic.Bool
	closeErr  error
}

// Open loads the CA from cfg.Dir, or creates it on first start: an ECDSA
// P-256 root valid for 10 years, an intermediate signed by it valid for 2
// years, and a 90-day server certificate for cfg.SANs signed by the
// intermediate. A stored server certificate is re-issued when its names differ
// from cfg.SANs or less than a third of its lifetime is left; an intermediate
// with less than a third of its lifetime left is replaced, too. Open fails if
// the directory holds a root for another trust domain
// (*TrustDomainMismatchError).
func Open(ctx context.Context, cfg Config) (*Authority, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	a := &Authority{cfg: cfg}
	if err := a.loadOrCreate(ctx); err != nil {
		return nil, fmt.Errorf("open CA in %s: %w", cfg.Dir, err)
	}
	a.loadTicketKeys(ctx)
	a.fingerprint = certs.Fingerprint(a.root)
	if err := a.startStep(); err != nil {
		return nil, fmt.Errorf("start embedded authority: %w", err)
	}
	cfg.Logger.InfoContext(ctx, "CA ready",
		"dir", cfg.Dir, "trust_domain", cfg.TrustDomain, "created", a.created,
		"fingerprint", a.fingerprint,
		"intermediate_serial", certs.SerialHex(a.inter), "intermediate_not_after", a.inter.NotAfter,
		"node_cert_lifetime", cfg.NodeCertLifetime)
	return a, nil
}

// Created reports whether Open created a new CA.
func (a *Authority) Created() bool { return a.created }

// TrustDomain is the SPIFFE trust domain of the node certificates.
func (a *Authority) TrustDomain() string { return a.cfg.TrustDomain }

// Fingerprint is "sha256:" and the lowercase hex SHA-256 of the root
// certificate's DER.
func (a *Authority) Fingerprint() string { return a.fingerprint }

// Root is the root certificate. Callers must not modify it.
func (a *Authority) Root() *x509.Certificate { return a.root }

// Intermediate is the certificate that signs node and server certificates.
// Callers must not modify it.
func (a *Authority) Intermediate() *x509.Certificate { return a.inter }

// ClientCAs is what a node certificate must chain to on the public port: the
// root, or the current intermediate. The TLS handshake names both to the
// edge, and an edge whose certificate the current intermediate issued
// presents the leaf alone; one issued by an earlier intermediate presents
// its chain, which verifies to the root.
func (a *Authority) ClientCAs() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(a.root)
	pool.AddCert(a.inter)
	return pool
}

// spiffeID is the SPIFFE ID of a node of this trust domain.
func (a *Authority) spiffeID(nodeID string) string {
	return certs.NodeSPIFFEID(a.cfg.TrustDomain, nodeID)
}

// nodeIDFromSPIFFE parses a node SPIFFE ID of this trust domain back to the
// node ID. It fails, wrapping control.ErrInvalidArgument, for another trust
// domain, another path shape or a malformed node ID.
func (a *Authority) nodeIDFromSPIFFE(id string) (string, error) {
	nodeID, err := certs.NodeIDFromSPIFFEID(a.cfg.TrustDomain, id)
	if err != nil {
		return "", fmt.Errorf("%w: %v", control.ErrInvalidArgument, err)
	}
	return nodeID, nil
}

// Close stops the embedded authority. SignNode fails afterwards; the
// certificates stay readable.
func (a *Authority) Close() error {
	a.closeOnce.Do(func() {
		a.closed.Store(true)
		a.closeErr = a.step.Shutdown()
	})
	return a.closeErr
}
