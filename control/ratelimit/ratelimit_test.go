package ratelimit_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/control/ratelimit"
	"github.com/llorch/llorch/internal/clock"
)

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func TestKeyedBurstThenRate(t *testing.T) {
	clk := clock.NewFake(t0)
	k := ratelimit.NewKeyed(ratelimit.Limit{Rate: 2, Burst: 3}, 0, clk)
	for i := range 3 {
		if ok, _ := k.Allow("a"); !ok {
			t.Fatalf("call %d of the burst refused", i+1)
		}
	}
	ok, wait := k.Allow("a")
	if ok || wait != 500*time.Millisecond {
		t.Fatalf("over the burst: allowed %v, wait %s; want refused, 500ms", ok, wait)
	}
	if ok, _ := k.Allow("b"); !ok {
		t.Error("another key is held back by the first")
	}
	clk.Advance(499 * time.Millisecond)
	if ok, _ := k.Allow("a"); ok {
		t.Error("allowed before a token came back")
	}
	clk.Advance(2 * time.Millisecond)
	if ok, _ := k.Allow("a"); !ok {
		t.Error("refused after a token came back")
	}
}

func TestKeyedChargeAndBlocked(t *testing.T) {
	clk := clock.NewFake(t0)
	k := ratelimit.NewKeyed(ratelimit.Every(6*time.Second, 2), 0, clk)
	if blocked, _ := k.Blocked("a"); blocked {
		t.Fatal("a fresh key is blocked")
	}
	k.Charge("a")
	k.Charge("a")
	blocked, wait := k.Blocked("a")
	if !blocked || wait != 6*time.Second {
		t.Fatalf("after two failures: blocked %v for %s, want 6s", blocked, wait)
	}
	k.Charge("a") // charging an empty bucket does not push it further
	clk.Advance(6 * time.Second)
	if blocked, _ := k.Blocked("a"); blocked {
		t.Error("still blocked after a token came back")
	}
}

func TestKeyedUnlimited(t *testing.T) {
	var nilKeyed *ratelimit.Keyed
	for _, k := range []*ratelimit.Keyed{nilKeyed, ratelimit.NewKeyed(ratelimit.Limit{}, 0, nil)} {
		for range 1000 {
			if ok, _ := k.Allow("a"); !ok {
				t.Fatal("a limit with no rate refused")
			}
			k.Charge("a")
		}
		if blocked, _ := k.Blocked("a"); blocked {
			t.Fatal("a limit with no rate blocks")
		}
	}
}

// However many keys a caller makes up, the buckets held stay bounded.
func TestKeyedMemoryBounded(t *testing.T) {
	clk := clock.NewFake(t0)
	k := ratelimit.NewKeyed(ratelimit.Limit{Rate: 0.001, Burst: 1}, 100, clk)
	for i := range 10_000 {
		k.Allow(fmt.Sprintf("10.0.%d.%d", i/256, i%256))
	}
	if n := k.Len(); n > 100 {
		t.Fatalf("%d buckets for a limit of 100", n)
	}
	// Buckets that refilled are forgotten first: the bound holds with a full
	// one in place, and the busy key keeps its state.
	k2 := ratelimit.NewKeyed(ratelimit.Limit{Rate: 1, Burst: 1}, 10, clk)
	for i := range 9 {
		k2.Allow(fmt.Sprint(i))
	}
	clk.Advance(time.Minute)
	k2.Allow("busy")
	for i := range 20 {
		k2.Allow(fmt.Sprint("new", i))
	}
	if n := k2.Len(); n > 10 {
		t.Fatalf("%d buckets for a limit of 10", n)
	}
}

func TestAddrKey(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"192.0.2.7:443", "192.0.2.7"},
		{"192.0.2.7", "192.0.2.7"},
		{"[::ffff:192.0.2.7]:80", "192.0.2.7"},
		{"[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:ffff::1]:443", "2001:db8:1:2::/64"},
		{"[fe80::1%eth0]:443", "fe80::/64"},
		{"@", ""},
		{"", ""},
	} {
		if got := ratelimit.AddrKey(tt.in); got != tt.want {
			t.Errorf("AddrKey(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// A flood of refusals writes at most the limit, and the next line that gets
// through says how many were left out.
func TestLogLimited(t *testing.T) {
	clk := clock.NewFake(t0)
	var buf bytes.Buffer
	l := ratelimit.NewLog(slog.New(slog.NewTextHandler(&buf, nil)), ratelimit.Limit{Rate: 1, Burst: 5}, clk)
	for i := range 1000 {
		l.Refused(context.Background(), "API token refused", "remote", "192.0.2.1", "n", i)
	}
	if n := strings.Count(buf.String(), "\n"); n != 5 {
		t.Fatalf("%d lines for a flood of 1000 with a burst of 5", n)
	}
	clk.Advance(time.Second)
	l.Refused(context.Background(), "API token refused", "remote", "192.0.2.1")
	last := buf.String()[strings.LastIndex(strings.TrimSpace(buf.String()), "\n")+1:]
	if !strings.Contains(last, "refusals_not_logged_before_this=995") {
		t.Errorf("the next line does not count the 995 left out: %s", last)
	}
}

func TestPrune(t *testing.T) {
	clk := clock.NewFake(t0)
	k := ratelimit.NewKeyed(ratelimit.Every(time.Second, 2), 0, clk)
	k.Allow("quiet")
	k.Allow("busy")
	k.Allow("busy")
	clk.Advance(time.Second) // quiet is full again, busy has one of two
	k.Prune()
	if n := k.Len(); n != 1 {
		t.Fatalf("%d buckets after pruning, want only the one not refilled", n)
	}
	if ok, _ := k.Allow("busy"); !ok {
		t.Error("pruning lost a bucket's tokens")
	}
	if ok, _ := k.Allow("busy"); ok {
		t.Error("pruning refilled a bucket in use")
	}
}
