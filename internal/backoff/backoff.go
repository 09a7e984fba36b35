// Package backoff computes retry waits: exponential backoff with full jitter
// (a uniform draw between zero and the exponential ceiling), which spreads
// retries of many clients instead of synchronising them.
package backoff

import (
	"math"
	"time"
)

// FullJitter returns the wait before retry number attempt (0-based): full
// jitter, rnd*min(maxWait, minWait*2^attempt). It does not overflow for any
// attempt; a negative attempt counts as 0, and a minWait or maxWait of zero or
// less gives 0.
func FullJitter(attempt int, minWait, maxWait time.Duration, rnd float64) time.Duration {
	if minWait <= 0 || maxWait <= 0 {
		return 0
	}
	ceil := minWait
	for i := 0; i < attempt && ceil < maxWait; i++ {
		if ceil > maxWait/2 {
			ceil = maxWait
			break
		}
		ceil *= 2
	}
	ceil = min(ceil, maxWait)
	return time.Duration(Unit(rnd) * float64(ceil))
}

// Unit clamps a random draw into [0, 1): values at or above 1 become the
// largest float below 1, and negatives and NaN become 0.
func Unit(f float64) float64 {
	switch {
	case f >= 1:
		return math.Nextafter(1, 0)
	case f > 0:
		return f
	default: // also NaN
		return 0
	}
}
