package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
)

// ServerTLSConfig is the control plane's one public port: TLS 1.3, HTTP/2
// (and HTTP/1.1 for gRPC-web), a client certificate verified against
// clientCAs when one is given. The handshake names clientCAs' subjects to the
// client (certificate_authorities), which is how an edge knows it may send
// its leaf alone. Whether a procedure needs a certificate is decided per
// procedure by the authorization interceptor, not here.
//
// Session tickets are on: a resumed session carries the client's verified
// chain, which crypto/tls checks for expiry and against clientCAs again, and
// the interceptor checks the node on every request. The caller sets the
// ticket keys (SetSessionTicketKeys) so that tickets survive a restart.
func ServerTLSConfig(getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error), clientCAs *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: getCert,
		ClientAuth:     tls.VerifyClientCertIfGiven,
		ClientCAs:      clientCAs,
		NextProtos:     []string{"h2", "http/1.1"},
	}
}

// NodeClientTLSConfig is an edge's mTLS configuration: the control plane must
// chain to roots, and the edge presents the certificate getCert returns. The
// configuration keeps the control plane's session tickets, so that after a
// control-plane restart the edge resumes its TLS session instead of a full
// handshake; a ticket is for the certificate the edge presented when it got
// it, so a renewed certificate needs a new configuration.
func NodeClientTLSConfig(roots *x509.CertPool, getCert func(*tls.CertificateRequestInfo) (*tls.Certificate, error)) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		RootCAs:              roots,
		GetClientCertificate: getCert,
		NextProtos:           []string{"h2"},
		ClientSessionCache:   tls.NewLRUClientSessionCache(4),
	}
}

// FingerprintMismatchError says the control plane's CA is not the one the
// join token pins. It is raised during the TLS handshake, before the token is sent.
type FingerprintMismatchError struct {
	Want string   // the token's fingerprint
	Got  []string // fingerprints of the certificates the server presented
}

func (e *FingerprintMismatchError) Error() string {
	return fmt.Sprintf("the control plane's CA does not match the join token: the token pins %s, the server presented %v; the token was made by another control plane, or something is in the way", e.Want, e.Got)
}

// PinnedTLSConfig is used to enroll, before the edge has a CA bundle: the
// server's chain must include a root whose fingerprint is fingerprint, and the
// server certificate must chain to that root and be valid for host.
func PinnedTLSConfig(fingerprint, host string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"h2"},
		// The standard verification needs a root we do not have yet; the
		// pinned verification below replaces it.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := VerifyPinned(cs.PeerCertificates, fingerprint, host)
			return err
		},
	}
}

// VerifyPinned checks a presented chain against a pinned root fingerprint and
// returns the root it found.
func VerifyPinned(chain []*x509.Certificate, fingerprint, host string) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("server presented no certificate")
	}
	var root *x509.Certificate
	var seen []string
	intermediates := x509.NewCertPool()
	for _, c := range chain[1:] {
		fp := Fingerprint(c)
		seen = append(seen, fp)
		if fp == fingerprint {
			root = c
			continue
		}
		intermediates.AddCert(c)
	}
	if root == nil {
		return nil, &FingerprintMismatchError{Want: fingerprint, Got: seen}
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	_, err := chain[0].Verify(x509.VerifyOptions{
		DNSName:       host,
		Roots:         roots,
		Intermediates: intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, fmt.Errorf("verify control plane certificate: %w", err)
	}
	return root, nil
}
