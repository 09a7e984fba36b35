package pki_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/pki"
)

// stepProvisionerOID is smallstep's provisioner extension.
var stepProvisionerOID = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 37476, 9000, 64, 1}

// edgeCSR makes the request an edge sends: a fresh P-256 key, no names.
func edgeCSR(tb testing.TB) *x509.CertificateRequest {
	tb.Helper()
	key, err := certs.NewKey()
	if err != nil {
		tb.Fatal(err)
	}
	der, err := certs.NewCSR(key)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := certs.ParseNodeCSR(der)
	if err != nil {
		tb.Fatal(err)
	}
	return csr
}

// namedCSR makes a request that asks for names of its own.
func namedCSR(tb testing.TB, curve elliptic.Curve, tmpl *x509.CertificateRequest) *x509.CertificateRequest {
	tb.Helper()
	key, err := ecdsa.GenerateKey(curve, rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		tb.Fatal(err)
	}
	return csr
}

// checkNodeCert asserts everything a node certificate must be.
func checkNodeCert(t *testing.T, a *pki.Authority, chain []*x509.Certificate, csr *x509.CertificateRequest, nodeID string, lifetime time.Duration, signedAt time.Time) {
	t.Helper()
	if len(chain) != 2 {
		t.Fatalf("chain has %d certificates, want leaf + intermediate", len(chain))
	}
	leaf := chain[0]
	if !chain[1].Equal(a.Intermediate()) {
		t.Error("chain[1] is not the intermediate")
	}
	roots := x509.NewCertPool()
	roots.AddCert(a.Root())
	inters := x509.NewCertPool()
	inters.AddCert(chain[1])
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inters,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		t.Errorf("leaf does not verify for client auth: %v", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != certs.NodeSPIFFEID(testTD, nodeID) {
		t.Errorf("URI SANs = %v, want exactly [%s]", leaf.URIs, certs.NodeSPIFFEID(testTD, nodeID))
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Errorf("leaf has other SANs: %v %v %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	if leaf.Subject.CommonName != nodeID {
		t.Errorf("CN = %q, want %q", leaf.Subject.CommonName, nodeID)
	}
	if leaf.IsCA {
		t.Error("leaf is a CA")
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) || leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("usages = %v / %v, want clientAuth / digitalSignature", leaf.ExtKeyUsage, leaf.KeyUsage)
	}
	// Issued through the embedded smallstep authority: its provisioner
	// extension is there.
	if !slices.ContainsFunc(leaf.Extensions, func(e pkix.Extension) bool { return e.Id.Equal(stepProvisionerOID) }) {
		t.Error("leaf lacks step's provisioner extension")
	}
	if got, err := certs.NodeIDFromCert(a.TrustDomain(), leaf); err != nil || got != nodeID {
		t.Errorf("certs.NodeIDFromCert = %q, %v", got, err)
	}
	if d := leaf.NotAfter.Sub(signedAt.Add(lifetime)); d < -2*time.Minute || d > 2*time.Minute {
		t.Errorf("NotAfter %v is %v off signing time + %v", leaf.NotAfter, d, lifetime)
	}
	if d := signedAt.Sub(leaf.NotBefore); d < 30*time.Second || d > 2*time.Minute {
		t.Errorf("NotBefore %v is backdated by %v, want about a minute", leaf.NotBefore, d)
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(csr.PublicKey) {
		t.Error("leaf public key is not the request's")
	}
}

func TestSignNode(t *testing.T) {
	for _, lifetime := range []time.Duration{0, pki.MinNodeCertLifetime, time.Hour, pki.MaxNodeCertLifetime} {
		t.Run(fmt.Sprint(lifetime), func(t *testing.T) {
			a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca"), NodeCertLifetime: lifetime})
			want := lifetime
			if want == 0 {
				want = pki.DefaultNodeCertLifetime
			}
			csr := edgeCSR(t)
			now := time.Now()
			chain, err := a.SignNode(context.Background(), csr, "node-1")
			if err != nil {
				t.Fatalf("SignNode: %v", err)
			}
			checkNodeCert(t, a, chain, csr, "node-1", want, now)
		})
	}
}

// TestSignNodeChoosesIdentity: names in the request never reach the
// certificate.
func TestSignNodeChoosesIdentity(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	other, _ := url.Parse(pki.SPIFFEID(a, "other-node"))
	for _, tc := range []struct {
		name string
		tmpl *x509.CertificateRequest
	}{
		{"dns sans", &x509.CertificateRequest{DNSNames: []string{"evil.example.com", "localhost"}}},
		{"ip sans", &x509.CertificateRequest{IPAddresses: []net.IP{net.ParseIP("10.0.0.1")}}},
		{"other node's uri", &x509.CertificateRequest{URIs: []*url.URL{other}}},
		{"email", &x509.CertificateRequest{EmailAddresses: []string{"root@example.com"}}},
		{"foreign cn", &x509.CertificateRequest{Subject: pkix.Name{CommonName: "admin", Organization: []string{"ops"}}}},
		{"everything", &x509.CertificateRequest{
			Subject:  pkix.Name{CommonName: "other-node"},
			DNSNames: []string{"a.example"}, IPAddresses: []net.IP{net.ParseIP("::1")}, URIs: []*url.URL{other},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			csr := namedCSR(t, elliptic.P256(), tc.tmpl)
			now := time.Now()
			chain, err := a.SignNode(context.Background(), csr, "node-7")
			if err != nil {
				t.Fatalf("SignNode: %v", err)
			}
			checkNodeCert(t, a, chain, csr, "node-7", pki.DefaultNodeCertLifetime, now)
			if len(chain[0].Subject.Organization) != 0 {
				t.Errorf("subject carries the request's organization: %v", chain[0].Subject)
			}
		})
	}
}

func TestSignNodeRejects(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	csr := edgeCSR(t)
	for _, id := range []string{"", "Node-1", "a/b", "..", "node 1", "x/node/y"} {
		if _, err := a.SignNode(context.Background(), csr, id); !errors.Is(err, control.ErrInvalidArgument) {
			t.Errorf("SignNode(node %q) = %v, want ErrInvalidArgument", id, err)
		}
	}
	if _, err := a.SignNode(context.Background(), nil, "node-1"); !errors.Is(err, certs.ErrInvalidCSR) {
		t.Errorf("SignNode(nil) = %v, want ErrInvalidCSR", err)
	}
	p384 := namedCSR(t, elliptic.P384(), &x509.CertificateRequest{})
	if _, err := a.SignNode(context.Background(), p384, "node-1"); !errors.Is(err, certs.ErrInvalidCSR) {
		t.Errorf("SignNode(P-384) = %v, want ErrInvalidCSR", err)
	}
	forged := *csr
	forged.PublicKey = edgeCSR(t).PublicKey // signature no longer matches
	if _, err := a.SignNode(context.Background(), &forged, "node-1"); err == nil {
		t.Error("SignNode accepted a request whose signature does not match its key")
	}

	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.SignNode(context.Background(), csr, "node-1"); err == nil {
		t.Error("SignNode worked after Close")
	}
}

func TestSignNodeConcurrent(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	const n = 32
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		serials = map[string]bool{}
	)
	for i := range n {
		wg.Go(func() {
			chain, err := a.SignNode(context.Background(), edgeCSR(t), fmt.Sprintf("node-%d", i))
			if err != nil {
				t.Errorf("SignNode: %v", err)
				return
			}
			mu.Lock()
			serials[certs.SerialHex(chain[0])] = true
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(serials) != n {
		t.Errorf("%d distinct serials from %d signatures", len(serials), n)
	}
}

// TestSignNodeAfterReopen: the provisioner key is made at each Open, so a
// reopened CA signs too.
func TestSignNodeAfterReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir})
	if _, err := a.SignNode(context.Background(), edgeCSR(t), "node-1"); err != nil {
		t.Fatal(err)
	}
	_ = a.Close()
	b := openCA(t, pki.Config{Dir: dir})
	chain, err := b.SignNode(context.Background(), edgeCSR(t), "node-1")
	if err != nil {
		t.Fatalf("SignNode after reopen: %v", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(a.Root())
	inters := x509.NewCertPool()
	inters.AddCert(chain[1])
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("certificate from reopened CA does not verify against the first root: %v", err)
	}
}

func BenchmarkSignNode(b *testing.B) {
	a := openCA(b, pki.Config{Dir: b.TempDir()})
	csr := edgeCSR(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := a.SignNode(ctx, csr, "node-1"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSignNodeParallel(b *testing.B) {
	a := openCA(b, pki.Config{Dir: b.TempDir()})
	csr := edgeCSR(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := a.SignNode(ctx, csr, "node-1"); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
