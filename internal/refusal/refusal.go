// Package refusal names what the control plane's refusals carry besides
// their Connect code, so that an edge can act on them without parsing
// messages: a machine-readable reason and a retry hint. Both sides import it.
package refusal

// ReasonHeader carries the reason a node's call was refused.
const ReasonHeader = "Llorch-Reason"

// RetryAfterHeader carries, on an Unavailable refusal (the control plane is
// pacing registrations or shutting down) or a ResourceExhausted one (a rate
// limit), how many milliseconds the caller should wait before trying again.
const RetryAfterHeader = "Llorch-Retry-After-Ms"

// Reasons sent in ReasonHeader.
const (
	Revoked    = "revoked"               // the node was removed
	Superseded = "superseded"            // a renewed certificate replaced this one
	Expired    = "expired"               // the certificate has expired
	NoCert     = "no-client-certificate" // a node procedure was called without one
	Unknown    = "unknown-node"          // the certificate names no known node
	// RateLimited: the caller (a source address, or a node) is over a rate
	// limit; the code is ResourceExhausted and RetryAfterHeader says when
	// to try again.
	RateLimited = "rate-limited"
	// TooLarge: a message was larger than the control plane accepts (code
	// ResourceExhausted); sending it again will not help.
	TooLarge = "message-too-large"
)
