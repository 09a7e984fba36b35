package certs_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"net"
	"net/url"
	"testing"

	"github.com/llorch/llorch/certs"
)

func csrDER(tb testing.TB, key any, tmpl *x509.CertificateRequest) []byte {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

func TestParseNodeCSR(t *testing.T) {
	p256, _ := certs.NewKey()
	good, err := certs.NewCSR(p256)
	if err != nil {
		t.Fatal(err)
	}
	if csr, err := certs.ParseNodeCSR(good); err != nil || !p256.PublicKey.Equal(csr.PublicKey) {
		t.Fatalf("ParseNodeCSR(good) = %v", err)
	}

	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	spiffe, _ := url.Parse("spiffe://llorch.local/node/someone-else")
	tampered := append([]byte(nil), good...)
	tampered[len(tampered)-5] ^= 0xff

	tests := []struct {
		name string
		der  []byte
	}{
		{"empty", nil},
		{"garbage", []byte("not a csr")},
		{"truncated", good[:len(good)/2]},
		{"oversized", make([]byte, certs.MaxCSRSize+1)},
		{"bad signature", tampered},
		{"P-384 key", csrDER(t, p384, &x509.CertificateRequest{})},
		{"RSA key", csrDER(t, rsaKey, &x509.CertificateRequest{})},
		{"Ed25519 key", csrDER(t, edKey, &x509.CertificateRequest{})},
		{"DNS SAN", csrDER(t, p256, &x509.CertificateRequest{DNSNames: []string{"control.example"}})},
		{"IP SAN", csrDER(t, p256, &x509.CertificateRequest{IPAddresses: []net.IP{net.ParseIP("10.0.0.1")}})},
		{"URI SAN", csrDER(t, p256, &x509.CertificateRequest{URIs: []*url.URL{spiffe}})},
		{"email SAN", csrDER(t, p256, &x509.CertificateRequest{EmailAddresses: []string{"a@b.c"}})},
		{"extension", csrDER(t, p256, &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Value: []byte{0x30, 0x03, 0x01, 0x01, 0xff}}}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := certs.ParseNodeCSR(tt.der); !errors.Is(err, certs.ErrInvalidCSR) {
				t.Fatalf("ParseNodeCSR = %v, want ErrInvalidCSR", err)
			}
		})
	}
}

// FuzzParseNodeCSR: no input panics; whatever is accepted is a P-256 request
// with a valid signature and no names.
func FuzzParseNodeCSR(f *testing.F) {
	key, _ := certs.NewKey()
	good, _ := certs.NewCSR(key)
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte{})
	f.Add([]byte{0x30, 0x82, 0xff, 0xff})
	f.Add(csrDER(f, key, &x509.CertificateRequest{DNSNames: []string{"x"}}))
	f.Fuzz(func(t *testing.T, der []byte) {
		csr, err := certs.ParseNodeCSR(der)
		if err != nil {
			if !errors.Is(err, certs.ErrInvalidCSR) {
				t.Fatalf("error %v does not wrap ErrInvalidCSR", err)
			}
			return
		}
		if err := csr.CheckSignature(); err != nil {
			t.Fatalf("accepted a bad signature: %v", err)
		}
		pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
		if !ok || pub.Curve != elliptic.P256() {
			t.Fatal("accepted a key that is not P-256")
		}
		if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.URIs)+len(csr.EmailAddresses) > 0 {
			t.Fatal("accepted a request with names")
		}
	})
}

func TestKeyPEMRoundTrip(t *testing.T) {
	key, _ := certs.NewKey()
	pemData, err := certs.EncodeKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	back, err := certs.ParseKeyPEM(pemData)
	if err != nil || !back.Equal(key) {
		t.Fatalf("round trip: %v", err)
	}
	if _, err := certs.ParseKeyPEM([]byte("nope")); err == nil {
		t.Fatal("ParseKeyPEM accepted garbage")
	}
}
