// Package api adapts the Connect services in schema/ to the control plane's
// domain: it turns requests into calls on enroll and the store, and domain
// errors into Connect codes (in one place, errorToConnect).
package api

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/enroll"
	"github.com/llorch/llorch/control/registry"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// Store is what the handlers read and change directly.
type Store interface {
	GetNode(ctx context.Context, id string) (control.Node, error)
	ListNodes(ctx context.Context) ([]control.Node, error)
	ListTokens(ctx context.Context) ([]control.JoinToken, error)
	RevokeToken(ctx context.Context, id string, now time.Time) error
	ListEvents(ctx context.Context, nodeID string, limit int) ([]control.Event, error)
	ListEventsAfter(ctx context.Context, nodeID string, afterID int64, limit int) ([]control.Event, error)
}

// errorToConnect maps a domain error to a Connect error. Internal errors are
// logged here, once, and reach the caller only as "internal error".
func errorToConnect(ctx context.Context, log *slog.Logger, err error) error {
	var cerr *connect.Error
	var mismatch *certs.FingerprintMismatchError
	switch {
	case errors.As(err, &cerr):
		return cerr
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	case errors.Is(err, control.ErrNotFound), errors.Is(err, registry.ErrUnknownNode):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, certs.ErrMalformedToken),
		errors.Is(err, certs.ErrInvalidCSR),
		errors.Is(err, control.ErrInvalidArgument):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, control.ErrTokenUnknown),
		errors.Is(err, enroll.ErrWrongCA),
		errors.As(err, &mismatch):
		return connect.NewError(connect.CodeUnauthenticated, err)
	case errors.Is(err, control.ErrTokenUsed),
		errors.Is(err, control.ErrTokenExpired),
		errors.Is(err, control.ErrTokenRevoked),
		errors.Is(err, control.ErrNodeRemoved),
		errors.Is(err, control.ErrNotCurrentCert),
		errors.Is(err, control.ErrPermissionDenied):
		return connect.NewError(connect.CodePermissionDenied, err)
	case errors.Is(err, control.ErrStorageFull):
		log.ErrorContext(ctx, "storage full", "err", err)
		return connect.NewError(connect.CodeResourceExhausted, control.ErrStorageFull)
	case errors.Is(err, registry.ErrNotConnected):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, control.ErrUnauthenticated):
		return connect.NewError(connect.CodeUnauthenticated, err)
	}
	log.ErrorContext(ctx, "internal error", "err", err)
	return connect.NewError(connect.CodeInternal, errors.New("internal error"))
}

func nodeToProto(n control.Node, trustDomain string) *llorchv1.Node {
	return &llorchv1.Node{
		Id:                  n.ID,
		Name:                n.Name,
		Status:              statusToProto(n.Status),
		Labels:              n.Labels,
		SpiffeId:            certs.NodeSPIFFEID(trustDomain, n.ID),
		CertificateSerial:   n.CertSerial,
		CertificateNotAfter: timestamp(n.CertNotAfter),
		EnrolledAt:          timestamp(n.EnrolledAt),
		LastSeen:            timestamp(n.LastSeen),
		Draining:            n.Draining,
		TokenId:             n.TokenID,
		StatusReason:        n.StatusReason,
	}
}

func statusToProto(s control.NodeStatus) llorchv1.NodeStatus {
	switch s {
	case control.StatusEnrolled:
		return llorchv1.NodeStatus_NODE_STATUS_ENROLLED
	case control.StatusOnline:
		return llorchv1.NodeStatus_NODE_STATUS_ONLINE
	case control.StatusDisconnected:
		return llorchv1.NodeStatus_NODE_STATUS_DISCONNECTED
	case control.StatusOffline:
		return llorchv1.NodeStatus_NODE_STATUS_OFFLINE
	case control.StatusUnknown:
		return llorchv1.NodeStatus_NODE_STATUS_UNKNOWN
	case control.StatusRemoved:
		return llorchv1.NodeStatus_NODE_STATUS_REMOVED
	}
	return llorchv1.NodeStatus_NODE_STATUS_UNSPECIFIED
}

func tokenToProto(t control.JoinToken) *llorchv1.JoinToken {
	return &llorchv1.JoinToken{
		Id:        t.ID,
		Name:      t.Name,
		Labels:    t.Labels,
		CreatedAt: timestamp(t.CreatedAt),
		ExpiresAt: timestamp(t.ExpiresAt),
		MaxUses:   int32(t.MaxUses),
		Uses:      int32(t.Uses),
		Revoked:   !t.RevokedAt.IsZero(),
	}
}

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func duration(d *durationpb.Duration) time.Duration {
	if d == nil {
		return 0
	}
	return d.AsDuration()
}

func rootsDER(roots []*x509.Certificate) [][]byte { return certs.DER(roots) }

func errInvalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{control.ErrInvalidArgument}, args...)...)
}
