package enroll_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
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
	hooks *hookedStore
}

// hookedStore is the real store with hooks a test holds enrollments at:
// after a token is read, and after a claim is committed.
type hookedStore struct {
	*store.Store
	mu          sync.Mutex
	afterRead   func()
	afterCommit func()
}

func (h *hookedStore) GetToken(ctx context.Context, id string) (control.JoinToken, error) {
	t, err := h.Store.GetToken(ctx, id)
	h.mu.Lock()
	hook := h.afterRead
	h.mu.Unlock()
	if hook != nil {
		hook()
	}
	return t, err
}

func (h *hookedStore) EnrollNode(ctx context.Context, tokenID string, secretHash []byte, now time.Time, node control.Node) error {
	err := h.Store.EnrollNode(ctx, tokenID, secretHash, now, node)
	h.mu.Lock()
	hook := h.afterCommit
	h.mu.Unlock()
	if hook != nil && err == nil {
		hook()
	}
	return err
}

func (h *hookedStore) set(afterRead, afterCommit func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.afterRead, h.afterCommit = afterRead, afterCommit
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
	hooks := &hookedStore{Store: st}
	return env{svc: enroll.New(enroll.Config{Store: hooks, Signer: ca, Clock: clk}), store: st, ca: ca, clock: clk, hooks: hooks}
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
// use of the token (it does cost a signature: the claim finds the key).
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
	stored, _ := e.store.GetToken(ctx, tok.ID)
	if stored.Uses != 1 {
		t.Errorf("the token was used %d times, want 1", stored.Uses)
	}
	if _, err := e.svc.Enroll(ctx, token, newCSR(t), "h"); err != nil {
		t.Errorf("a fresh key with the same token: %v", err)
	}
}

// Every use of a token can be spent, however many enrollments run at once:
// a use that one committed and has not given back yet is not taken for a
// use in flight (which would refuse the last enrollments).
func TestEveryUseSpendable(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	const uses = 24
	_, token, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{MaxUses: uses})
	errs := make(chan error, uses)
	for range uses {
		go func() {
			_, err := e.svc.Enroll(ctx, token, newCSR(t), "h")
			errs <- err
		}()
	}
	for range uses {
		if err := <-errs; err != nil {
			t.Errorf("one of %d enrollments with a token of %d uses: %v", uses, uses, err)
		}
	}
}

// An enrollment that read the token before a racer's claim was committed
// does not sign on that stale read: a use given back while it read makes
// it read again, and find the token used.
func TestStaleReadSignsNothing(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, token, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{})
	read, resume := make(chan struct{}), make(chan struct{})
	var held atomic.Bool // only the first read is held (sync.Once would hold the others too)
	e.hooks.set(func() {
		if held.CompareAndSwap(false, true) {
			close(read)
			<-resume
		}
	}, nil)
	late := make(chan error, 1)
	go func() { _, err := e.svc.Enroll(ctx, token, newCSR(t), "late"); late <- err }()
	<-read // the late one has read the token, unused, and is held
	if _, err := e.svc.Enroll(ctx, token, newCSR(t), "first"); err != nil {
		t.Fatalf("the first enrollment: %v", err)
	}
	close(resume)
	if err := <-late; !errors.Is(err, control.ErrTokenUsed) {
		t.Errorf("the late enrollment: %v, want ErrTokenUsed", err)
	}
	if n := e.svc.Signed(); n != 1 {
		t.Errorf("%d certificates signed, want 1", n)
	}
}

// A token's last use goes to the enrollment that asks while another holds
// a use it has committed but not yet given back: it waits, it is not told
// the token is used.
func TestCommittedUseNotCountedTwice(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	_, token, _ := e.svc.CreateToken(ctx, enroll.TokenOptions{MaxUses: 2})
	committed, resume := make(chan struct{}), make(chan struct{})
	var held atomic.Bool
	e.hooks.set(nil, func() {
		if held.CompareAndSwap(false, true) {
			close(committed)
			<-resume
		}
	})
	first := make(chan error, 1)
	go func() { _, err := e.svc.Enroll(ctx, token, newCSR(t), "first"); first <- err }()
	<-committed // the first has claimed a use and not given its reservation back
	second := make(chan error, 1)
	go func() { _, err := e.svc.Enroll(ctx, token, newCSR(t), "second"); second <- err }()
	select {
	case err := <-second:
		t.Fatalf("the second enrollment ended while the first held its use: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(resume)
	if err := <-first; err != nil {
		t.Errorf("first: %v", err)
	}
	if err := <-second; err != nil {
		t.Errorf("second, for the token's last use: %v", err)
	}
}
