package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
)

// ErrInvalidCSR says a certificate request was refused.
var ErrInvalidCSR = errors.New("invalid certificate request")

// MaxCSRSize bounds a DER certificate request; a P-256 request is about 250 bytes.
const MaxCSRSize = 4096

// NewKey makes a node key: ECDSA P-256.
func NewKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return k, nil
}

// NewCSR makes a DER certificate request for key with no names in it: the
// control plane chooses the node's identity.
func NewCSR(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "llorch-edge"},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("create certificate request: %w", err)
	}
	return der, nil
}

// ParseNodeCSR parses and checks a node's certificate request: a valid
// signature, an ECDSA P-256 key, and no names or extensions of its own. Every
// failure wraps ErrInvalidCSR.
func ParseNodeCSR(der []byte) (*x509.CertificateRequest, error) {
	if len(der) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrInvalidCSR)
	}
	if len(der) > MaxCSRSize {
		return nil, fmt.Errorf("%w: %d bytes is more than the %d allowed", ErrInvalidCSR, len(der), MaxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: bad signature: %v", ErrInvalidCSR, err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%w: key must be ECDSA P-256, got %s", ErrInvalidCSR, keyDescription(csr))
	}
	if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.URIs)+len(csr.EmailAddresses) > 0 {
		return nil, fmt.Errorf("%w: must not name itself (DNS, IP, URI or email SANs); the control plane chooses the node identity", ErrInvalidCSR)
	}
	if len(csr.Extensions) > 0 {
		return nil, fmt.Errorf("%w: must not request extensions", ErrInvalidCSR)
	}
	return csr, nil
}

func keyDescription(csr *x509.CertificateRequest) string {
	if pub, ok := csr.PublicKey.(*ecdsa.PublicKey); ok {
		return "ECDSA " + pub.Curve.Params().Name
	}
	return csr.PublicKeyAlgorithm.String()
}

// EncodeKeyPEM encodes a private key as a PKCS#8 PEM block.
func EncodeKeyPEM(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseKeyPEM parses a PKCS#8 PEM ECDSA private key.
func ParseKeyPEM(data []byte) (*ecdsa.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("parse key: no PRIVATE KEY block")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse key: %w", err)
	}
	ec, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, errors.New("parse key: not an ECDSA key")
	}
	return ec, nil
}
