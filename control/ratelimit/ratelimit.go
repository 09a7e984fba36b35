// Package ratelimit holds the control plane's rate limits: token buckets per
// key (a source address, a node) whose memory stays bounded however many keys
// a caller makes up, and a logger that keeps a flood of refusals from filling
// the disk.
package ratelimit

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/llorch/llorch/internal/clock"
)

// Limit is a token bucket: Rate tokens a second, at most Burst at once.
// A zero Rate means no limit.
type Limit struct {
	Rate  float64
	Burst int // 0: 1
}

// Every is a limit of one event per interval, with bursts of burst.
func Every(interval time.Duration, burst int) Limit {
	if interval <= 0 {
		return Limit{}
	}
	return Limit{Rate: float64(time.Second) / float64(interval), Burst: burst}
}

// DefaultMaxKeys bounds the buckets a Keyed holds.
const DefaultMaxKeys = 65536

// Keyed is one token bucket per key. It is safe for concurrent use.
type Keyed struct {
	limit   Limit
	maxKeys int
	clock   clock.Clock

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

// NewKeyed returns buckets of limit l, at most maxKeys of them (0:
// DefaultMaxKeys); clk nil is the wall clock.
func NewKeyed(l Limit, maxKeys int, clk clock.Clock) *Keyed {
	if maxKeys <= 0 {
		maxKeys = DefaultMaxKeys
	}
	if clk == nil {
		clk = clock.Real{}
	}
	return &Keyed{limit: l, maxKeys: maxKeys, clock: clk, buckets: map[string]*bucket{}}
}

// Allow takes a token from key's bucket. If there is none it returns false
// and how long until there is one.
func (k *Keyed) Allow(key string) (bool, time.Duration) { return k.take(key, true) }

// Blocked says whether key's bucket is empty, and for how long, without
// taking anything: for limits charged only on failure (see Charge).
func (k *Keyed) Blocked(key string) (bool, time.Duration) {
	if k == nil || k.limit.Rate <= 0 {
		return false, 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	b, ok := k.buckets[key]
	if !ok {
		return false, 0
	}
	k.refill(b, k.clock.Now())
	if b.tokens >= 1 {
		return false, 0
	}
	return true, k.wait(b)
}

// Charge takes a token from key's bucket if it has one (a failed attempt).
func (k *Keyed) Charge(key string) { k.take(key, false) }

func (k *Keyed) take(key string, refuse bool) (bool, time.Duration) {
	if k == nil || k.limit.Rate <= 0 {
		return true, 0
	}
	now := k.clock.Now()
	k.mu.Lock()
	defer k.mu.Unlock()
	b, ok := k.buckets[key]
	if !ok {
		k.makeRoom(now)
		b = &bucket{tokens: k.burst(), last: now}
		k.buckets[key] = b
	}
	k.refill(b, now)
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	if !refuse {
		return true, 0
	}
	return false, k.wait(b)
}

func (k *Keyed) burst() float64 { return float64(max(k.limit.Burst, 1)) }

func (k *Keyed) refill(b *bucket, now time.Time) {
	if d := now.Sub(b.last); d > 0 {
		b.tokens = min(k.burst(), b.tokens+d.Seconds()*k.limit.Rate)
	}
	b.last = now
}

// wait is how long until b holds a token.
func (k *Keyed) wait(b *bucket) time.Duration {
	return time.Duration((1 - b.tokens) / k.limit.Rate * float64(time.Second))
}

// Prune forgets the buckets that have refilled: a fresh one is the same, so
// a quiet key (a node whose sessions are long-lived) costs nothing.
func (k *Keyed) Prune() {
	if k == nil || k.limit.Rate <= 0 {
		return
	}
	now := k.clock.Now()
	k.mu.Lock()
	defer k.mu.Unlock()
	for key, b := range k.buckets {
		if k.full(b, now) {
			delete(k.buckets, key)
		}
	}
}

func (k *Keyed) full(b *bucket, now time.Time) bool {
	return b.tokens+now.Sub(b.last).Seconds()*k.limit.Rate >= k.burst()
}

// makeRoom keeps the map under maxKeys: buckets that have refilled are
// forgotten (a fresh one is the same), and if every bucket is still in use
// (many keys at once), random ones go: a key that comes back starts full,
// which gives its holder one burst more, never less.
func (k *Keyed) makeRoom(now time.Time) {
	if len(k.buckets) < k.maxKeys {
		return
	}
	for key, b := range k.buckets {
		if k.full(b, now) {
			delete(k.buckets, key)
		}
	}
	for key := range k.buckets { // map order is random
		if len(k.buckets) < k.maxKeys*3/4 {
			break
		}
		delete(k.buckets, key)
	}
}

// Len is the number of buckets held, for tests.
func (k *Keyed) Len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.buckets)
}

// AddrKey is the bucket key of a source address: the IP, or for IPv6 its
// /64, which one host usually holds whole. remote is host:port or a bare
// IP; "" when it is neither (a Unix socket).
func AddrKey(remote string) string {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return ""
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.String()
	}
	return ip.String()
}
