package pki_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/pki"
	"github.com/llorch/llorch/internal/clock"
)

const testTD = "llorch.test"

// openCA opens an authority on dir and closes it when the test ends.
func openCA(tb testing.TB, cfg pki.Config) *pki.Authority {
	tb.Helper()
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = testTD
	}
	a, err := pki.Open(context.Background(), cfg)
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { _ = a.Close() })
	return a
}

func readChain(tb testing.TB, path string) []*x509.Certificate {
	tb.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	chain, err := certs.ParseCertsPEM(data)
	if err != nil {
		tb.Fatalf("%s: %v", path, err)
	}
	return chain
}

func serverLeaf(tb testing.TB, a *pki.Authority) *x509.Certificate {
	tb.Helper()
	c, err := a.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		tb.Fatalf("GetCertificate: %v", err)
	}
	return c.Leaf
}

func TestOpenCreatesFilesWithModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir})
	if !a.Created() {
		t.Error("Created() = false on an empty directory")
	}

	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Mode().Perm(); got != 0o700 {
		t.Errorf("directory mode = %o, want 700", got)
	}
	want := map[string]os.FileMode{
		"root.crt": 0o644, "root.key": 0o600,
		"intermediate.crt": 0o644, "intermediate.key": 0o600,
		"server.crt": 0o644, "server.key": 0o600,
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if m, ok := want[e.Name()]; ok && info.Mode().Perm() != m {
			t.Errorf("%s mode = %o, want %o", e.Name(), info.Mode().Perm(), m)
		}
	}
	wantNames := []string{"intermediate.crt", "intermediate.key", "root.crt", "root.key", "server.crt", "server.key"}
	if !slices.Equal(names, wantNames) {
		t.Errorf("files = %v, want %v (no leftovers)", names, wantNames)
	}

	if root := readChain(t, filepath.Join(dir, "root.crt")); !root[0].Equal(a.Root()) {
		t.Error("root.crt is not Root()")
	}
	server := readChain(t, filepath.Join(dir, "server.crt"))
	if len(server) != 2 || !server[1].Equal(a.Intermediate()) || !server[0].Equal(serverLeaf(t, a)) {
		t.Errorf("server.crt holds %d certificates, want leaf + intermediate", len(server))
	}
	for _, f := range []string{"root.key", "intermediate.key", "server.key"} {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := certs.ParseKeyPEM(data); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

func TestReopenLoadsSameCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir})
	fp, inter, server := a.Fingerprint(), a.Intermediate(), serverLeaf(t, a)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	b := openCA(t, pki.Config{Dir: dir})
	if b.Created() {
		t.Error("Created() = true on reopen")
	}
	if b.Fingerprint() != fp {
		t.Errorf("fingerprint changed: %s → %s", fp, b.Fingerprint())
	}
	if !b.Intermediate().Equal(inter) {
		t.Error("intermediate changed on reopen")
	}
	if !serverLeaf(t, b).Equal(server) {
		t.Error("server certificate re-issued on reopen with the same SANs")
	}
}

func TestFingerprint(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	sum := sha256.Sum256(a.Root().Raw)
	if want := "sha256:" + hex.EncodeToString(sum[:]); a.Fingerprint() != want {
		t.Errorf("Fingerprint() = %s, want %s", a.Fingerprint(), want)
	}
}

func TestChangedSANsReissueServerCert(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir, SANs: []string{"localhost"}})
	old := serverLeaf(t, a)
	_ = a.Close()

	b := openCA(t, pki.Config{Dir: dir, SANs: []string{"cp.example.internal", "10.1.2.3"}})
	leaf := serverLeaf(t, b)
	if leaf.Equal(old) {
		t.Fatal("server certificate not re-issued after the SANs changed")
	}
	if !slices.Equal(leaf.DNSNames, []string{"cp.example.internal"}) ||
		len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.ParseIP("10.1.2.3")) {
		t.Errorf("new server certificate names %v %v", leaf.DNSNames, leaf.IPAddresses)
	}
	if b.Fingerprint() != a.Fingerprint() {
		t.Error("root changed with the SANs")
	}
	if stored := readChain(t, filepath.Join(dir, "server.crt")); !stored[0].Equal(leaf) {
		t.Error("server.crt does not hold the re-issued certificate")
	}
}

func TestOtherTrustDomainFails(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir, TrustDomain: "one.test"})
	_ = a.Close()

	_, err := pki.Open(context.Background(), pki.Config{Dir: dir, TrustDomain: "two.test"})
	var mismatch *pki.TrustDomainMismatchError
	if !errors.As(err, &mismatch) {
		t.Fatalf("Open with another trust domain: err = %v, want *TrustDomainMismatchError", err)
	}
	if mismatch.Stored != "one.test" || mismatch.Config != "two.test" {
		t.Errorf("mismatch = %+v", mismatch)
	}
}

func TestMissingRootKeyFails(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir})
	_ = a.Close()
	if err := os.Remove(filepath.Join(dir, "root.key")); err != nil {
		t.Fatal(err)
	}
	if _, err := pki.Open(context.Background(), pki.Config{Dir: dir, TrustDomain: testTD}); err == nil {
		t.Fatal("Open succeeded with root.crt but no root.key")
	}
	if root := readChain(t, filepath.Join(dir, "root.crt")); !root[0].Equal(a.Root()) {
		t.Error("root.crt was replaced")
	}
}

func TestCALifetimesAndChain(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	root, inter := a.Root(), a.Intermediate()
	const day = 24 * time.Hour
	within := func(d, want time.Duration) bool { return d > want-2*day && d < want+2*day }

	if d := root.NotAfter.Sub(root.NotBefore); !within(d, 3652*day) {
		t.Errorf("root lifetime %v, want about 10 years", d)
	}
	if d := inter.NotAfter.Sub(inter.NotBefore); !within(d, 730*day) {
		t.Errorf("intermediate lifetime %v, want about 2 years", d)
	}
	if !root.IsCA || !inter.IsCA {
		t.Error("root or intermediate is not a CA")
	}
	if want := "llorch root CA " + testTD; root.Subject.CommonName != want {
		t.Errorf("root CN %q, want %q", root.Subject.CommonName, want)
	}
	if a.TrustDomain() != testTD {
		t.Errorf("TrustDomain() = %q", a.TrustDomain())
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	if _, err := inter.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("intermediate does not chain to root: %v", err)
	}
	if leaf := serverLeaf(t, a); leaf.NotAfter.Sub(leaf.NotBefore) < 89*day || leaf.NotAfter.Sub(leaf.NotBefore) > 91*day {
		t.Errorf("server certificate lifetime %v, want 90 days", leaf.NotAfter.Sub(leaf.NotBefore))
	}
}

func TestServerCertVerifies(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	c, err := a.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	chain, err := certs.ParseCertsDER(c.Certificate)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(a.Root())
	inters := x509.NewCertPool()
	inters.AddCert(a.Intermediate())
	for _, name := range []string{"127.0.0.1", "localhost", "::1"} {
		_, err := chain[0].Verify(x509.VerifyOptions{
			DNSName: name, Roots: roots, Intermediates: inters,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		})
		if err != nil {
			t.Errorf("server certificate for %s: %v", name, err)
		}
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{DNSName: "example.com", Roots: roots, Intermediates: inters}); err == nil {
		t.Error("server certificate verifies for a name it does not hold")
	}
}

// TestTLSHandshake serves GetCertificate on loopback and dials it twice: as
// a node that has the root, and as an enrolling edge that only pins the root
// fingerprint (which needs the root in the presented chain).
func TestTLSHandshake(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: a.GetCertificate, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_ = conn.(*tls.Conn).Handshake()
				_, _ = io.Copy(io.Discard, conn)
			}()
		}
	}()

	roots := x509.NewCertPool()
	roots.AddCert(a.Root())
	for name, cfg := range map[string]*tls.Config{
		"root pool": {RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS13},
		"pinned":    certs.PinnedTLSConfig(a.Fingerprint(), "127.0.0.1"),
	} {
		conn, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err != nil {
			t.Errorf("%s: dial: %v", name, err)
			continue
		}
		_ = conn.Close()
	}
}

func TestServerCertRenewal(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	fake := clock.NewFake(time.Now())
	a := openCA(t, pki.Config{Dir: dir, Clock: fake})
	first := serverLeaf(t, a)

	fake.Advance(50 * 24 * time.Hour) // 40 of 90 days left: keep
	if !serverLeaf(t, a).Equal(first) {
		t.Fatal("server certificate re-issued with more than a third of its lifetime left")
	}
	fake.Advance(11 * 24 * time.Hour) // 29 days left: re-issue
	second := serverLeaf(t, a)
	if second.Equal(first) {
		t.Fatal("server certificate not re-issued with less than a third of its lifetime left")
	}
	if !second.NotBefore.After(first.NotBefore.Add(60 * 24 * time.Hour)) {
		t.Errorf("re-issued certificate starts %v", second.NotBefore)
	}
	_ = a.Close()

	// The runtime re-issue was stored: a reopen serves it.
	b := openCA(t, pki.Config{Dir: dir, Clock: fake})
	if !serverLeaf(t, b).Equal(second) {
		t.Error("reopen did not load the certificate re-issued at run time")
	}
	_ = b.Close()

	// Due at Open: re-issued there.
	fake.Advance(70 * 24 * time.Hour)
	c := openCA(t, pki.Config{Dir: dir, Clock: fake})
	if third := serverLeaf(t, c); third.Equal(second) || third.NotAfter.Before(fake.Now().Add(89*24*time.Hour)) {
		t.Error("Open did not re-issue a server certificate that was due")
	}
}

func TestIntermediateRotatedWhenDue(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	fake := clock.NewFake(time.Now())
	a := openCA(t, pki.Config{Dir: dir, Clock: fake})
	oldInter := a.Intermediate()
	_ = a.Close()

	fake.Advance(500 * 24 * time.Hour) // about 230 of 730 days left
	b := openCA(t, pki.Config{Dir: dir, Clock: fake})
	if b.Intermediate().Equal(oldInter) {
		t.Fatal("intermediate kept with less than a third of its lifetime left")
	}
	if b.Fingerprint() != a.Fingerprint() {
		t.Error("root changed with the intermediate")
	}
	if err := serverLeaf(t, b).CheckSignatureFrom(b.Intermediate()); err != nil {
		t.Errorf("server certificate not signed by the new intermediate: %v", err)
	}
	// Edges tell intermediates apart by subject (state.Identity.TLSCertificate).
	if bytes.Equal(b.Intermediate().RawSubject, oldInter.RawSubject) {
		t.Errorf("the new intermediate has the old one's subject %q", b.Intermediate().Subject)
	}
}

// An intermediate whose subject does not name its key (as made by earlier
// versions) is replaced at Open: an edge takes a subject it knows for its
// own issuer.
func TestIntermediateWithoutKeyInSubjectReplaced(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir})
	root := a.Root()
	_ = a.Close()
	rootKeyPEM, err := os.ReadFile(filepath.Join(dir, "root.key"))
	if err != nil {
		t.Fatal(err)
	}
	rootKey, err := certs.ParseKeyPEM(rootKeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	key, err := certs.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(7),
		Subject:               pkix.Name{CommonName: "llorch intermediate CA " + testTD},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(2, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root, &key.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	legacy, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := certs.EncodeKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "intermediate.key"), keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "intermediate.crt"), certs.EncodeCertsPEM([]*x509.Certificate{legacy}), 0o644); err != nil {
		t.Fatal(err)
	}

	b := openCA(t, pki.Config{Dir: dir})
	if b.Intermediate().Equal(legacy) || b.Intermediate().Subject.SerialNumber == "" {
		t.Fatalf("intermediate with subject %q kept", b.Intermediate().Subject)
	}
	// The one made in its place is kept from then on.
	replaced := b.Intermediate()
	_ = b.Close()
	if c := openCA(t, pki.Config{Dir: dir}); !c.Intermediate().Equal(replaced) {
		t.Error("the replacement intermediate was replaced again on reopen")
	}
}

// ClientCAs holds the root and the current intermediate: a node certificate
// verifies from its leaf alone, and one under an earlier intermediate
// verifies through its chain to the root.
func TestClientCAs(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	pool := a.ClientCAs()
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
	leaf := serverLeaf(t, a) // signed by the intermediate, as node certificates are
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: usage}); err != nil {
		t.Errorf("a leaf of the current intermediate does not verify alone: %v", err)
	}
	other := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	if _, err := serverLeaf(t, other).Verify(x509.VerifyOptions{Roots: pool, KeyUsages: usage}); err == nil {
		t.Error("another CA's leaf verifies against ClientCAs")
	}
	inter := x509.NewCertPool()
	inter.AddCert(other.Intermediate())
	if _, err := serverLeaf(t, other).Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: usage}); err == nil {
		t.Error("another CA's chain verifies against ClientCAs")
	}
}

func TestNodeIDFromSPIFFE(t *testing.T) {
	a := openCA(t, pki.Config{Dir: filepath.Join(t.TempDir(), "ca")})
	if got := pki.SPIFFEID(a, "node-1"); got != "spiffe://"+testTD+"/node/node-1" {
		t.Fatalf("SPIFFEID = %q", got)
	}
	id, err := pki.NodeIDFromSPIFFE(a, pki.SPIFFEID(a, "node-1"))
	if err != nil || id != "node-1" {
		t.Fatalf("round trip: %q, %v", id, err)
	}
	for _, tc := range []struct{ name, id string }{
		{"other trust domain", "spiffe://other.test/node/node-1"},
		{"trust domain prefix", "spiffe://" + testTD + ".evil/node/node-1"},
		{"wrong path", "spiffe://" + testTD + "/agent/node-1"},
		{"extra segment", "spiffe://" + testTD + "/node/node-1/x"},
		{"empty node", "spiffe://" + testTD + "/node/"},
		{"no path", "spiffe://" + testTD},
		{"other scheme", "https://" + testTD + "/node/node-1"},
		{"empty", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if id, err := pki.NodeIDFromSPIFFE(a, tc.id); !errors.Is(err, control.ErrInvalidArgument) {
				t.Errorf("NodeIDFromSPIFFE(%q) = %q, %v; want ErrInvalidArgument", tc.id, id, err)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	ok := pki.Config{Dir: "/tmp/ca", TrustDomain: "llorch.local"}
	for _, tc := range []struct {
		name  string
		edit  func(*pki.Config)
		field string // "" means valid
	}{
		{"defaults", func(*pki.Config) {}, ""},
		{"lifetime min", func(c *pki.Config) { c.NodeCertLifetime = 5 * time.Minute }, ""},
		{"lifetime max", func(c *pki.Config) { c.NodeCertLifetime = 30 * 24 * time.Hour }, ""},
		{"sans", func(c *pki.Config) { c.SANs = []string{"cp.example.com", "10.0.0.1", "::1"} }, ""},
		{"no dir", func(c *pki.Config) { c.Dir = "" }, "Dir"},
		{"no trust domain", func(c *pki.Config) { c.TrustDomain = "" }, "TrustDomain"},
		{"uppercase trust domain", func(c *pki.Config) { c.TrustDomain = "Llorch.local" }, "TrustDomain"},
		{"trust domain with path", func(c *pki.Config) { c.TrustDomain = "llorch.local/x" }, "TrustDomain"},
		{"trust domain with scheme", func(c *pki.Config) { c.TrustDomain = "spiffe://llorch.local" }, "TrustDomain"},
		{"lifetime too short", func(c *pki.Config) { c.NodeCertLifetime = 4 * time.Minute }, "NodeCertLifetime"},
		{"lifetime too long", func(c *pki.Config) { c.NodeCertLifetime = 31 * 24 * time.Hour }, "NodeCertLifetime"},
		{"negative lifetime", func(c *pki.Config) { c.NodeCertLifetime = -time.Hour }, "NodeCertLifetime"},
		{"empty san", func(c *pki.Config) { c.SANs = []string{""} }, "SANs"},
		{"bad san", func(c *pki.Config) { c.SANs = []string{"a b"} }, "SANs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.edit(&c)
			err := c.Validate()
			switch {
			case tc.field == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tc.field != "" && err == nil:
				t.Error("Validate() = nil, want an error")
			case tc.field != "" && !strings.Contains(err.Error(), tc.field):
				t.Errorf("Validate() = %v, want it to name %s", err, tc.field)
			}
		})
	}
	if _, err := pki.Open(context.Background(), pki.Config{Dir: filepath.Join(t.TempDir(), "ca"), TrustDomain: "BAD"}); err == nil {
		t.Error("Open accepted an invalid config")
	}
}

// TestNewRootReplacesLeftovers: with root.crt gone, Open makes a new CA even
// if an old intermediate and server certificate are still there.
func TestNewRootReplacesLeftovers(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	a := openCA(t, pki.Config{Dir: dir})
	_ = a.Close()
	for _, f := range []string{"root.crt", "root.key"} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	b := openCA(t, pki.Config{Dir: dir})
	if !b.Created() || b.Fingerprint() == a.Fingerprint() {
		t.Fatal("no new root")
	}
	if err := b.Intermediate().CheckSignatureFrom(b.Root()); err != nil {
		t.Errorf("intermediate not signed by the new root: %v", err)
	}
	if err := serverLeaf(t, b).CheckSignatureFrom(b.Intermediate()); err != nil {
		t.Errorf("server certificate not signed by the new intermediate: %v", err)
	}
}

func TestTicketKeys(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	fake := clock.NewFake(time.Now())
	ctx := context.Background()
	a := openCA(t, pki.Config{Dir: dir, Clock: fake})
	first := a.TicketKeys(ctx)
	if len(first) != 1 {
		t.Fatalf("%d keys at first start, want 1", len(first))
	}
	info, err := os.Stat(filepath.Join(dir, "session-ticket.keys"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, mode %v; want 0600", err, info.Mode().Perm())
	}
	fake.Advance(23 * time.Hour)
	if got := a.TicketKeys(ctx); len(got) != 1 || got[0] != first[0] {
		t.Fatalf("keys replaced before a day: %d keys", len(got))
	}
	_ = a.Close()

	// A restart keeps them: that is what lets edges resume.
	b := openCA(t, pki.Config{Dir: dir, Clock: fake})
	if got := b.TicketKeys(ctx); len(got) != 1 || got[0] != first[0] {
		t.Fatal("keys not kept across a restart")
	}
	// A day on, a new key encrypts and the old one still decrypts ...
	fake.Advance(2 * time.Hour)
	second := b.TicketKeys(ctx)
	if len(second) != 2 || second[0] == first[0] || second[1] != first[0] {
		t.Fatalf("after a day: %d keys, want a new one first and the old one second", len(second))
	}
	// ... for 8 days from when it was made, then it is gone.
	for range 6 {
		fake.Advance(24 * time.Hour)
		b.TicketKeys(ctx)
	}
	if got := b.TicketKeys(ctx); !slices.Contains(got, first[0]) {
		t.Fatal("the first key was dropped within 8 days of being made")
	}
	fake.Advance(24 * time.Hour)
	if got := b.TicketKeys(ctx); slices.Contains(got, first[0]) || len(got) != 8 {
		t.Fatalf("after 8 days: %d keys, first key kept %v; want 8 daily keys without it", len(got), slices.Contains(got, first[0]))
	}
	_ = b.Close()

	// A damaged file does not stop the control plane: new keys replace it.
	for name, content := range map[string]string{
		"garbage":       "not a key file\n",
		"short key":     "1700000000 abcd\n",
		"long key":      "1700000000 " + strings.Repeat("ab", 33) + "\n",
		"out of order":  "1700000000 " + strings.Repeat("ab", 32) + "\n1800000000 " + strings.Repeat("cd", 32) + "\n",
		"not hex":       "1700000000 " + strings.Repeat("zz", 32) + "\n",
		"missing parts": "1700000000\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, "session-ticket.keys"), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		c := openCA(t, pki.Config{Dir: dir, Clock: fake})
		if got := c.TicketKeys(ctx); len(got) != 1 {
			t.Errorf("%s: %d keys, want one new key", name, len(got))
		}
		_ = c.Close()
	}
}
