// Package enroll owns join tokens and node identities: it makes tokens, turns
// a token and a certificate request into an enrolled node, and renews a
// node's certificate. Every signature the control plane makes for a node goes
// through it.
package enroll

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/internal/clock"
)

// Token limits.
const (
	DefaultTokenTTL = time.Hour
	MaxTokenTTL     = 24 * time.Hour
	MaxTokenUses    = 1000
)

// Store is what enrollment needs from the store.
type Store interface {
	CreateToken(ctx context.Context, t control.JoinToken) error
	GetToken(ctx context.Context, id string) (control.JoinToken, error)
	// EnrollNode claims one use of the token and records the node in one
	// transaction; it returns ErrTokenUnknown, ErrTokenRevoked,
	// ErrTokenExpired or ErrTokenUsed when the claim fails, and
	// ErrKeyEnrolled when node.EnrollKey enrolled before, writing nothing.
	EnrollNode(ctx context.Context, tokenID string, secretHash []byte, now time.Time, node control.Node) error
	// RecordRenewal stores newSerial as the node's next certificate if
	// presentedSerial is its current one (ErrNotCurrentCert, ErrNodeRemoved).
	RecordRenewal(ctx context.Context, nodeID, presentedSerial, newSerial string, notAfter, now time.Time) error
}

// Signer is the CA.
type Signer interface {
	Fingerprint() string
	TrustDomain() string
	// SignNode returns [leaf, intermediates...] for csr, naming nodeID.
	SignNode(ctx context.Context, csr *x509.CertificateRequest, nodeID string) ([]*x509.Certificate, error)
}

// Config configures a Service.
type Config struct {
	Store  Store
	Signer Signer
	Clock  clock.Clock  // nil: the wall clock
	Logger *slog.Logger // nil: discard
}

// Service makes tokens, enrolls nodes and renews their certificates.
type Service struct {
	store    Store
	signer   Signer
	clock    clock.Clock
	log      *slog.Logger
	inflight reservations
	signed   atomic.Int64
}

// New returns a Service.
func New(cfg Config) *Service {
	s := &Service{store: cfg.Store, signer: cfg.Signer, clock: cfg.Clock, log: cfg.Logger}
	if s.clock == nil {
		s.clock = clock.Real{}
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s
}

// TokenOptions are the choices made when creating a join token.
type TokenOptions struct {
	Name    string            // name of the node that enrolls; empty: its hostname
	TTL     time.Duration     // 0: DefaultTokenTTL
	Labels  map[string]string // given to the node
	MaxUses int               // 0: single use
}

var (
	nameRE       = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$`)
	labelKeyRE   = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9./_-]{0,62}$`)
	maxLabelSize = 256
	maxLabels    = 32
)

// Validate checks the options and names the bad one.
func (o TokenOptions) Validate() error {
	if o.Name != "" && !nameRE.MatchString(o.Name) {
		return fmt.Errorf("%w: name %q: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit", control.ErrInvalidArgument, o.Name)
	}
	if o.TTL < 0 || o.TTL > MaxTokenTTL {
		return fmt.Errorf("%w: ttl %s: must be between 1s and %s", control.ErrInvalidArgument, o.TTL, MaxTokenTTL)
	}
	if o.TTL > 0 && o.TTL < time.Second {
		return fmt.Errorf("%w: ttl %s: must be at least 1s", control.ErrInvalidArgument, o.TTL)
	}
	if o.MaxUses < 0 || o.MaxUses > MaxTokenUses {
		return fmt.Errorf("%w: uses %d: must be between 1 and %d", control.ErrInvalidArgument, o.MaxUses, MaxTokenUses)
	}
	return ValidateLabels(o.Labels)
}

// ValidateLabels checks label keys and values.
func ValidateLabels(labels map[string]string) error {
	if len(labels) > maxLabels {
		return fmt.Errorf("%w: %d labels: at most %d", control.ErrInvalidArgument, len(labels), maxLabels)
	}
	for k, v := range labels {
		if !labelKeyRE.MatchString(k) {
			return fmt.Errorf("%w: label key %q: use 1 to 63 letters, digits, '.', '/', '_' or '-'", control.ErrInvalidArgument, k)
		}
		if len(v) > maxLabelSize || strings.ContainsAny(v, "\x00\n\r") {
			return fmt.Errorf("%w: label %q: value must be at most %d bytes on one line", control.ErrInvalidArgument, k, maxLabelSize)
		}
	}
	return nil
}

// CreateToken makes and stores a join token. It returns the stored record and
// the token string, which exists nowhere else: only its hash is kept.
func (s *Service) CreateToken(ctx context.Context, opts TokenOptions) (control.JoinToken, string, error) {
	if err := opts.Validate(); err != nil {
		return control.JoinToken{}, "", err
	}
	if opts.TTL == 0 {
		opts.TTL = DefaultTokenTTL
	}
	if opts.MaxUses == 0 {
		opts.MaxUses = 1
	}
	jt, err := certs.NewJoinToken(s.signer.Fingerprint())
	if err != nil {
		return control.JoinToken{}, "", err
	}
	now := s.clock.Now()
	t := control.JoinToken{
		ID:         jt.ID,
		Name:       opts.Name,
		Labels:     opts.Labels,
		SecretHash: jt.SecretHash(),
		CreatedAt:  now,
		ExpiresAt:  now.Add(opts.TTL),
		MaxUses:    opts.MaxUses,
	}
	if err := s.store.CreateToken(ctx, t); err != nil {
		return control.JoinToken{}, "", fmt.Errorf("create token: %w", err)
	}
	s.log.InfoContext(ctx, "join token created", "token_id", t.ID, "name", t.Name, "expires_at", t.ExpiresAt, "max_uses", t.MaxUses)
	return t, jt.String(), nil
}

// Enrollment is the outcome of a successful Enroll.
type Enrollment struct {
	Node  control.Node
	Chain []*x509.Certificate
}

// Enroll checks the token and the request, signs the request for a node ID it
// chooses, and records the node, spending one use of the token. Nothing is
// recorded and no use is spent when it fails.
func (s *Service) Enroll(ctx context.Context, token string, csrDER []byte, hostname string) (Enrollment, error) {
	jt, err := certs.ParseJoinToken(token)
	if err != nil {
		return Enrollment{}, err
	}
	if jt.Fingerprint != s.signer.Fingerprint() {
		return Enrollment{}, control.ErrWrongCA
	}
	now := s.clock.Now()
	// The token first, so a bad one costs no more than a read.
	stored, release, err := s.reserveToken(ctx, jt, now)
	if err != nil {
		return Enrollment{}, err
	}
	defer release()
	csr, err := certs.ParseNodeCSR(csrDER)
	if err != nil {
		return Enrollment{}, err
	}
	key := sha256.Sum256(csr.RawSubjectPublicKeyInfo)
	releaseKey, err := s.reserveKey(key)
	if err != nil {
		return Enrollment{}, err
	}
	defer releaseKey()
	nodeID, err := certs.RandomID(12)
	if err != nil {
		return Enrollment{}, err
	}
	chain, err := s.signer.SignNode(ctx, csr, nodeID)
	if err != nil {
		return Enrollment{}, fmt.Errorf("sign node certificate: %w", err)
	}
	s.signed.Add(1)
	leaf := chain[0]
	node := control.Node{
		ID:           nodeID,
		Name:         nodeName(stored.Name, hostname, nodeID),
		Status:       control.StatusEnrolled,
		Labels:       stored.Labels,
		TokenID:      stored.ID,
		EnrollKey:    key[:],
		CertSerial:   certs.SerialHex(leaf),
		CertNotAfter: leaf.NotAfter,
		EnrolledAt:   now,
	}
	// The claim decides; the reservation made sure that only an
	// enrollment that can win it signed.
	if err := s.store.EnrollNode(ctx, jt.ID, jt.SecretHash(), now, node); err != nil {
		return Enrollment{}, err
	}
	s.log.InfoContext(ctx, "node enrolled", "node_id", node.ID, "name", node.Name, "token_id", jt.ID, "serial", node.CertSerial)
	return Enrollment{Node: node, Chain: chain}, nil
}

// reservations are the uses of tokens, and the keys, that enrollments hold
// while they sign: an enrollment that cannot win the claim (the token's uses
// are taken by ones in flight, or its key is enrolling already) is refused
// before it signs, and signing happens outside the store's one writer,
// where it does not hold up every other write. One control plane owns a
// data directory (its lock), so this process sees every enrollment. (A key
// that enrolled a node before is refused by the claim's transaction.)
type reservations struct {
	mu     sync.Mutex
	ended  *sync.Cond        // an enrollment in flight gave its use back; on mu
	tokens map[string]int    // uses in flight, by token ID
	ends   map[string]uint64 // uses given back so far, by token ID (kept: one per token used)
	keys   map[[32]byte]bool // keys in flight
}

// reserveToken reads the token, says why it cannot be claimed now if it
// cannot, and holds one of its uses for an enrollment; release gives it
// back once the claim is written (or not).
//
// The read is not done under the lock (under load it would queue every
// enrollment behind one read); instead, if a use of the token was given
// back while it read, it reads again, so that a committed use is never
// missed. When the uses left are all held by enrollments in flight, it
// waits for one of them to end and looks again: a use that one committed
// and has not given back yet is counted twice until it does.
func (s *Service) reserveToken(ctx context.Context, jt certs.JoinToken, now time.Time) (control.JoinToken, func(), error) {
	r := &s.inflight
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ended == nil {
		r.ended = sync.NewCond(&r.mu)
		r.tokens, r.ends = map[string]int{}, map[string]uint64{}
	}
	for {
		before := r.ends[jt.ID]
		r.mu.Unlock()
		stored, err := s.store.GetToken(ctx, jt.ID)
		r.mu.Lock()
		switch {
		case errors.Is(err, control.ErrNotFound):
			return control.JoinToken{}, nil, control.ErrTokenUnknown
		case err != nil:
			return control.JoinToken{}, nil, fmt.Errorf("enroll: %w", err)
		}
		if err := stored.Claimable(jt.SecretHash(), now); err != nil {
			return control.JoinToken{}, nil, err
		}
		switch {
		case r.ends[jt.ID] != before:
			continue // a use was given back meanwhile: its claim may be missing from the read
		case stored.Uses+r.tokens[jt.ID] >= stored.MaxUses:
			r.ended.Wait()
			continue
		}
		r.tokens[jt.ID]++
		return stored, func() {
			r.mu.Lock()
			defer r.mu.Unlock()
			if r.tokens[jt.ID]--; r.tokens[jt.ID] <= 0 {
				delete(r.tokens, jt.ID)
			}
			r.ends[jt.ID]++
			r.ended.Broadcast()
		}, nil
	}
}

// reserveKey holds key for an enrollment, refusing one that is enrolling
// already.
func (s *Service) reserveKey(key [32]byte) (func(), error) {
	r := &s.inflight
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys[key] {
		return nil, control.ErrKeyEnrolled
	}
	if r.keys == nil {
		r.keys = map[[32]byte]bool{}
	}
	r.keys[key] = true
	return func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		delete(r.keys, key)
	}, nil
}

// Signed is how many node certificates enrollment has signed, for tests
// and benchmarks that count the work refused enrollments did not do.
func (s *Service) Signed() int64 { return s.signed.Load() }

// nodeName is the token's name, else the edge's hostname if it is a usable
// name, else the node ID.
func nodeName(tokenName, hostname, nodeID string) string {
	if tokenName != "" {
		return tokenName
	}
	if nameRE.MatchString(hostname) {
		return hostname
	}
	return nodeID
}

// Renew signs a fresh key for a node that presented its current certificate
// (serial presentedSerial) and records the new certificate as the node's
// next one; its first use makes it current.
func (s *Service) Renew(ctx context.Context, nodeID, presentedSerial string, csrDER []byte) ([]*x509.Certificate, error) {
	csr, err := certs.ParseNodeCSR(csrDER)
	if err != nil {
		return nil, err
	}
	chain, err := s.signer.SignNode(ctx, csr, nodeID)
	if err != nil {
		return nil, fmt.Errorf("sign node certificate: %w", err)
	}
	leaf := chain[0]
	serial := certs.SerialHex(leaf)
	if err := s.store.RecordRenewal(ctx, nodeID, presentedSerial, serial, leaf.NotAfter, s.clock.Now()); err != nil {
		return nil, err
	}
	s.log.InfoContext(ctx, "node certificate renewed", "node_id", nodeID, "old_serial", presentedSerial, "serial", serial, "not_after", leaf.NotAfter)
	return chain, nil
}
