// Package edge holds the edge agent's domain errors. The agent lives in its
// subpackages: state (the identity on disk), enroll, client (mTLS to the
// control plane), renew, and cli (the `edge` command).
package edge

import "errors"

// Errors an edge reports; each says what the operator can do.
var (
	// ErrRevoked: the control plane removed this node. Enroll again with a new token.
	ErrRevoked = errors.New("revoked: this node was removed from the control plane and its certificate revoked; enroll again with a new token (edge enroll --token ...)")
	// ErrCertExpired: the certificate expired, typically while the machine was offline.
	ErrCertExpired = errors.New("certificate expired: this node's certificate expired (the machine was probably offline past its renewal); enroll again with a new token (edge enroll --token ...)")
	// ErrSuperseded: a newer certificate was issued to this node than the one on disk.
	ErrSuperseded = errors.New("certificate superseded: this node's certificate was replaced by a newer one that is not on disk; enroll again with a new token")
)
