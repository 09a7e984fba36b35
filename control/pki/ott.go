package pki

import (
	"crypto/x509"
	"errors"
	"sync"
	"time"

	"github.com/smallstep/certificates/db"

	"github.com/llorch/llorch/internal/clock"
)

// maxTokens bounds the used-token memory: at 500 signatures a second and a
// three-minute retention about 90 000 are held.
const maxTokens = 1 << 17

// errTooManyTokens is returned when maxTokens unexpired tokens are held.
var errTooManyTokens = errors.New("too many one-time tokens in flight")

// tokenDB is the embedded authority's database. It remembers the ids of the
// internal one-time tokens until they can no longer be valid, so a token is
// accepted once. Nothing else is stored: revocation is the store's business
// (node status and current serial), not step's.
type tokenDB struct {
	clock clock.Clock
	ttl   time.Duration
	max   int

	mu    sync.Mutex
	seen  map[string]time.Time // id → forget after
	order []usedToken          // insertion order, for pruning
}

type usedToken struct {
	id     string
	forget time.Time
}

var _ db.AuthDB = (*tokenDB)(nil)

func newTokenDB(c clock.Clock, ttl time.Duration, maxEntries int) *tokenDB {
	return &tokenDB{clock: c, ttl: ttl, max: maxEntries, seen: make(map[string]time.Time)}
}

// UseToken records id and reports whether it was not recorded before. It
// fails, rather than forget a live token, when the memory is full.
func (d *tokenDB) UseToken(id, _ string) (bool, error) {
	now := d.clock.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	d.prune(now)
	if _, ok := d.seen[id]; ok {
		return false, nil
	}
	if len(d.seen) >= d.max {
		return false, errTooManyTokens
	}
	forget := now.Add(d.ttl)
	d.seen[id] = forget
	d.order = append(d.order, usedToken{id: id, forget: forget})
	return true, nil
}

// prune forgets the tokens whose time is up, oldest first.
func (d *tokenDB) prune(now time.Time) {
	i := 0
	for ; i < len(d.order) && !d.order[i].forget.After(now); i++ {
		delete(d.seen, d.order[i].id)
	}
	if i > 0 {
		d.order = d.order[i:]
	}
}

// IsRevoked reports false: revocation is checked by the store.
func (d *tokenDB) IsRevoked(string) (bool, error) { return false, nil }

// IsSSHRevoked reports false: there are no SSH certificates.
func (d *tokenDB) IsSSHRevoked(string) (bool, error) { return false, nil }

// Revoke is not supported.
func (d *tokenDB) Revoke(*db.RevokedCertificateInfo) error { return db.ErrNotImplemented }

// RevokeSSH is not supported.
func (d *tokenDB) RevokeSSH(*db.RevokedCertificateInfo) error { return db.ErrNotImplemented }

// GetCertificate is not supported: certificates are not stored here.
func (d *tokenDB) GetCertificate(string) (*x509.Certificate, error) {
	return nil, db.ErrNotImplemented
}

// IsSSHHost is not supported.
func (d *tokenDB) IsSSHHost(string) (bool, error) { return false, db.ErrNotImplemented }

// GetSSHHostPrincipals is not supported.
func (d *tokenDB) GetSSHHostPrincipals() ([]string, error) { return nil, db.ErrNotImplemented }

// Shutdown forgets every token.
func (d *tokenDB) Shutdown() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.seen = make(map[string]time.Time)
	d.order = nil
	return nil
}
