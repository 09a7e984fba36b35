package harness

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// PollEvery is how often states are polled.
const PollEvery = 200 * time.Millisecond

// Cond reports whether a state is reached and describes what it saw (for
// the message when it never is). An error counts as "not yet" (the control
// plane may be restarting) and is described.
type Cond func(ctx context.Context) (done bool, seen string, err error)

// Until polls cond until it holds or timeout passes, and returns how long
// that took. Polling, never sleeping to wait for a state.
func Until(ctx context.Context, timeout time.Duration, cond Cond) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := "nothing yet"
	for {
		done, seen, err := cond(ctx)
		switch {
		case err != nil:
			last = "error: " + err.Error()
		case done:
			return time.Since(start), nil
		default:
			last = seen
		}
		select {
		case <-ctx.Done():
			return time.Since(start), fmt.Errorf("not within %s; last seen: %s", timeout, last)
		case <-time.After(PollEvery):
		}
	}
}

// WaitFor is Until that fails the test when the state is never reached.
func WaitFor(t testing.TB, ctx context.Context, what string, timeout time.Duration, cond Cond) time.Duration {
	t.Helper()
	took, err := Until(ctx, timeout, cond)
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
	return took
}
