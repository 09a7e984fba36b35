// Package certs holds the PKI pieces that the control plane and the edge
// share: join tokens, node keys and certificate requests, fingerprints, SPIFFE
// IDs, PEM files and the TLS configurations for each kind of connection.
// It has no state; the control plane's CA lives in control/pki.
package certs

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
)

// Fingerprint is "sha256:" and the lowercase hex SHA-256 of the certificate's DER.
func Fingerprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// ValidFingerprint reports whether s has the shape Fingerprint returns.
func ValidFingerprint(s string) bool {
	h, ok := strings.CutPrefix(s, "sha256:")
	if !ok || len(h) != 64 {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil && strings.ToLower(h) == h
}

// EncodeCertsPEM encodes certificates as concatenated PEM blocks.
func EncodeCertsPEM(chain []*x509.Certificate) []byte {
	var out []byte
	for _, c := range chain {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// ParseCertsPEM parses every CERTIFICATE block in data; it fails on none.
func ParseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate found in PEM data")
	}
	return certs, nil
}

// ParseCertsDER parses DER certificates, as they travel in the API.
func ParseCertsDER(ders [][]byte) ([]*x509.Certificate, error) {
	if len(ders) == 0 {
		return nil, errors.New("no certificates")
	}
	out := make([]*x509.Certificate, 0, len(ders))
	for _, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		out = append(out, c)
	}
	return out, nil
}

// DER returns the certificates' raw bytes, as they travel in the API.
func DER(chain []*x509.Certificate) [][]byte {
	out := make([][]byte, len(chain))
	for i, c := range chain {
		out[i] = c.Raw
	}
	return out
}

// SerialHex is a certificate's serial number as lowercase hex, the form the
// store and the logs use.
func SerialHex(cert *x509.Certificate) string {
	return cert.SerialNumber.Text(16)
}

// CheckNodeCertificate checks a chain the control plane issued to a node:
// the leaf is for pub, chains to roots for client authentication, and names
// node nodeID of trustDomain in its one SPIFFE ID.
func CheckNodeCertificate(chain []*x509.Certificate, pub crypto.PublicKey, roots *x509.CertPool, trustDomain, nodeID string) error {
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	leaf := chain[0]
	if k, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		return errors.New("certificate is not for this machine's key")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("certificate does not verify: %w", err)
	}
	if id, err := NodeIDFromCert(trustDomain, leaf); err != nil || id != nodeID {
		return fmt.Errorf("certificate does not name node %q of %q", nodeID, trustDomain)
	}
	return nil
}
