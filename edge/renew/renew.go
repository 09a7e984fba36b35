// Package renew decides when the edge renews its certificate and drives the
// renewals: at about 2/3 of the lifetime, with jitter, retried with
// exponential backoff, until the certificate expires. How a renewal is done
// (a fresh key, the control plane's signature, saving it) is the caller's
// Renew function; this package owns only the timing.
package renew

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/internal/backoff"
	"github.com/llorch/llorch/internal/clock"
)

// ErrExpired says the certificate expired before it could be renewed. The
// node must enroll again. It is edge.ErrCertExpired, so the edge's callers
// need to know only that one.
var ErrExpired = edge.ErrCertExpired

// maxSleep is the longest Run waits on one timer before it looks at the clock
// again: a timer does not count the time a laptop spends asleep.
const maxSleep = time.Minute

// minRetryWait is the shortest wait before a retry, so a Rand that returns 0
// cannot make Run call Renew in a tight loop.
const minRetryWait = time.Second

// Due returns when a certificate valid from notBefore to notAfter should be
// renewed: at 2/3 of its lifetime, moved by a jitter of up to ±lifetime/20
// drawn from rnd (a float in [0,1); out-of-range values are clamped); never
// before notBefore. A certificate with no lifetime is due at notBefore.
func Due(notBefore, notAfter time.Time, rnd float64) time.Time {
	life := notAfter.Sub(notBefore) // saturates rather than overflows
	if life <= 0 {
		return notBefore
	}
	rnd = backoff.Unit(rnd)
	at := life - life/3 // 2/3 of it, without overflowing life*2
	jitter := time.Duration((2*rnd - 1) * float64(life/20))
	due := notBefore.Add(at + jitter)
	if due.Before(notBefore) {
		return notBefore
	}
	return due
}

// Config is what Run needs.
type Config struct {
	Clock  clock.Clock  // nil: clock.Real{}
	Logger *slog.Logger // nil: discard
	// Current returns the validity of the certificate now in use; it changes
	// after each renewal. Required.
	Current func() (notBefore, notAfter time.Time)
	// Renew makes a fresh key, asks the control plane to sign it and saves
	// the result, so that Current returns the new certificate once it
	// returns nil. It is called when due. Required. When its error is (or
	// wraps) an *edge.RefusalError with a RetryAfter (the control plane is
	// rate limiting renewals), the next attempt waits at least that long.
	Renew func(ctx context.Context) error
	// RetryMin, RetryMax bound the exponential backoff with full jitter after
	// a failed Renew (0: 10s and 5m). A retry never waits less than a second
	// or the control plane's retry hint, nor past the certificate's notAfter.
	RetryMin, RetryMax time.Duration
	// Rand returns a float in [0,1) for the jitter (nil: math/rand/v2 Float64).
	Rand func() float64
}

// Run renews each time one is due until ctx ends, and then returns ctx.Err().
// It re-reads Current after each attempt, and wakes up at least every minute
// to re-check against the clock (timers do not survive a laptop's sleep).
// When the certificate has expired (at or after notAfter) it returns an error
// wrapping ErrExpired, and the last renewal error if there was one, instead of
// trying forever: an expired node must re-enroll.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Current == nil || cfg.Renew == nil {
		return errors.New("renew: Config.Current and Config.Renew are required")
	}
	clk := cfg.Clock
	if clk == nil {
		clk = clock.Real{}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rnd := cfg.Rand
	if rnd == nil {
		rnd = rand.Float64
	}
	retryMin, retryMax := cfg.RetryMin, cfg.RetryMax
	if retryMin <= 0 {
		retryMin = 10 * time.Second
	}
	if retryMax <= 0 {
		retryMax = 5 * time.Minute
	}
	retryMax = max(retryMax, retryMin)

	var (
		nb, na   time.Time // the certificate the schedule is for
		due      time.Time // when it is due; drawn once per certificate
		failures int       // failed attempts on this certificate
		retryAt  time.Time // when to try again after a failure
		lastErr  error
	)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		curNB, curNA := cfg.Current()
		if !curNB.Equal(nb) || !curNA.Equal(na) {
			nb, na = curNB, curNA
			due = Due(nb, na, rnd())
			failures, retryAt, lastErr = 0, time.Time{}, nil
			log.Info("certificate renewal scheduled", "not_after", na, "due", due)
		}
		now := clk.Now()
		if !now.Before(na) {
			if lastErr != nil {
				return fmt.Errorf("%w at %s; last renewal error: %w", ErrExpired, na.UTC().Format(time.RFC3339), lastErr)
			}
			return fmt.Errorf("%w at %s", ErrExpired, na.UTC().Format(time.RFC3339))
		}

		next := due
		if failures > 0 {
			next = retryAt
		}
		if now.Before(next) {
			wait := min(next.Sub(now), maxSleep)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-clk.After(wait):
			}
			continue
		}

		log.Info("renewing certificate", "attempt", failures+1, "not_after", na)
		err := cfg.Renew(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err == nil {
			if n1, n2 := cfg.Current(); !n1.Equal(nb) || !n2.Equal(na) {
				log.Info("certificate renewed", "not_after", n2)
				continue
			}
			// Renewing again at once would spin; treat it as a failure.
			err = errors.New("renewal reported success but the current certificate did not change")
		}
		lastErr = err
		now = clk.Now()
		wait := max(backoff.FullJitter(failures, retryMin, retryMax, rnd()), minRetryWait)
		if ref, ok := errors.AsType[*edge.RefusalError](err); ok {
			wait = max(wait, ref.RetryAfter)
		}
		failures++
		retryAt = now.Add(wait)
		if retryAt.After(na) {
			retryAt = na
		}
		log.Warn("certificate renewal failed", "attempt", failures, "err", err, "retry_at", retryAt, "not_after", na)
	}
}
