// Package edge holds the edge agent's domain errors. The agent lives in its
// subpackages: state (the identity on disk), enroll, client (mTLS to the
// control plane), renew, session, handoff, gpu, agent, and cli (the `edge`
// command).
package edge

import (
	"errors"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/internal/refusal"
)

// Errors an edge reports. Their texts are short, since they are wrapped
// ("renew: revoked: ..."); what the operator can do about them is said once,
// on the last line the `edge` command prints.
var (
	// ErrRevoked: the control plane removed this node. Enroll again with a new token.
	ErrRevoked = errors.New("revoked: this node was removed from the control plane")
	// ErrCertExpired: the certificate expired, typically while the machine
	// was offline past its renewal. Enroll again with a new token.
	ErrCertExpired = errors.New("certificate expired")
	// ErrSuperseded: a newer certificate was issued to this node than the
	// one on disk. Enroll again with a new token.
	ErrSuperseded = errors.New("certificate superseded: a newer certificate was issued to this node")
	// ErrRateLimited: the control plane is rate limiting this caller; a
	// RefusalError's RetryAfter says when to try again.
	ErrRateLimited = errors.New("rate-limited by the control plane")
	// ErrTooLarge: the control plane refused a message as too large; sending
	// the same again will not help.
	ErrTooLarge = errors.New("refused by the control plane as too large")
)

// RefusalError is a call to the control plane that failed: refused (with a
// Connect code, and the reason and retry hint of internal/refusal's headers
// when the control plane gave them) or not answered at all (Unavailable,
// from the transport). Edge code never parses messages: it asks
// errors.Is(err, ErrRevoked) (and ErrCertExpired, ErrSuperseded,
// ErrRateLimited, ErrTooLarge), Retryable and RetryAfter. client.Explain
// makes one from a Connect error.
type RefusalError struct {
	Code connect.Code
	// Reason is the control plane's machine-readable reason (refusal.Revoked,
	// ...); "" when it gave none.
	Reason string
	// RetryAfter is how long the control plane asked the caller to wait
	// before trying again (pacing, shutdown, rate limits); 0 when it asked
	// for nothing.
	RetryAfter time.Duration
	// Err is the original error, a *connect.Error.
	Err error
}

// Error says what happened in words an operator can read; for the refusals
// that have a sentinel, the sentinel's text.
func (e *RefusalError) Error() string {
	switch s := e.sentinel(); {
	case s == ErrRateLimited || s == ErrTooLarge:
		return s.Error() + ": " + e.message()
	case s != nil:
		return s.Error()
	case e.Code == connect.CodeUnavailable:
		return "control plane unreachable: " + e.message()
	}
	return e.message()
}

func (e *RefusalError) message() string {
	var cerr *connect.Error
	if errors.As(e.Err, &cerr) {
		return cerr.Message()
	}
	if e.Err == nil {
		return e.Code.String()
	}
	return e.Err.Error()
}

// Unwrap returns the original error.
func (e *RefusalError) Unwrap() error { return e.Err }

// Is answers for the sentinels the refusal stands for: ErrRevoked,
// ErrCertExpired, ErrSuperseded, ErrRateLimited from the reason, and
// ErrTooLarge for the message-too-large reason or any ResourceExhausted
// that is not a rate limit.
func (e *RefusalError) Is(target error) bool {
	s := e.sentinel()
	return s != nil && s == target
}

func (e *RefusalError) sentinel() error {
	switch e.Reason {
	case refusal.Revoked:
		return ErrRevoked
	case refusal.Expired:
		return ErrCertExpired
	case refusal.Superseded:
		return ErrSuperseded
	case refusal.RateLimited:
		return ErrRateLimited
	case refusal.TooLarge:
		return ErrTooLarge
	}
	if e.Code == connect.CodeResourceExhausted {
		return ErrTooLarge
	}
	return nil
}

// Retryable reports whether the same call may succeed later with nothing
// changed on this side: the control plane was unreachable, pacing, shutting
// down, rate limiting (then RetryAfter says when), or failed internally. A
// refusal of this node's identity (revoked, expired, superseded, unknown,
// no certificate), of a message as too large, or of the request itself is not.
func (e *RefusalError) Retryable() bool {
	switch e.Reason {
	case "":
	case refusal.RateLimited:
		return true
	default:
		return false
	}
	switch e.Code {
	case connect.CodeUnavailable, connect.CodeDeadlineExceeded, connect.CodeAborted,
		connect.CodeInternal, connect.CodeUnknown:
		return true
	}
	return false
}
