package certs_test

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/llorch/llorch/certs"
)

type testCA struct {
	root, inter       *x509.Certificate
	rootKey, interKey *ecdsa.PrivateKey
}

func newTestCA(tb testing.TB) testCA {
	tb.Helper()
	rootKey, _ := certs.NewKey()
	interKey, _ := certs.NewKey()
	root := sign(tb, &x509.Certificate{Subject: pkix.Name{CommonName: "root"}, IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}, nil, rootKey, rootKey)
	inter := sign(tb, &x509.Certificate{Subject: pkix.Name{CommonName: "inter"}, IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}, root, rootKey, interKey)
	return testCA{root: root, inter: inter, rootKey: rootKey, interKey: interKey}
}

func sign(tb testing.TB, tmpl, parent *x509.Certificate, parentKey, key *ecdsa.PrivateKey) *x509.Certificate {
	tb.Helper()
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.NotBefore = time.Now().Add(-time.Minute)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func (ca testCA) serverChain(tb testing.TB) []*x509.Certificate {
	key, _ := certs.NewKey()
	leaf := sign(tb, &x509.Certificate{DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, ca.inter, ca.interKey, key)
	return []*x509.Certificate{leaf, ca.inter, ca.root}
}

func TestVerifyPinned(t *testing.T) {
	ca := newTestCA(t)
	other := newTestCA(t)
	chain := ca.serverChain(t)
	fp := certs.Fingerprint(ca.root)

	if root, err := certs.VerifyPinned(chain, fp, "127.0.0.1"); err != nil || root != ca.root {
		t.Fatalf("VerifyPinned(good) = %v", err)
	}
	if _, err := certs.VerifyPinned(chain, fp, "localhost"); err != nil {
		t.Fatalf("VerifyPinned(localhost) = %v", err)
	}
	var mismatch *certs.FingerprintMismatchError
	if _, err := certs.VerifyPinned(chain, certs.Fingerprint(other.root), "127.0.0.1"); !errors.As(err, &mismatch) {
		t.Fatalf("other CA's fingerprint: %v, want FingerprintMismatchError", err)
	}
	if _, err := certs.VerifyPinned(chain[:2], fp, "127.0.0.1"); !errors.As(err, &mismatch) {
		t.Fatalf("chain without the root: %v, want FingerprintMismatchError", err)
	}
	if _, err := certs.VerifyPinned(chain, fp, "control.example"); err == nil {
		t.Fatal("a certificate for other names was accepted")
	}
	// A chain that carries the pinned root but whose leaf another CA signed.
	forged := append(other.serverChain(t)[:2], ca.root)
	if _, err := certs.VerifyPinned(forged, fp, "127.0.0.1"); err == nil || errors.As(err, &mismatch) {
		t.Fatalf("forged chain: %v, want a verification error", err)
	}
	if _, err := certs.VerifyPinned(nil, fp, "127.0.0.1"); err == nil {
		t.Fatal("empty chain accepted")
	}
}

func TestNodeSPIFFEID(t *testing.T) {
	id := certs.NodeSPIFFEID("llorch.local", "abc123")
	if id != "spiffe://llorch.local/node/abc123" {
		t.Fatalf("NodeSPIFFEID = %s", id)
	}
	if got, err := certs.NodeIDFromSPIFFEID("llorch.local", id); err != nil || got != "abc123" {
		t.Fatalf("round trip = %q, %v", got, err)
	}
	for _, bad := range []string{
		"spiffe://other.local/node/abc123",
		"spiffe://llorch.local/agent/abc123",
		"spiffe://llorch.local/node/abc/def",
		"spiffe://llorch.local/node/",
		"spiffe://llorch.local/node/ABC",
		"https://llorch.local/node/abc123",
	} {
		if _, err := certs.NodeIDFromSPIFFEID("llorch.local", bad); err == nil {
			t.Errorf("NodeIDFromSPIFFEID(%q) accepted", bad)
		}
	}
	ca := newTestCA(t)
	key, _ := certs.NewKey()
	u1, _ := url.Parse(id)
	u2, _ := url.Parse("spiffe://llorch.local/node/other")
	two := sign(t, &x509.Certificate{URIs: []*url.URL{u1, u2}}, ca.inter, ca.interKey, key)
	if _, err := certs.NodeIDFromCert("llorch.local", two); err == nil {
		t.Error("a certificate with two SPIFFE IDs was accepted")
	}
}
