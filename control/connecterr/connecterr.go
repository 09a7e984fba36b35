// Package connecterr turns the control plane's domain errors into what goes
// on the wire: a Connect code and, for the refusals an edge acts on, the
// Llorch-Reason and Llorch-Retry-After-Ms headers (internal/refusal). It is
// the one place a wire code is chosen: the API handlers, the edge session
// and the authorization gate all return their errors through Error.
// Internal errors are logged here, once, and reach the caller only as
// "internal error".
package connecterr

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/internal/refusal"
)

// Error returns err as a Connect error. A *connect.Error passes through
// (Connect's own, such as a message over the size limit, gets its reason);
// context errors keep their codes; domain errors get theirs; anything else
// is logged on log and becomes CodeInternal.
func Error(ctx context.Context, log *slog.Logger, err error) *connect.Error {
	var (
		cerr     *connect.Error
		retry    *control.RetryLater
		mismatch *certs.FingerprintMismatchError
	)
	switch {
	case err == nil:
		return nil
	case errors.As(err, &cerr):
		if cerr.Code() == connect.CodeResourceExhausted && cerr.Meta().Get(refusal.ReasonHeader) == "" {
			cerr.Meta().Set(refusal.ReasonHeader, refusal.TooLarge)
		}
		return cerr
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	case errors.As(err, &retry) && errors.Is(err, control.ErrRateLimited):
		return withRetry(refuse(connect.CodeResourceExhausted, refusal.RateLimited, err), retry)
	case errors.As(err, &retry):
		return withRetry(connect.NewError(connect.CodeUnavailable, err), retry)
	case errors.Is(err, control.ErrTooLarge):
		return refuse(connect.CodeResourceExhausted, refusal.TooLarge, err)

	case errors.Is(err, control.ErrNodeRemoved):
		return refuse(connect.CodePermissionDenied, refusal.Revoked, err)
	case errors.Is(err, control.ErrNotCurrentCert):
		return refuse(connect.CodePermissionDenied, refusal.Superseded, err)
	case errors.Is(err, control.ErrCertExpired):
		return refuse(connect.CodeUnauthenticated, refusal.Expired, err)
	case errors.Is(err, control.ErrNoClientCert):
		return refuse(connect.CodeUnauthenticated, refusal.NoCert, err)
	case errors.Is(err, control.ErrUnknownNode):
		return refuse(connect.CodeNotFound, refusal.Unknown, err)

	case errors.Is(err, control.ErrNotFound):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, certs.ErrMalformedToken),
		errors.Is(err, certs.ErrInvalidCSR),
		errors.Is(err, control.ErrInvalidArgument):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, control.ErrTokenUnknown),
		errors.Is(err, control.ErrWrongCA),
		errors.As(err, &mismatch),
		errors.Is(err, control.ErrUnauthenticated):
		return connect.NewError(connect.CodeUnauthenticated, err)
	case errors.Is(err, control.ErrKeyEnrolled):
		return connect.NewError(connect.CodeAlreadyExists, err)
	case errors.Is(err, control.ErrTokenUsed),
		errors.Is(err, control.ErrTokenExpired),
		errors.Is(err, control.ErrTokenRevoked),
		errors.Is(err, control.ErrPermissionDenied):
		return connect.NewError(connect.CodePermissionDenied, err)
	case errors.Is(err, control.ErrNotConnected):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, control.ErrSessionReplaced), errors.Is(err, control.ErrTooSlow):
		return connect.NewError(connect.CodeAborted, err)
	case errors.Is(err, control.ErrStorageFull):
		log.ErrorContext(ctx, "storage full", "err", err)
		return connect.NewError(connect.CodeResourceExhausted, control.ErrStorageFull)
	}
	log.ErrorContext(ctx, "internal error", "err", err)
	return connect.NewError(connect.CodeInternal, errors.New("internal error"))
}

func refuse(code connect.Code, reason string, err error) *connect.Error {
	cerr := connect.NewError(code, err)
	cerr.Meta().Set(refusal.ReasonHeader, reason)
	return cerr
}

func withRetry(cerr *connect.Error, r *control.RetryLater) *connect.Error {
	cerr.Meta().Set(refusal.RetryAfterHeader, strconv.FormatInt(max(r.After.Milliseconds(), 1), 10))
	return cerr
}

// HTTPStatus is the HTTP status of a Connect code, as the Connect protocol
// maps them (for routes that answer in plain HTTP).
func HTTPStatus(code connect.Code) int {
	switch code {
	case connect.CodeCanceled:
		return 499
	case connect.CodeInvalidArgument, connect.CodeOutOfRange, connect.CodeFailedPrecondition:
		return http.StatusBadRequest
	case connect.CodeDeadlineExceeded:
		return http.StatusGatewayTimeout
	case connect.CodeNotFound:
		return http.StatusNotFound
	case connect.CodeAlreadyExists, connect.CodeAborted:
		return http.StatusConflict
	case connect.CodePermissionDenied:
		return http.StatusForbidden
	case connect.CodeResourceExhausted:
		return http.StatusTooManyRequests
	case connect.CodeUnimplemented:
		return http.StatusNotImplemented
	case connect.CodeUnavailable:
		return http.StatusServiceUnavailable
	case connect.CodeUnauthenticated:
		return http.StatusUnauthorized
	}
	return http.StatusInternalServerError
}
