// Package control holds the control plane's domain types and sentinel errors.
// It does no I/O; the store, the PKI authority, the enrollment service and the
// API handlers all speak in these types.
package control

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"time"
)

// NodeStatus is where a node stands in its life. Removed is terminal.
type NodeStatus string

// The node states. See docs/ARCHITECTURE.md for the transitions.
const (
	StatusEnrolled     NodeStatus = "enrolled"     // holds a certificate, never connected
	StatusOnline       NodeStatus = "online"       // heartbeating
	StatusDisconnected NodeStatus = "disconnected" // session lost, inside the grace window
	StatusOffline      NodeStatus = "offline"      // offline threshold passed
	StatusUnknown      NodeStatus = "unknown"      // control plane restarted, not heard from yet
	StatusRemoved      NodeStatus = "removed"      // revoked by an operator; terminal
)

// Node is one enrolled GPU machine.
type Node struct {
	ID     string
	Name   string
	Status NodeStatus
	Labels map[string]string
	// TokenID is the join token the node enrolled with.
	TokenID string
	// EnrollKey is the SHA-256 of the public key the node enrolled with (its
	// SubjectPublicKeyInfo); no key enrolls twice. Nil for nodes enrolled
	// before it was recorded.
	EnrollKey []byte
	// CertSerial is the serial (lowercase hex) of the node's current certificate.
	CertSerial string
	// NextCertSerial is the serial of a renewed certificate the node has not
	// used yet; empty when there is none. Its first use makes it current.
	NextCertSerial string
	CertNotAfter   time.Time
	EnrolledAt     time.Time
	// LastSeen is the zero time when the node was never seen.
	LastSeen time.Time
	Draining bool
	// RemovedAt is the zero time unless Status is StatusRemoved.
	RemovedAt time.Time
	// StatusReason says why the node last changed status.
	StatusReason string
}

// StatusChange is one node's move to a new status, written with an event
// that records From, Status and Reason.
type StatusChange struct {
	NodeID string
	Status NodeStatus
	Reason string
	// Quiet writes the new status without an event: the node is flapping,
	// and its moves are summed up by a later change with Coalesced set.
	Quiet bool
	// Coalesced, when above zero, makes this change the summary of that many
	// quiet moves, starting from From: its event is recorded even when the
	// node's status is already Status.
	Coalesced int
	From      NodeStatus
}

// JoinToken is the stored half of a join token: never the secret, only its hash.
type JoinToken struct {
	ID     string
	Name   string
	Labels map[string]string
	// SecretHash is SHA-256 of the token's secret part.
	SecretHash []byte
	CreatedAt  time.Time
	ExpiresAt  time.Time
	MaxUses    int
	Uses       int
	// RevokedAt is the zero time unless the token was revoked.
	RevokedAt time.Time
}

// Claimable says why a machine holding the secret with secretHash cannot
// spend one use of t at now, or nil if it can. The checks come in this order,
// so callers report the same reason: unknown (the secret differs, compared in
// constant time), revoked, expired, used up.
func (t JoinToken) Claimable(secretHash []byte, now time.Time) error {
	switch {
	case subtle.ConstantTimeCompare(t.SecretHash, secretHash) != 1:
		return ErrTokenUnknown
	case !t.RevokedAt.IsZero():
		return ErrTokenRevoked
	case !now.Before(t.ExpiresAt):
		return ErrTokenExpired
	case t.Uses >= t.MaxUses:
		return ErrTokenUsed
	}
	return nil
}

// Event is one recorded fact about the fleet.
type Event struct {
	ID     int64
	Time   time.Time
	NodeID string // empty for events about no node (e.g. a token revoked)
	Kind   EventKind
	// From and To are set for EventStatus: the node's move.
	From, To NodeStatus
	// Reason says why, in words for people; programs read the other fields.
	Reason string
	// Coalesced counts the moves of a flapping node this EventStatus stands
	// for (they were not recorded one by one); 0 for a single move.
	Coalesced int
}

// EventKind says what an event records.
type EventKind string

// Event kinds.
const (
	EventTokenCreated EventKind = "token_created"
	EventTokenRevoked EventKind = "token_revoked"
	EventEnrolled     EventKind = "enrolled"
	EventRenewed      EventKind = "certificate_renewed"
	EventRemoved      EventKind = "removed"
	EventStatus       EventKind = "status"
	EventDrained      EventKind = "drained"
	EventUndrained    EventKind = "undrained"
)

// Sentinel errors. Callers test them with errors.Is; control/connecterr
// turns them into wire codes, in one place.
var (
	ErrNotFound = errors.New("not found")

	ErrTokenUnknown = errors.New("join token is unknown or its secret does not match")
	ErrTokenUsed    = errors.New("join token has already been used")
	ErrTokenExpired = errors.New("join token has expired")
	ErrTokenRevoked = errors.New("join token has been revoked")
	// ErrWrongCA: the token was made by another control plane (its CA
	// fingerprint does not match this one's).
	ErrWrongCA = errors.New("join token was made by another control plane (its CA fingerprint does not match this one)")
	// ErrKeyEnrolled: the certificate request's public key already enrolled
	// a node; every enrollment needs a fresh key.
	ErrKeyEnrolled = errors.New("this public key has already enrolled a node: enroll with a fresh key")

	ErrNodeRemoved    = errors.New("node has been removed and its certificate revoked")
	ErrNotCurrentCert = errors.New("certificate is not the node's current certificate")
	// ErrUnknownNode: a certificate or a request names a node this control
	// plane does not know (or no longer has in its live fleet).
	ErrUnknownNode = errors.New("node is not known to this control plane")
	// ErrNoClientCert: a node procedure was called without a verified client certificate.
	ErrNoClientCert = errors.New("node procedures need the node's client certificate (mutual TLS)")
	// ErrCertExpired: the node's certificate has expired.
	ErrCertExpired = errors.New("node certificate has expired")

	// ErrNotConnected: the node has no session to push a command on.
	ErrNotConnected = errors.New("node is not connected")
	// ErrSessionReplaced: the node opened a newer session; this one is over.
	ErrSessionReplaced = errors.New("session replaced by a newer one from the same node")
	// ErrDisconnected: the control plane sent DISCONNECT (shutdown, removal).
	ErrDisconnected = errors.New("disconnected by the control plane")
	// ErrTooSlow: the edge did not take its commands.
	ErrTooSlow = errors.New("session ended by the control plane: the edge is not taking its commands")

	ErrInvalidArgument  = errors.New("invalid argument")
	ErrSchemaTooNew     = errors.New("database schema is newer than this binary")
	ErrStorageFull      = errors.New("the control plane's storage is full: free space on its data volume; nothing was written")
	ErrPermissionDenied = errors.New("permission denied")
	ErrUnauthenticated  = errors.New("unauthenticated")
	// ErrTooLarge: a message was larger than the control plane accepts.
	ErrTooLarge = errors.New("message too large")

	// ErrBusy: the control plane is pacing work (edge registrations) or
	// shutting down; a RetryLater says when to come back.
	ErrBusy = errors.New("the control plane is busy")
	// ErrRateLimited: the caller is over a rate limit; a RetryLater says
	// when to come back.
	ErrRateLimited = errors.New("rate limited")
)

// RetryLater is a refusal the caller may retry after After. Err says why
// and wraps ErrBusy or ErrRateLimited.
type RetryLater struct {
	Err   error
	After time.Duration
}

func (e *RetryLater) Error() string {
	return fmt.Sprintf("%v; retry in %s", e.Err, e.After.Round(time.Millisecond))
}

func (e *RetryLater) Unwrap() error { return e.Err }
