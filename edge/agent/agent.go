// Package agent runs an enrolled edge: it checks in with the control plane as
// its node and keeps its certificate renewed. (The long-lived session with
// heartbeats builds on it.)
package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/renew"
	"github.com/llorch/llorch/edge/state"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// Config configures an agent.
type Config struct {
	StateDir string
	Clock    clock.Clock  // nil: the wall clock
	Logger   *slog.Logger // nil: discard
}

// Agent is an enrolled edge at work.
type Agent struct {
	cfg Config
	id  *client.Identity
	log *slog.Logger
}

// New returns an agent acting as id, a loaded and unexpired identity.
func New(cfg Config, id state.Identity) *Agent {
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Agent{cfg: cfg, id: client.NewIdentity(id), log: cfg.Logger.With("node_id", id.NodeID)}
}

// Identity is the identity in use.
func (a *Agent) Identity() state.Identity { return a.id.Get() }

// Run checks in and renews the certificate when due, until ctx ends or the
// node can no longer act (revoked, expired).
func (a *Agent) Run(ctx context.Context) error {
	nodes := client.NodeClient(a.id)
	resp, err := nodes.WhoAmI(ctx, connect.NewRequest(&llorchv1.WhoAmIRequest{}))
	if err != nil {
		err = client.Explain(err)
		if errors.Is(err, edge.ErrRevoked) || errors.Is(err, edge.ErrSuperseded) {
			return err
		}
		// Unreachable is not fatal: renewal retries, and the session reconnects.
		a.log.WarnContext(ctx, "check-in failed", "err", err)
	} else {
		a.log.InfoContext(ctx, "checked in", "name", resp.Msg.GetNode().GetName(), "control", a.id.Get().ControlURL, "certificate_not_after", a.id.Get().NotAfter())
	}
	err = renew.Run(ctx, renew.Config{
		Clock:  a.cfg.Clock,
		Logger: a.log,
		Current: func() (time.Time, time.Time) {
			leaf := a.id.Get().Leaf()
			return leaf.NotBefore, leaf.NotAfter
		},
		Renew: func(ctx context.Context) error { return a.Renew(ctx, nodes) },
	})
	if errors.Is(err, renew.ErrExpired) {
		return fmt.Errorf("%w: %v", edge.ErrCertExpired, err)
	}
	return err
}

// Renew makes a fresh key, has the control plane sign it, saves the new
// identity and starts presenting it.
func (a *Agent) Renew(ctx context.Context, nodes interface {
	RenewCertificate(context.Context, *connect.Request[llorchv1.RenewCertificateRequest]) (*connect.Response[llorchv1.RenewCertificateResponse], error)
}) error {
	cur := a.id.Get()
	key, err := certs.NewKey()
	if err != nil {
		return err
	}
	csr, err := certs.NewCSR(key)
	if err != nil {
		return err
	}
	resp, err := nodes.RenewCertificate(ctx, connect.NewRequest(&llorchv1.RenewCertificateRequest{Csr: csr}))
	if err != nil {
		return fmt.Errorf("renew: %w", client.Explain(err))
	}
	chain, err := certs.ParseCertsDER(resp.Msg.GetCertificateChain())
	if err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	leaf := chain[0]
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return errors.New("renew: the certificate is not for the new key")
	}
	if nodeID, err := certs.NodeIDFromCert(cur.TrustDomain, leaf); err != nil || nodeID != cur.NodeID {
		return errors.New("renew: the certificate names another node")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: cur.RootPool(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("renew: certificate does not verify: %w", err)
	}
	next := cur
	next.Key, next.Chain = key, chain
	if err := state.Save(a.cfg.StateDir, next); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	a.id.Set(next)
	a.log.InfoContext(ctx, "certificate renewed", "serial", certs.SerialHex(leaf), "not_after", leaf.NotAfter)
	return nil
}
