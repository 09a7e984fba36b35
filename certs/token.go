package certs

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"errors"
	"fmt"
	"strings"
)

// ErrMalformedToken says a string is not a join token (wrong shape, truncated
// or mistyped). It never says whether such a token exists.
var ErrMalformedToken = errors.New("join token is malformed or truncated")

// A join token string is
//
//	llorch1.<CA fingerprint, 64 hex>.<token ID, 12 base32>.<secret, 32 base32>
//
// The fingerprint pins the control plane's root CA, so the edge can check whom
// it talks to before it sends the token. The ID is public (it names the token
// in lists and logs); the secret is 160 random bits of which the control plane
// stores only a SHA-256 hash.
const (
	tokenPrefix    = "llorch1"
	tokenIDLen     = 12 // 60 bits, base32
	tokenSecretLen = 32 // 160 bits, base32
)

var tokenEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// JoinToken is a parsed join token.
type JoinToken struct {
	Fingerprint string // "sha256:<hex>" of the root CA
	ID          string
	Secret      string
}

// NewJoinToken makes a token with a fresh random ID and secret for the CA
// with the given fingerprint.
func NewJoinToken(fingerprint string) (JoinToken, error) {
	if !ValidFingerprint(fingerprint) {
		return JoinToken{}, fmt.Errorf("new join token: bad CA fingerprint %q", fingerprint)
	}
	id, err := randomBase32(tokenIDLen)
	if err != nil {
		return JoinToken{}, err
	}
	secret, err := randomBase32(tokenSecretLen)
	if err != nil {
		return JoinToken{}, err
	}
	return JoinToken{Fingerprint: fingerprint, ID: id, Secret: secret}, nil
}

// RandomID returns n random lowercase base32 characters, for identifiers such
// as node IDs.
func RandomID(n int) (string, error) { return randomBase32(n) }

func randomBase32(n int) (string, error) {
	b := make([]byte, (n*5+7)/8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random: %w", err)
	}
	return tokenEncoding.EncodeToString(b)[:n], nil
}

// String returns the token in its printed form.
func (t JoinToken) String() string {
	return tokenPrefix + "." + strings.TrimPrefix(t.Fingerprint, "sha256:") + "." + t.ID + "." + t.Secret
}

// SecretHash is what the control plane stores instead of the secret.
func (t JoinToken) SecretHash() []byte {
	sum := sha256.Sum256([]byte(t.Secret))
	return sum[:]
}

// ParseJoinToken parses a printed token. Surrounding white space (a trailing
// newline in a token file) is ignored. Every failure wraps ErrMalformedToken.
func ParseJoinToken(s string) (JoinToken, error) {
	s = strings.TrimSpace(s)
	parts := strings.Split(s, ".")
	if len(parts) != 4 {
		return JoinToken{}, fmt.Errorf("%w: want 4 dot-separated parts, got %d", ErrMalformedToken, len(parts))
	}
	if parts[0] != tokenPrefix {
		return JoinToken{}, fmt.Errorf("%w: does not start with %q", ErrMalformedToken, tokenPrefix+".")
	}
	fp := "sha256:" + parts[1]
	if !ValidFingerprint(fp) {
		return JoinToken{}, fmt.Errorf("%w: CA fingerprint must be 64 lowercase hex characters", ErrMalformedToken)
	}
	if !isBase32(parts[2], tokenIDLen) {
		return JoinToken{}, fmt.Errorf("%w: token ID must be %d characters a-z2-7", ErrMalformedToken, tokenIDLen)
	}
	if !isBase32(parts[3], tokenSecretLen) {
		return JoinToken{}, fmt.Errorf("%w: secret must be %d characters a-z2-7", ErrMalformedToken, tokenSecretLen)
	}
	return JoinToken{Fingerprint: fp, ID: parts[2], Secret: parts[3]}, nil
}

// ValidTokenID reports whether s has the shape of a token ID.
func ValidTokenID(s string) bool { return isBase32(s, tokenIDLen) }

func isBase32(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return false
		}
	}
	return true
}
