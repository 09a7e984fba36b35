// Package api adapts the Connect services in schema/ to the control plane's
// domain: it turns requests into calls on enroll, the registry and the
// store. Its errors go to the wire through control/connecterr.
package api

import (
	"context"
	"crypto/x509"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
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
