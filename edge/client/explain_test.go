package client_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/internal/refusal"
)

// refused is a Connect error as the control plane sends it.
func refused(code connect.Code, reason, retryAfterMs, msg string) *connect.Error {
	cerr := connect.NewError(code, errors.New(msg))
	if reason != "" {
		cerr.Meta().Set(refusal.ReasonHeader, reason)
	}
	if retryAfterMs != "" {
		cerr.Meta().Set(refusal.RetryAfterHeader, retryAfterMs)
	}
	return cerr
}

func TestExplain(t *testing.T) {
	sentinels := []error{edge.ErrRevoked, edge.ErrCertExpired, edge.ErrSuperseded, edge.ErrRateLimited, edge.ErrTooLarge}
	tests := []struct {
		name       string
		err        *connect.Error
		is         error // the one sentinel it is; nil: none
		retryable  bool
		retryAfter time.Duration
		text       string
	}{
		{"revoked", refused(connect.CodePermissionDenied, refusal.Revoked, "", "node n1 has been removed"),
			edge.ErrRevoked, false, 0, edge.ErrRevoked.Error()},
		{"expired", refused(connect.CodeUnauthenticated, refusal.Expired, "", "node n1: certificate expired at ..."),
			edge.ErrCertExpired, false, 0, edge.ErrCertExpired.Error()},
		{"superseded", refused(connect.CodePermissionDenied, refusal.Superseded, "", "certificate 1f superseded"),
			edge.ErrSuperseded, false, 0, edge.ErrSuperseded.Error()},
		{"rate limited", refused(connect.CodeResourceExhausted, refusal.RateLimited, "3000", "too many enrollments from 10.0.0.1"),
			edge.ErrRateLimited, true, 3 * time.Second, "rate-limited by the control plane: too many enrollments from 10.0.0.1"},
		{"too large", refused(connect.CodeResourceExhausted, refusal.TooLarge, "", "message is larger than 1 MiB"),
			edge.ErrTooLarge, false, 0, "refused by the control plane as too large: message is larger than 1 MiB"},
		{"resource exhausted without a reason", refused(connect.CodeResourceExhausted, "", "", "message size 2000000 exceeds 1048576"),
			edge.ErrTooLarge, false, 0, "refused by the control plane as too large: message size 2000000 exceeds 1048576"},
		{"paced", refused(connect.CodeUnavailable, "", "1500", "registrations are paced"),
			nil, true, 1500 * time.Millisecond, "control plane unreachable: registrations are paced"},
		{"hint capped at a minute", refused(connect.CodeUnavailable, "", "86400000", "shutting down"),
			nil, true, time.Minute, "control plane unreachable: shutting down"},
		{"bad hint ignored", refused(connect.CodeUnavailable, "", "soon", "shutting down"),
			nil, true, 0, "control plane unreachable: shutting down"},
		{"unknown node", refused(connect.CodePermissionDenied, refusal.Unknown, "", "node n1 is not known to this control plane"),
			nil, false, 0, "node n1 is not known to this control plane"},
		{"no certificate", refused(connect.CodeUnauthenticated, refusal.NoCert, "", "node procedures need the node's client certificate"),
			nil, false, 0, "node procedures need the node's client certificate"},
		{"bad request", refused(connect.CodeInvalidArgument, "", "", "bad CSR"),
			nil, false, 0, "bad CSR"},
		{"internal", refused(connect.CodeInternal, "", "", "database is locked"),
			nil, true, 0, "database is locked"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wrapped := fmt.Errorf("call: %w", tt.err)
			err := client.Explain(wrapped)
			ref, ok := errors.AsType[*edge.RefusalError](err)
			if !ok {
				t.Fatalf("Explain = %T %v, want *edge.RefusalError", err, err)
			}
			if ref.Code != tt.err.Code() {
				t.Errorf("Code = %v, want %v", ref.Code, tt.err.Code())
			}
			if err.Error() != tt.text {
				t.Errorf("Error() = %q\nwant %q", err, tt.text)
			}
			for _, s := range sentinels {
				if got := errors.Is(err, s); got != (s == tt.is) {
					t.Errorf("errors.Is(err, %q) = %v", s, got)
				}
			}
			if got := ref.Retryable(); got != tt.retryable {
				t.Errorf("Retryable() = %v, want %v", got, tt.retryable)
			}
			if ref.RetryAfter != tt.retryAfter {
				t.Errorf("RetryAfter = %v, want %v", ref.RetryAfter, tt.retryAfter)
			}
			// The original error stays reachable.
			if cerr, ok := errors.AsType[*connect.Error](err); !ok || cerr != tt.err {
				t.Errorf("errors.As(*connect.Error) = %v, %v; want the original", cerr, ok)
			}
			if !errors.Is(err, wrapped) || errors.Unwrap(err) != wrapped {
				t.Error("Unwrap does not return the original error")
			}
			if again := client.Explain(err); again != err {
				t.Errorf("Explain of an explained error = %v, want it unchanged", again)
			}
		})
	}
}

func TestExplainLeavesOtherErrors(t *testing.T) {
	plain := errors.New("disk full")
	if got := client.Explain(plain); got != plain {
		t.Errorf("Explain(plain) = %v, want it unchanged", got)
	}
	if got := client.Explain(nil); got != nil {
		t.Errorf("Explain(nil) = %v", got)
	}
}
