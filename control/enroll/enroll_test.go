package enroll_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/enroll"
	"github.com/llorch/llorch/control/pki"
	"github.com/llorch/llorch/control/store"
	"github.com/llorch/llorch/internal/clock"
)

type env struct {
	svc   *enroll.Service
	store *store.Store
	ca    *pki.Authority
	clock *clock.Fake
}

// newEnv is the enrollment path with its real parts: a SQLite file and the
// embedded CA, on a fake clock.
func newEnv(tb testing.TB) env {
	tb.Helper()
	dir := tb.TempDir()
	ctx := context.Background()
	clk := clock.NewFake(time.Now())
	st, err := store.Open(ctx, filepath.Join(dir, "llorch.db"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	ca, err := pki.Open(ctx, pki.Config{Dir: filepath.Join(dir, "ca"), TrustDomain: "test.local", Clock: clk})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ca.Close() })
	return env{svc: enroll.New(enroll.Config{Store: st, Signer: ca, Clock: clk}), store: st, ca: ca, clock: clk}
}

func newCSR(tb testing.TB) []byte {
	tb.Helper()
	key, err := certs.NewKey()
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := certs.NewCSR(key)
	if err != nil {
		tb.Fatal(err)
	}
	return csr
}

func TestCreateTokenDefaults(t *testing.T) {
	e := newEnv(t)
	tok, s, err := e.svc.CreateToken(context.Background(), enroll.TokenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if tok.MaxUses != 1 || tok.ExpiresAt.Sub(tok.CreatedAt) != time.Hour {
		t.Errorf("defaults: uses %d, ttl %s; want single use, 1h", tok.MaxUses, tok.ExpiresAt.Sub(tok.CreatedAt))
	}
	parsed, err := certs.ParseJoinToken(s)
	if err != nil || parsed.ID != tok.ID || parsed.Fingerprint != e.ca.Fingerprint() {
		t.Fatalf("token string %q: %+v, %v", s, parsed, err)
	}
	stored, err := e.store.GetToken(context.Background(), tok.ID)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(stored.SecretHash), parsed.Secret) || string(stored.SecretHash) != string(parsed.SecretHash()) {
		t.Error("the store must keep the secret's hash and only that")
	}
}

func TestCreateTokenValidation(t *testing.T) {
	e := newEnv(t)
	for _, o := range []enroll.TokenOptions{
		{TTL: 25 * time.Hour},
		{TTL: -time.Second},
		{TTL: time.Millisecond},
		{MaxUses: -1},
		{MaxUses: enroll.MaxTokenUses + 1},
		{Name: "has space"},
		{Name: strings.Repeat("a", 64)},
		{Labels: map[string]string{"": "x"}},
		{Labels: map[string]string{"k": "two\nlines"}},
	} {
		if _, _, err := e.svc.CreateToken(context.Background(), o); !errors.Is(err, control.ErrInvalidArgument) {
			t.Errorf("CreateToken(%+v) = %v, want ErrInvalidArgument", o, err)
		}
	}
}

func TestEnrollExpiryOnTheClock(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, early, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{TTL: time.Minute})
	_, late, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{TTL: time.Minute})
	e.clock.Advance(59 * time.Second)
	if _, err := e.svc.Enroll(ctx, early, newCSR(t), "h"); err != nil {
		t.Fatalf("enroll before expiry: %v", err)
	}
	e.clock.Advance(time.Second)
	if _, err := e.svc.Enroll(ctx, late, newCSR(t), "h"); !errors.Is(err, control.ErrTokenExpired) {
		t.Fatalf("enroll at expiry: %v, want ErrTokenExpired", err)
	}
}

func TestEnrollRefusesBeforeSigning(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, good, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{})
	parsed, _ := certs.ParseJoinToken(good)
	other := parsed
	other.Fingerprint = "sha256:" + strings.Repeat("0", 64)
	unknown, _ := certs.NewJoinToken(e.ca.Fingerprint())

	tests := []struct {
		name  string
		token string
		csr   []byte
		want  error
	}{
		{"another CA", other.String(), newCSR(t), control.ErrWrongCA},
		{"unknown", unknown.String(), newCSR(t), control.ErrTokenUnknown},
		{"malformed", "llorch1.x", newCSR(t), certs.ErrMalformedToken},
		{"bad CSR", good, []byte("nope"), certs.ErrInvalidCSR},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := e.svc.Enroll(ctx, tt.token, tt.csr, "h"); !errors.Is(err, tt.want) {
				t.Fatalf("Enroll = %v, want %v", err, tt.want)
			}
		})
	}
	// None of the refusals spent the good token.
	if _, err := e.svc.Enroll(ctx, good, newCSR(t), "h"); err != nil {
		t.Fatalf("good token after refusals: %v", err)
	}
}

func TestEnrollNodeName(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	tests := []struct{ tokenName, hostname, want string }{
		{"gpu-1", "box", "gpu-1"},
		{"", "box.lab", "box.lab"},
		{"", "bad host name", ""}, // falls back to the node ID
	}
	for _, tt := range tests {
		_, tok, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{Name: tt.tokenName})
		got, err := e.svc.Enroll(ctx, tok, newCSR(t), tt.hostname)
		if err != nil {
			t.Fatal(err)
		}
		want := tt.want
		if want == "" {
			want = got.Node.ID
		}
		if got.Node.Name != want {
			t.Errorf("token name %q, hostname %q: node name %q, want %q", tt.tokenName, tt.hostname, got.Node.Name, want)
		}
	}
}

func TestRenewOnlyCurrent(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, tok, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{})
	en, err := e.svc.Enroll(ctx, tok, newCSR(t), "h")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Renew(ctx, en.Node.ID, "deadbeef", newCSR(t)); !errors.Is(err, control.ErrNotCurrentCert) {
		t.Fatalf("renew with another serial: %v, want ErrNotCurrentCert", err)
	}
	chain, err := e.svc.Renew(ctx, en.Node.ID, en.Node.CertSerial, newCSR(t))
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := certs.NodeIDFromCert("test.local", chain[0]); id != en.Node.ID {
		t.Errorf("renewed certificate names %q, want %q", id, en.Node.ID)
	}
	if _, err := e.store.RemoveNode(ctx, en.Node.ID, "test", e.clock.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Renew(ctx, en.Node.ID, en.Node.CertSerial, newCSR(t)); !errors.Is(err, control.ErrNodeRemoved) {
		t.Fatalf("renew of a removed node: %v, want ErrNodeRemoved", err)
	}
}

// BenchmarkEnroll measures the control plane's whole enrollment path: token
// lookup, CSR check, signing through the embedded step authority, and the
// claim-and-record transaction in SQLite (synchronous=FULL). Making the token
// and the edge's key are outside the timer.
func BenchmarkEnroll(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		_, tok, err := e.svc.CreateToken(ctx, enroll.TokenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		csr := newCSR(b)
		b.StartTimer()
		if _, err := e.svc.Enroll(ctx, tok, csr, "bench"); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "enrollments/s")
}

// BenchmarkEnrollParallel is the same with concurrent enrollments, as a
// fleet arriving at once would make them.
func BenchmarkEnrollParallel(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	type job struct {
		token string
		csr   []byte
	}
	b.ReportAllocs()
	b.StopTimer()
	jobs := make(chan job, b.N)
	for range b.N {
		_, tok, err := e.svc.CreateToken(ctx, enroll.TokenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		jobs <- job{tok, newCSR(b)}
	}
	close(jobs)
	b.StartTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			j := <-jobs
			if _, err := e.svc.Enroll(ctx, j.token, j.csr, "bench"); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "enrollments/s")
}

// Racers for a token's last use sign nothing but the winner's certificate:
// the claim comes first, and signing happens inside its transaction.
func TestLosingRacersSpendNoSignature(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, token, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{MaxUses: 3})
	const racers = 20
	errs := make(chan error, racers)
	for range racers {
		go func() {
			_, err := e.svc.Enroll(ctx, token, newCSR(t), "h")
			errs <- err
		}()
	}
	won := 0
	for range racers {
		err := <-errs
		switch {
		case err == nil:
			won++
		case !errors.Is(err, control.ErrTokenUsed):
			t.Errorf("a losing racer: %v, want ErrTokenUsed", err)
		}
	}
	if won != 3 || e.svc.Signed() != 3 {
		t.Errorf("%d enrollments won, %d certificates signed; want 3 and 3", won, e.svc.Signed())
	}
}

// A multi-use token does not enroll the same public key twice (nor does any
// other token): each enrollment needs a fresh key, and the second costs no
// signature and no use of the token.
func TestKeyEnrollsOnce(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	tok, token, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{MaxUses: 5})
	_, another, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{})
	csr := newCSR(t)
	if _, err := e.svc.Enroll(ctx, token, csr, "h"); err != nil {
		t.Fatal(err)
	}
	for _, tk := range []string{token, another} {
		if _, err := e.svc.Enroll(ctx, tk, csr, "h"); !errors.Is(err, control.ErrKeyEnrolled) {
			t.Errorf("the same key again: %v, want ErrKeyEnrolled", err)
		}
	}
	if e.svc.Signed() != 1 {
		t.Errorf("%d certificates signed, want 1", e.svc.Signed())
	}
	stored, _ := e.store.GetToken(ctx, tok.ID)
	if stored.Uses != 1 {
		t.Errorf("the token was used %d times, want 1", stored.Uses)
	}
	if _, err := e.svc.Enroll(ctx, token, newCSR(t), "h"); err != nil {
		t.Errorf("a fresh key with the same token: %v", err)
	}
}
