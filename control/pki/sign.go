package pki

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"time"

	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/provisioner"
	"go.step.sm/crypto/jose"

	"github.com/llorch/llorch/certs"
)

const (
	// provisionerName is the embedded authority's one provisioner. It is
	// written into every node certificate (step's provisioner extension).
	provisionerName = "llorch-node"
	// ottLifetime bounds the internal one-time tokens; step allows a minute
	// of leeway on top.
	ottLifetime = time.Minute
)

// nodeTemplate is the provisioner's X.509 template. The subject and the SANs
// come from the internal token (sub and sans), never from the certificate
// request, so the control plane alone chooses the identity.
const nodeTemplate = `{
	"subject": {"commonName": {{ toJson .Subject.CommonName }}},
	"sans": {{ toJson .SANs }},
	"keyUsage": ["digitalSignature"],
	"extKeyUsage": ["clientAuth"]
}`

// ottClaims are the claims of the internal one-time token that step's JWK
// provisioner checks.
type ottClaims struct {
	jose.Claims
	SANs []string `json:"sans"`
}

// startStep builds the embedded smallstep authority around the intermediate,
// with a JWK provisioner whose key is made here and never stored: only this
// process can mint tokens for it.
func (a *Authority) startStep() error {
	jwk, err := jose.GenerateJWK("EC", "P-256", "ES256", "sig", "", 0)
	if err != nil {
		return fmt.Errorf("generate provisioner key: %w", err)
	}
	a.ottKey, err = jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jwk},
		new(jose.SignerOptions).WithType("JWT"))
	if err != nil {
		return fmt.Errorf("token signer: %w", err)
	}
	pub := jwk.Public()
	lifetime := &provisioner.Duration{Duration: a.cfg.NodeCertLifetime}
	prov := &provisioner.JWK{
		Type: "JWK",
		Name: provisionerName,
		Key:  &pub,
		Claims: &provisioner.Claims{
			MinTLSDur:     &provisioner.Duration{Duration: MinNodeCertLifetime},
			DefaultTLSDur: lifetime,
			MaxTLSDur:     lifetime,
		},
		Options: &provisioner.Options{X509: &provisioner.X509Options{Template: nodeTemplate}},
	}
	// The token audience is built from DNSNames; the name is internal.
	dnsName := a.cfg.TrustDomain
	a.audience = "https://" + dnsName + "/1.0/sign"
	stepCfg := &authority.Config{
		DNSNames: []string{dnsName},
		AuthorityConfig: &authority.AuthConfig{
			Provisioners: provisioner.List{prov},
			Backdate:     &provisioner.Duration{Duration: backdate},
			// Step refuses tokens issued before it started, a stopgap for
			// tokens that outlive a restart. Ours live a minute, are signed
			// by a key made at each Open, and are checked against the
			// injected clock, so the check adds nothing but clock trouble.
			DisableIssuedAtCheck: true,
		},
	}
	a.step, err = authority.NewEmbedded(
		authority.WithConfig(stepCfg),
		authority.WithX509RootCerts(a.root),
		authority.WithX509Signer(a.inter, a.interKey),
		authority.WithDatabase(newTokenDB(a.cfg.Clock, 2*ottLifetime+time.Minute, maxTokens)),
		authority.WithQuietInit(),
	)
	return err
}

// SignNode signs csr for nodeID and returns [leaf, intermediate]. The caller
// has checked the request (signature, P-256 key); whatever names it carries
// are ignored: the certificate has subject CN = nodeID, exactly one URI SAN,
// spiffeID(nodeID), no DNS or IP names, the clientAuth usage, and is valid
// from a minute ago for the configured node certificate lifetime.
//
// Errors: an invalid nodeID wraps control.ErrInvalidArgument; a request with
// no or a non-P-256 key wraps certs.ErrInvalidCSR; anything else is
// internal.
func (a *Authority) SignNode(ctx context.Context, csr *x509.CertificateRequest, nodeID string) ([]*x509.Certificate, error) {
	if a.closed.Load() {
		return nil, errors.New("sign node certificate: authority is closed")
	}
	spiffeID := a.spiffeID(nodeID)
	if _, err := a.nodeIDFromSPIFFE(spiffeID); err != nil {
		return nil, fmt.Errorf("sign node certificate: node ID %q: %w", nodeID, err)
	}
	if csr == nil {
		return nil, fmt.Errorf("%w: none given", certs.ErrInvalidCSR)
	}
	if pub, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%w: key must be ECDSA P-256", certs.ErrInvalidCSR)
	}

	now := a.cfg.Clock.Now()
	tok, err := jose.Signed(a.ottKey).Claims(ottClaims{
		Claims: jose.Claims{
			ID:        rand.Text(),
			Issuer:    provisionerName,
			Subject:   nodeID,
			Audience:  jose.Audience{a.audience},
			NotBefore: jose.NewNumericDate(now),
			IssuedAt:  jose.NewNumericDate(now),
			Expiry:    jose.NewNumericDate(now.Add(ottLifetime)),
		},
		SANs: []string{spiffeID},
	}).CompactSerialize()
	if err != nil {
		return nil, fmt.Errorf("sign node certificate: mint token: %w", err)
	}

	ctx = provisioner.NewContextWithMethod(ctx, provisioner.SignMethod)
	opts, err := a.step.Authorize(ctx, tok)
	if err != nil {
		return nil, fmt.Errorf("sign node certificate: authorize: %w", err)
	}

	// Step checks the request's subject and SANs against the token. The
	// identity is ours to choose, so it sees a copy that names exactly what
	// the token says; the signature still covers the original bytes
	// (RawTBSCertificateRequest) and the key is the requester's.
	req := *csr
	req.Subject = pkix.Name{CommonName: nodeID}
	req.DNSNames, req.IPAddresses, req.EmailAddresses, req.URIs = nil, nil, nil, nil
	req.Extensions, req.ExtraExtensions = nil, nil

	notAfter := minTime(now.Add(a.cfg.NodeCertLifetime), a.inter.NotAfter)
	chain, err := a.step.SignWithContext(ctx, &req, provisioner.SignOptions{
		NotBefore: provisioner.NewTimeDuration(now.Add(-backdate)),
		NotAfter:  provisioner.NewTimeDuration(notAfter),
	}, opts...)
	if err != nil {
		return nil, fmt.Errorf("sign node certificate: %w", err)
	}
	if len(chain) < 2 {
		return nil, fmt.Errorf("sign node certificate: authority returned a chain of %d", len(chain))
	}
	a.cfg.Logger.DebugContext(ctx, "signed node certificate", "node", nodeID,
		"serial", certs.SerialHex(chain[0]), "not_after", chain[0].NotAfter)
	return chain[:2], nil
}
