package state_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge/state"
)

const trustDomain = "example.test"

// testCA is a root and an intermediate that sign node certificates.
type testCA struct {
	root, inter       *x509.Certificate
	rootKey, interKey *ecdsa.PrivateKey
}

func newTestCA(tb testing.TB) *testCA {
	tb.Helper()
	now := time.Now()
	rootKey := newKey(tb)
	root := sign(tb, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "test root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}, nil, &rootKey.PublicKey, rootKey)
	interKey := newKey(tb)
	inter := sign(tb, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "test intermediate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}, root, &interKey.PublicKey, rootKey)
	return &testCA{root: root, inter: inter, rootKey: rootKey, interKey: interKey}
}

// identity makes a fresh key and a certificate for nodeID, valid for an hour.
func (ca *testCA) identity(tb testing.TB, nodeID string) state.Identity {
	tb.Helper()
	key := newKey(tb)
	spiffe := certs.NodeSPIFFEID(trustDomain, nodeID)
	u, err := url.Parse(spiffe)
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Now()
	leaf := sign(tb, &x509.Certificate{
		Subject:     pkix.Name{CommonName: nodeID},
		NotBefore:   now.Add(-time.Minute),
		NotAfter:    now.Add(time.Hour),
		URIs:        []*url.URL{u},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca.inter, &key.PublicKey, ca.interKey)
	return state.Identity{
		NodeID:        nodeID,
		NodeName:      "gpu-box-1",
		SPIFFEID:      spiffe,
		TrustDomain:   trustDomain,
		ControlURL:    "https://control.example.test:8443",
		CAFingerprint: certs.Fingerprint(ca.root),
		Labels:        map[string]string{"zone": "lab", "gpu": "h100"},
		EnrolledAt:    now.Add(-10 * time.Minute).Truncate(time.Second),
		Key:           key,
		Chain:         []*x509.Certificate{leaf, ca.inter},
		Roots:         []*x509.Certificate{ca.root},
	}
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := certs.NewKey()
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

// sign signs tmpl with parent's key; a nil parent makes it self-signed.
func sign(tb testing.TB, tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, parentKey *ecdsa.PrivateKey) *x509.Certificate {
	tb.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		tb.Fatal(err)
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func mustSave(tb testing.TB, dir string, id state.Identity) {
	tb.Helper()
	if err := state.Save(dir, id); err != nil {
		tb.Fatalf("Save: %v", err)
	}
}

func mustLoad(tb testing.TB, dir string) state.Identity {
	tb.Helper()
	id, err := state.Load(dir)
	if err != nil {
		tb.Fatalf("Load: %v", err)
	}
	return id
}

// assertSame fails unless got is want as it comes back from disk.
func assertSame(tb testing.TB, got, want state.Identity) {
	tb.Helper()
	if got.NodeID != want.NodeID || got.NodeName != want.NodeName || got.SPIFFEID != want.SPIFFEID ||
		got.TrustDomain != want.TrustDomain || got.ControlURL != want.ControlURL || got.CAFingerprint != want.CAFingerprint {
		tb.Errorf("names: got %+v, want %+v", got, want)
	}
	if !reflect.DeepEqual(got.Labels, want.Labels) {
		tb.Errorf("labels: got %v, want %v", got.Labels, want.Labels)
	}
	if !got.EnrolledAt.Equal(want.EnrolledAt) {
		tb.Errorf("enrolled at: got %v, want %v", got.EnrolledAt, want.EnrolledAt)
	}
	if got.Key == nil || !got.Key.Equal(want.Key) {
		tb.Error("key differs")
	}
	if !sameCerts(got.Chain, want.Chain) {
		tb.Error("chain differs")
	}
	if !sameCerts(got.Roots, want.Roots) {
		tb.Error("roots differ")
	}
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

// generations lists the identity-* entries in dir.
func generations(tb testing.TB, dir string) []string {
	tb.Helper()
	matches, err := filepath.Glob(filepath.Join(dir, "identity-*"))
	if err != nil {
		tb.Fatal(err)
	}
	for i, m := range matches {
		matches[i] = filepath.Base(m)
	}
	return matches
}

func TestSaveLoadRoundTrip(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	want := ca.identity(t, "n-1")
	mustSave(t, dir, want)
	got := mustLoad(t, dir)
	assertSame(t, got, want)

	if got.Leaf() != got.Chain[0] {
		t.Error("Leaf is not the first certificate of the chain")
	}
	if !got.NotAfter().Equal(want.Chain[0].NotAfter) {
		t.Errorf("NotAfter = %v, want %v", got.NotAfter(), want.Chain[0].NotAfter)
	}
	if got.Expired(time.Now()) {
		t.Error("fresh identity is expired")
	}
	if !got.Expired(got.NotAfter().Add(time.Second)) {
		t.Error("identity past NotAfter is not expired")
	}
	if got.Expired(got.NotAfter()) {
		t.Error("identity at exactly NotAfter is expired; x509 holds it valid")
	}

	// The whole chain unless the server named the leaf's issuer as a CA it
	// accepts; then the leaf alone.
	for _, c := range []struct {
		name       string
		acceptable [][]byte
		want       int
	}{
		{"no CAs named", nil, 2},
		{"only the root named", [][]byte{got.Roots[0].RawSubject}, 2},
		{"another CA named", [][]byte{[]byte("not a subject")}, 2},
		{"the issuer named", [][]byte{got.Roots[0].RawSubject, got.Chain[1].RawSubject}, 1},
	} {
		tc := got.TLSCertificate(c.acceptable)
		if len(tc.Certificate) != c.want || tc.PrivateKey != got.Key || tc.Leaf != got.Leaf() {
			t.Errorf("TLSCertificate, %s: %d certificates (want %d), key set %v, leaf set %v", c.name, len(tc.Certificate), c.want, tc.PrivateKey != nil, tc.Leaf != nil)
		}
		if !bytes.Equal(tc.Certificate[0], got.Leaf().Raw) {
			t.Errorf("TLSCertificate, %s: the first certificate is not the leaf", c.name)
		}
	}
	inter := x509.NewCertPool()
	inter.AddCert(got.Chain[1])
	if _, err := got.Leaf().Verify(x509.VerifyOptions{
		Roots:         got.RootPool(),
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		t.Errorf("leaf does not verify against RootPool: %v", err)
	}

	// The documented paths are the files just written.
	key, cert, caPath := state.CurrentPaths(dir)
	for _, p := range []string{key, cert, caPath} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("CurrentPaths: %v", err)
		}
	}
	b, err := os.ReadFile(cert)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := certs.ParseCertsPEM(b)
	if err != nil || !sameCerts(chain, want.Chain) {
		t.Errorf("node.crt does not hold the chain, leaf first (err %v)", err)
	}
}

func TestSaveNilLabels(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	want := ca.identity(t, "n-1")
	want.Labels = nil
	mustSave(t, dir, want)
	if got := mustLoad(t, dir); got.Labels != nil {
		t.Errorf("labels = %v, want nil", got.Labels)
	}
}

func TestSaveModes(t *testing.T) {
	ca := newTestCA(t)
	dir := filepath.Join(t.TempDir(), "state") // Save creates it
	id := ca.identity(t, "n-1")
	mustSave(t, dir, id)

	gen := "identity-" + certs.SerialHex(id.Leaf())
	target, err := os.Readlink(filepath.Join(dir, "current"))
	if err != nil || target != gen {
		t.Fatalf("current -> %q (%v), want %q", target, err, gen)
	}
	tests := []struct {
		path string
		mode os.FileMode
	}{
		{dir, os.ModeDir | 0o700},
		{filepath.Join(dir, gen), os.ModeDir | 0o700},
		{filepath.Join(dir, gen, "node.key"), 0o600},
		{filepath.Join(dir, gen, "node.crt"), 0o644},
		{filepath.Join(dir, gen, "ca.crt"), 0o644},
		{filepath.Join(dir, gen, "identity.json"), 0o644},
	}
	for _, tt := range tests {
		fi, err := os.Stat(tt.path)
		if err != nil {
			t.Error(err)
			continue
		}
		if fi.Mode() != tt.mode {
			t.Errorf("%s: mode %v, want %v", tt.path, fi.Mode(), tt.mode)
		}
	}
}

func TestSaveTwiceKeepsNewest(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	first := ca.identity(t, "n-1")
	second := ca.identity(t, "n-1")
	mustSave(t, dir, first)
	mustSave(t, dir, second)

	assertSame(t, mustLoad(t, dir), second)
	want := []string{"identity-" + certs.SerialHex(second.Leaf())}
	if got := generations(t, dir); !reflect.DeepEqual(got, want) {
		t.Errorf("generations = %v, want %v", got, want)
	}
}

// Saving the certificate that is already current (new labels, say) must not
// write into the live generation.
func TestSaveSameCertificateAgain(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	id := ca.identity(t, "n-1")
	mustSave(t, dir, id)
	for i, zone := range []string{"a", "b", "c"} {
		id.Labels = map[string]string{"zone": zone}
		mustSave(t, dir, id)
		assertSame(t, mustLoad(t, dir), id)
		if got := generations(t, dir); len(got) != 1 {
			t.Errorf("save %d: generations = %v, want one", i, got)
		}
	}
}

func TestLoadNotEnrolled(t *testing.T) {
	tests := []struct {
		name string
		dir  func(t *testing.T) string
	}{
		{"empty dir", func(t *testing.T) string { return t.TempDir() }},
		{"missing dir", func(t *testing.T) string { return filepath.Join(t.TempDir(), "nope") }},
		{"only a partial generation", func(t *testing.T) string {
			dir := t.TempDir()
			if err := os.MkdirAll(filepath.Join(dir, "identity-xyz"), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "identity-xyz", "node.key"), []byte("partial"), 0o600); err != nil {
				t.Fatal(err)
			}
			return dir
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := state.Load(tt.dir(t))
			if !errors.Is(err, state.ErrNotEnrolled) {
				t.Fatalf("Load: %v, want ErrNotEnrolled", err)
			}
		})
	}
}

func TestStrayEntriesIgnoredThenCleaned(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	first := ca.identity(t, "n-1")
	mustSave(t, dir, first)

	stray := filepath.Join(dir, "identity-xyz")
	if err := os.Mkdir(stray, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stray, "node.crt"), []byte("-----BEGIN"), 0o644); err != nil {
		t.Fatal(err)
	}
	tmpLink := filepath.Join(dir, ".current.tmp-leftover")
	if err := os.Symlink("identity-xyz", tmpLink); err != nil {
		t.Fatal(err)
	}
	assertSame(t, mustLoad(t, dir), first)

	second := ca.identity(t, "n-1")
	mustSave(t, dir, second)
	assertSame(t, mustLoad(t, dir), second)
	for _, p := range []string{stray, tmpLink} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s survived Save (%v)", p, err)
		}
	}
}

// A crash after the new generation is written but before current moves
// leaves the old identity current; the next Save recovers.
func TestCrashBeforeSwap(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	old := ca.identity(t, "n-1")
	mustSave(t, dir, old)

	next := ca.identity(t, "n-1")
	if _, err := state.WriteGeneration(dir, next); err != nil {
		t.Fatal(err)
	}
	assertSame(t, mustLoad(t, dir), old)

	// The renewal is retried with the same certificate: the leftover
	// directory of that name is replaced.
	mustSave(t, dir, next)
	assertSame(t, mustLoad(t, dir), next)
	if got := generations(t, dir); len(got) != 1 {
		t.Errorf("generations = %v, want one", got)
	}
}

// A crash after current moves but before old generations are removed leaves
// the new identity current.
func TestCrashBeforeCleanup(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	mustSave(t, dir, ca.identity(t, "n-1"))

	next := ca.identity(t, "n-1")
	name, err := state.WriteGeneration(dir, next)
	if err != nil {
		t.Fatal(err)
	}
	if err := state.SwapCurrent(dir, name); err != nil {
		t.Fatal(err)
	}
	assertSame(t, mustLoad(t, dir), next)
	if got := generations(t, dir); len(got) != 2 {
		t.Errorf("generations = %v, want the old and the new", got)
	}
}

// corrupt saves a good identity, then lets damage change the current
// generation's files.
func corrupt(t *testing.T, damage func(t *testing.T, gen string, ca *testCA)) (dir string) {
	t.Helper()
	ca := newTestCA(t)
	dir = t.TempDir()
	mustSave(t, dir, ca.identity(t, "n-1"))
	target, err := os.Readlink(filepath.Join(dir, "current"))
	if err != nil {
		t.Fatal(err)
	}
	damage(t, filepath.Join(dir, target), ca)
	return dir
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func editInfo(t *testing.T, gen string, edit func(m map[string]any)) {
	t.Helper()
	p := filepath.Join(gen, "identity.json")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	if b, err = json.Marshal(m); err != nil {
		t.Fatal(err)
	}
	writeFile(t, p, b)
}

func TestLoadDamaged(t *testing.T) {
	tests := []struct {
		name   string
		damage func(t *testing.T, gen string, ca *testCA)
		want   []string // substrings of the error
	}{
		{
			name: "key of another node",
			damage: func(t *testing.T, gen string, ca *testCA) {
				pem, err := certs.EncodeKeyPEM(newKey(t))
				if err != nil {
					t.Fatal(err)
				}
				writeFile(t, filepath.Join(gen, "node.key"), pem)
			},
			want: []string{"node.key does not match the public key", "node.crt"},
		},
		{
			name: "certificate of another node",
			damage: func(t *testing.T, gen string, ca *testCA) {
				other := ca.identity(t, "n-2")
				writeFile(t, filepath.Join(gen, "node.crt"), certs.EncodeCertsPEM(other.Chain))
			},
			want: []string{"node.key does not match"},
		},
		{
			name: "node ID differs from the certificate",
			damage: func(t *testing.T, gen string, ca *testCA) {
				editInfo(t, gen, func(m map[string]any) { m["node_id"] = "n-2" })
			},
			want: []string{`is for node "n-1"`, `says "n-2"`},
		},
		{
			name: "SPIFFE ID differs from the certificate",
			damage: func(t *testing.T, gen string, ca *testCA) {
				editInfo(t, gen, func(m map[string]any) { m["spiffe_id"] = "spiffe://example.test/node/n-2" })
			},
			want: []string{"SPIFFE ID"},
		},
		{
			name: "truncated certificate",
			damage: func(t *testing.T, gen string, ca *testCA) {
				writeFile(t, filepath.Join(gen, "node.crt"), []byte("-----BEGIN CERT"))
			},
			want: []string{"node.crt: no certificate found"},
		},
		{
			name: "missing roots",
			damage: func(t *testing.T, gen string, ca *testCA) {
				if err := os.Remove(filepath.Join(gen, "ca.crt")); err != nil {
					t.Fatal(err)
				}
			},
			want: []string{"ca.crt"},
		},
		{
			name: "garbage identity.json",
			damage: func(t *testing.T, gen string, ca *testCA) {
				writeFile(t, filepath.Join(gen, "identity.json"), []byte("{"))
			},
			want: []string{"identity.json"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := corrupt(t, tt.damage)
			_, err := state.Load(dir)
			if err == nil {
				t.Fatal("Load succeeded")
			}
			if errors.Is(err, state.ErrNotEnrolled) {
				t.Fatalf("damage reported as not enrolled: %v", err)
			}
			t.Log(err)
			msg := err.Error()
			if !strings.Contains(msg, dir) {
				t.Errorf("error %q does not name the directory %s", msg, dir)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not contain %q", msg, w)
				}
			}
		})
	}
}

func TestLoadBadCurrent(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string)
	}{
		{"dangling", func(t *testing.T, dir string) {
			if err := os.Symlink("identity-gone", filepath.Join(dir, "current")); err != nil {
				t.Fatal(err)
			}
		}},
		{"not a symlink", func(t *testing.T, dir string) {
			if err := os.Mkdir(filepath.Join(dir, "current"), 0o700); err != nil {
				t.Fatal(err)
			}
		}},
		{"points outside", func(t *testing.T, dir string) {
			if err := os.Symlink("/etc", filepath.Join(dir, "current")); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.setup(t, dir)
			_, err := state.Load(dir)
			if err == nil || errors.Is(err, state.ErrNotEnrolled) {
				t.Fatalf("Load: %v, want a damage error", err)
			}
			if !strings.Contains(err.Error(), dir) {
				t.Errorf("error %q does not name %s", err, dir)
			}
		})
	}
}

func TestSaveRefusesBadIdentity(t *testing.T) {
	ca := newTestCA(t)
	tests := []struct {
		name   string
		modify func(id *state.Identity)
	}{
		{"no key", func(id *state.Identity) { id.Key = nil }},
		{"no chain", func(id *state.Identity) { id.Chain = nil }},
		{"no roots", func(id *state.Identity) { id.Roots = nil }},
		{"key mismatch", func(id *state.Identity) { id.Key = newKey(t) }},
		{"wrong node ID", func(id *state.Identity) { id.NodeID = "n-9" }},
		{"wrong trust domain", func(id *state.Identity) { id.TrustDomain = "other.test" }},
		{"wrong SPIFFE ID", func(id *state.Identity) { id.SPIFFEID = "" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			good := ca.identity(t, "n-1")
			mustSave(t, dir, good)
			bad := ca.identity(t, "n-1")
			tt.modify(&bad)
			if err := state.Save(dir, bad); err == nil {
				t.Fatal("Save accepted a bad identity")
			}
			assertSame(t, mustLoad(t, dir), good)
		})
	}
}
