package edgetest

import (
	"testing"
	"time"

	"github.com/llorch/llorch/internal/clock"
)

// Clock is a fake clock that reports each timer asked of it, so a test can
// wait until the code under test waits, and see for how long.
type Clock struct {
	*clock.Fake
	afters chan time.Duration
}

// NewClock returns a fake clock at a fixed time.
func NewClock() *Clock {
	return &Clock{Fake: clock.NewFake(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)), afters: make(chan time.Duration, 4096)}
}

// After is clock.Fake's, reported to NextAfter once the timer is set.
func (c *Clock) After(d time.Duration) <-chan time.Time {
	ch := c.Fake.After(d)
	select {
	case c.afters <- d:
	default:
		panic("edgetest.Clock: more than 4096 timers not looked at")
	}
	return ch
}

// NextAfter waits for the next timer set and returns its duration.
func (c *Clock) NextAfter(tb testing.TB) time.Duration {
	tb.Helper()
	select {
	case d := <-c.afters:
		return d
	case <-time.After(WaitLimit):
		tb.Fatal("no timer was set")
		return 0
	}
}

// WaitAfter waits until a timer of d is set, skipping others.
func (c *Clock) WaitAfter(tb testing.TB, d time.Duration) {
	tb.Helper()
	deadline := time.After(WaitLimit)
	for {
		select {
		case got := <-c.afters:
			if got == d {
				return
			}
		case <-deadline:
			tb.Fatalf("no timer of %s was set", d)
		}
	}
}

// AfterOtherThan waits for the next timer whose duration is none of skip,
// and returns its duration.
func (c *Clock) AfterOtherThan(tb testing.TB, skip ...time.Duration) time.Duration {
	tb.Helper()
	for {
		d := c.NextAfter(tb)
		found := false
		for _, s := range skip {
			found = found || d == s
		}
		if !found {
			return d
		}
	}
}
