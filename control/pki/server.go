package pki

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/llorch/llorch/certs"
)

// GetCertificate is for tls.Config.GetCertificate. It returns the server
// certificate with the intermediate and the root after it: the root lets an
// edge that has only a join token check the CA fingerprint it pins
// (certs.VerifyPinned). It re-issues the certificate when less than a third
// of its lifetime is left; if that fails it logs and keeps serving the old
// one until it expires.
func (a *Authority) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	cur := a.server.Load()
	now := a.cfg.Clock.Now()
	if !dueForRenewal(cur.Leaf, now) {
		return cur, nil
	}
	ctx := context.Background()
	if err := a.renewServer(ctx, now, "less than a third of its lifetime left"); err != nil {
		a.cfg.Logger.ErrorContext(ctx, "re-issue server certificate", "err", err)
		if now.Before(cur.Leaf.NotAfter) {
			return cur, nil
		}
		return nil, fmt.Errorf("server certificate expired and re-issue failed: %w", err)
	}
	return a.server.Load(), nil
}

// renewServer issues, stores and installs a new server certificate. At run
// time (a certificate is installed) it does nothing if a concurrent caller
// already replaced the certificate.
func (a *Authority) renewServer(ctx context.Context, now time.Time, reason string) error {
	a.renewMu.Lock()
	defer a.renewMu.Unlock()
	if cur := a.server.Load(); cur != nil && !dueForRenewal(cur.Leaf, now) {
		return nil
	}
	leaf, key, err := a.issueServer(now)
	if err != nil {
		return err
	}
	a.server.Store(a.serverTLS(leaf, key))
	a.cfg.Logger.InfoContext(ctx, "issued server certificate", "reason", reason,
		"serial", certs.SerialHex(leaf), "sans", a.cfg.SANs, "not_after", leaf.NotAfter)
	return nil
}

func (a *Authority) serverTLS(leaf *x509.Certificate, key *ecdsa.PrivateKey) *tls.Certificate {
	return &tls.Certificate{
		Certificate: [][]byte{leaf.Raw, a.inter.Raw, a.root.Raw},
		PrivateKey:  key,
		Leaf:        leaf,
	}
}
