package renew_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/renew"
	"github.com/llorch/llorch/internal/clock"
	"github.com/llorch/llorch/internal/refusal"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

var justBelowOne = math.Nextafter(1, 0)

func TestDue(t *testing.T) {
	tests := []struct {
		name     string
		lifetime time.Duration
		rnd      float64
		want     time.Duration // after notBefore
		within   time.Duration // tolerance, for float rounding
	}{
		{"2/3 point", 90 * time.Minute, 0.5, 60 * time.Minute, 0},
		{"earliest jitter", 90 * time.Minute, 0, 60*time.Minute - 4*time.Minute - 30*time.Second, 0},
		{"latest jitter", 90 * time.Minute, justBelowOne, 60*time.Minute + 4*time.Minute + 30*time.Second, time.Microsecond},
		{"rnd 1 is clamped below 1", 90 * time.Minute, 1, 60*time.Minute + 4*time.Minute + 30*time.Second, time.Microsecond},
		{"negative rnd is clamped to 0", 90 * time.Minute, -3, 60*time.Minute - 4*time.Minute - 30*time.Second, 0},
		{"NaN rnd counts as 0", 90 * time.Minute, math.NaN(), 60*time.Minute - 4*time.Minute - 30*time.Second, 0},
		{"quarter jitter", 24 * time.Hour, 0.75, 16*time.Hour + 36*time.Minute, 0},
		{"one year", 365 * 24 * time.Hour, 0.5, 243*24*time.Hour + 8*time.Hour, 0},
		{"one minute", time.Minute, 0.5, 40 * time.Second, 0},
		{"one minute, early", time.Minute, 0, 37 * time.Second, 0},
		{"one second", time.Second, 0.5, 666666667 * time.Nanosecond, 0},
		{"three nanoseconds", 3, 0.5, 2, 0},
		{"zero lifetime", 0, 0.5, 0, 0},
		{"negative lifetime", -time.Hour, 0.5, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := renew.Due(t0, t0.Add(tt.lifetime), tt.rnd).Sub(t0)
			if d := got - tt.want; d > tt.within || d < -tt.within {
				t.Errorf("Due = notBefore + %v, want %v (±%v)", got, tt.want, tt.within)
			}
		})
	}
}

// Due stays in [2/3 ± 1/20] of the lifetime, never before notBefore, for
// lifetimes short and long and any rnd.
func TestDueBounds(t *testing.T) {
	lifetimes := []time.Duration{1, 2, 7, time.Millisecond, time.Second, 5 * time.Minute, time.Hour, 30 * 24 * time.Hour, 100 * 365 * 24 * time.Hour}
	for _, life := range lifetimes {
		lo := t0.Add(life - life/3 - life/20 - 1)
		hi := t0.Add(life - life/3 + life/20 + 1)
		for i := range 101 {
			rnd := float64(i) / 101
			due := renew.Due(t0, t0.Add(life), rnd)
			if due.Before(t0) || due.Before(lo) || due.After(hi) || due.After(t0.Add(life)) {
				t.Errorf("lifetime %v, rnd %v: due at notBefore + %v, want in [%v, %v]", life, rnd, due.Sub(t0), lo.Sub(t0), hi.Sub(t0))
			}
		}
	}
	// Longer than a time.Duration: Sub saturates, nothing overflows.
	far := t0.AddDate(500, 0, 0)
	if due := renew.Due(t0, far, 0.5); !due.After(t0) || !due.Before(far) {
		t.Errorf("500-year lifetime: due %v, want between %v and %v", due, t0, far)
	}
}

// node is a fake edge: its certificate's validity and a Renew that records
// when it was called and replaces the certificate unless told to fail.
type node struct {
	clk *clock.Fake

	mu       sync.Mutex
	nb, na   time.Time
	lifetime time.Duration
	calls    []time.Time
	reads    int                  // calls of current
	fail     func(call int) error // nil: succeed; call counts from 1
	keep     bool                 // succeed without replacing the certificate
}

func newNode(clk *clock.Fake, nb time.Time, lifetime time.Duration) *node {
	return &node{clk: clk, nb: nb, na: nb.Add(lifetime), lifetime: lifetime}
}

func (n *node) current() (time.Time, time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.reads++
	return n.nb, n.na
}

func (n *node) renew(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	now := n.clk.Now()
	n.calls = append(n.calls, now)
	if n.fail != nil {
		if err := n.fail(len(n.calls)); err != nil {
			return err
		}
	}
	if !n.keep {
		n.nb, n.na = now, now.Add(n.lifetime)
	}
	return nil
}

func (n *node) currentReads() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.reads
}

func (n *node) renewals() []time.Time {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]time.Time(nil), n.calls...)
}

func (n *node) config() renew.Config {
	return renew.Config{
		Clock:   n.clk,
		Current: n.current,
		Renew:   n.renew,
		Rand:    func() float64 { return 0.5 }, // no jitter in Due, half the backoff ceiling
	}
}

// start runs Run in the background; the test's cleanup stops it.
func start(t *testing.T, cfg renew.Config) (done <-chan error, cancel context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan error, 1)
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		ch <- renew.Run(ctx, cfg)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return ch, cancel
}

// waitBlocked polls until Run waits on the clock. It fails the test if Run
// returns first; use waitBlockedOrDone where it may.
func waitBlocked(t *testing.T, clk *clock.Fake, done <-chan error) {
	t.Helper()
	if err, finished := waitBlockedOrDone(t, clk, done); finished {
		t.Fatalf("Run returned: %v", err)
	}
}

func waitBlockedOrDone(t *testing.T, clk *clock.Fake, done <-chan error) (err error, finished bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for clk.Waiters() == 0 {
		select {
		case err := <-done:
			return err, true
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("Run never waited on the clock")
		}
		time.Sleep(time.Millisecond)
	}
	return nil, false
}

// waitDone waits for Run to return.
func waitDone(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

func assertCalls(t *testing.T, n *node, want ...time.Duration) {
	t.Helper()
	got := n.renewals()
	if len(got) != len(want) {
		t.Fatalf("Renew called at %v, want at t0 + %v", offsets(got), want)
	}
	for i := range want {
		if !got[i].Equal(t0.Add(want[i])) {
			t.Fatalf("Renew called at t0 + %v, want at t0 + %v", offsets(got), want)
		}
	}
}

func offsets(ts []time.Time) []time.Duration {
	out := make([]time.Duration, len(ts))
	for i, ts := range ts {
		out[i] = ts.Sub(t0)
	}
	return out
}

func TestRunRenewsWhenDueThenUsesNewCertificate(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0, 90*time.Minute) // due at t0+60m
	done, _ := start(t, n.config())

	waitBlocked(t, clk, done)
	clk.Advance(59 * time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n)

	clk.Advance(time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute)

	// The new certificate runs from t0+60m: due at t0+120m.
	clk.Advance(59 * time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute)
	clk.Advance(time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute, 120*time.Minute)
}

func TestRunWakesEveryMinute(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0, 30*24*time.Hour) // due in 20 days
	done, _ := start(t, n.config())

	waitBlocked(t, clk, done)
	reads := n.currentReads()
	clk.Advance(time.Minute)
	// Run wakes and looks at the certificate again.
	deadline := time.Now().Add(10 * time.Second)
	for n.currentReads() == reads {
		if time.Now().After(deadline) {
			t.Fatal("Run did not wake up after a minute; it must re-check the clock at least every minute")
		}
		time.Sleep(time.Millisecond)
	}
	waitBlocked(t, clk, done)
	assertCalls(t, n)

	// A laptop asleep for three weeks: one timer fires, long after it was
	// due, and Run renews at once.
	clk.Advance(21 * 24 * time.Hour)
	waitBlocked(t, clk, done)
	assertCalls(t, n, time.Minute+21*24*time.Hour)
}

func TestRunRetriesWithBackoff(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0, 90*time.Minute)
	errDown := errors.New("control plane unreachable")
	n.fail = func(call int) error {
		if call <= 2 {
			return errDown
		}
		return nil
	}
	cfg := n.config()
	cfg.RetryMin, cfg.RetryMax = 10*time.Second, 5*time.Minute
	done, _ := start(t, cfg)

	waitBlocked(t, clk, done)
	clk.Advance(60 * time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute)

	// First retry: 0.5 * 10s.
	clk.Advance(4 * time.Second)
	assertCalls(t, n, 60*time.Minute)
	clk.Advance(time.Second)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute, 60*time.Minute+5*time.Second)

	// Second retry: 0.5 * 20s; it succeeds.
	clk.Advance(9 * time.Second)
	assertCalls(t, n, 60*time.Minute, 60*time.Minute+5*time.Second)
	clk.Advance(time.Second)
	waitBlocked(t, clk, done)
	renewed := 60*time.Minute + 15*time.Second
	assertCalls(t, n, 60*time.Minute, 60*time.Minute+5*time.Second, renewed)

	// The backoff is forgotten: the next renewal is due 60m after the last.
	clk.Advance(59 * time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute, 60*time.Minute+5*time.Second, renewed)
	clk.Advance(time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute, 60*time.Minute+5*time.Second, renewed, renewed+60*time.Minute)
}

// A renewal refused with a retry hint (rate limited) is retried no sooner
// than the hint, even when the backoff is shorter.
func TestRunWaitsTheRetryHint(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0, 90*time.Minute)
	n.fail = func(call int) error {
		if call == 1 {
			return fmt.Errorf("renew: %w", &edge.RefusalError{Code: connect.CodeResourceExhausted, Reason: refusal.RateLimited, RetryAfter: 45 * time.Second})
		}
		return nil
	}
	cfg := n.config()
	cfg.RetryMin, cfg.RetryMax = 10*time.Second, 5*time.Minute // the backoff alone would wait 5s
	done, _ := start(t, cfg)

	waitBlocked(t, clk, done)
	clk.Advance(60 * time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute)

	clk.Advance(44 * time.Second)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute)
	clk.Advance(time.Second)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute, 60*time.Minute+45*time.Second)
}

func TestRunExpiresWhileRenewalsFail(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0, 90*time.Minute)
	errDown := errors.New("control plane unreachable")
	n.fail = func(int) error { return errDown }
	done, _ := start(t, n.config())

	var err error
	for i := 0; ; i++ {
		if i > 1000 {
			t.Fatal("Run kept going long after the certificate expired")
		}
		var finished bool
		if err, finished = waitBlockedOrDone(t, clk, done); finished {
			break
		}
		clk.Advance(time.Minute)
	}
	if !errors.Is(err, renew.ErrExpired) {
		t.Fatalf("Run: %v, want ErrExpired", err)
	}
	if !errors.Is(err, errDown) {
		t.Errorf("Run: %v, want it to carry the last renewal error", err)
	}
	if !strings.Contains(err.Error(), t0.Add(90*time.Minute).Format(time.RFC3339)) {
		t.Errorf("Run: %q does not say when the certificate expired", err)
	}
	calls := n.renewals()
	if len(calls) < 5 {
		t.Errorf("Renew was tried %d times, want retries until expiry", len(calls))
	}
	for _, c := range calls {
		if c.Before(t0.Add(55*time.Minute)) || !c.Before(t0.Add(90*time.Minute)) {
			t.Errorf("Renew called at t0 + %v, outside [due, notAfter)", c.Sub(t0))
		}
	}
	if now := clk.Now(); now.Before(t0.Add(90 * time.Minute)) {
		t.Errorf("Run returned at t0 + %v, before the certificate expired", now.Sub(t0))
	}
}

func TestRunRetryNeverWaitsPastNotAfter(t *testing.T) {
	clk := clock.NewFake(t0)
	// Already due; expires in 30 seconds.
	n := newNode(clk, t0.Add(-60*time.Minute), 60*time.Minute+30*time.Second)
	n.fail = func(int) error { return errors.New("refused") }
	cfg := n.config()
	cfg.RetryMin, cfg.RetryMax = time.Hour, time.Hour // a 30m wait
	done, _ := start(t, cfg)

	waitBlocked(t, clk, done)
	assertCalls(t, n, 0)
	clk.Advance(30 * time.Second)
	if err := waitDone(t, done); !errors.Is(err, renew.ErrExpired) {
		t.Fatalf("Run: %v, want ErrExpired", err)
	}
}

func TestRunAlreadyExpired(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0.Add(-2*time.Hour), time.Hour)
	done, _ := start(t, n.config())
	if err := waitDone(t, done); !errors.Is(err, renew.ErrExpired) {
		t.Fatalf("Run: %v, want ErrExpired", err)
	}
	assertCalls(t, n)
}

// A Renew that reports success without a new certificate must not make Run
// spin; it is retried like a failure.
func TestRunRenewWithoutNewCertificate(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0, 90*time.Minute)
	n.keep = true
	done, _ := start(t, n.config())

	waitBlocked(t, clk, done)
	clk.Advance(60 * time.Minute)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute)
	clk.Advance(5 * time.Second)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 60*time.Minute, 60*time.Minute+5*time.Second)
}

// A Rand that returns 0 gives a zero backoff; Run still waits before retrying.
func TestRunZeroBackoffDoesNotSpin(t *testing.T) {
	clk := clock.NewFake(t0)
	n := newNode(clk, t0.Add(-60*time.Minute), 90*time.Minute) // due now
	n.fail = func(int) error { return errors.New("refused") }
	cfg := n.config()
	cfg.Rand = func() float64 { return 0 }
	done, _ := start(t, cfg)

	waitBlocked(t, clk, done)
	assertCalls(t, n, 0)
	clk.Advance(time.Second)
	waitBlocked(t, clk, done)
	assertCalls(t, n, 0, time.Second)
}

func TestRunCancel(t *testing.T) {
	t.Run("while waiting", func(t *testing.T) {
		clk := clock.NewFake(t0)
		n := newNode(clk, t0, 90*time.Minute)
		done, cancel := start(t, n.config())
		waitBlocked(t, clk, done)
		cancel()
		if err := waitDone(t, done); !errors.Is(err, context.Canceled) {
			t.Fatalf("Run: %v, want context.Canceled", err)
		}
	})
	t.Run("while renewing", func(t *testing.T) {
		clk := clock.NewFake(t0)
		n := newNode(clk, t0.Add(-60*time.Minute), 90*time.Minute) // due now
		entered := make(chan struct{})
		cfg := n.config()
		cfg.Renew = func(ctx context.Context) error {
			close(entered)
			<-ctx.Done()
			return ctx.Err()
		}
		done, cancel := start(t, cfg)
		select {
		case <-entered:
		case <-time.After(10 * time.Second):
			t.Fatal("Renew never called")
		}
		cancel()
		if err := waitDone(t, done); !errors.Is(err, context.Canceled) {
			t.Fatalf("Run: %v, want context.Canceled", err)
		}
	})
}

func TestRunNeedsCallbacks(t *testing.T) {
	if err := renew.Run(context.Background(), renew.Config{}); err == nil {
		t.Fatal("Run accepted a Config without Current and Renew")
	}
}
