package backoff_test

import (
	"math"
	"testing"
	"time"

	"github.com/llorch/llorch/internal/backoff"
)

var justBelowOne = math.Nextafter(1, 0)

func TestFullJitter(t *testing.T) {
	const (
		lo = 10 * time.Second
		hi = 5 * time.Minute
	)
	tests := []struct {
		name             string
		attempt          int
		minWait, maxWait time.Duration
		rnd              float64
		want             time.Duration
	}{
		{"first", 0, lo, hi, 0.5, 5 * time.Second},
		{"second", 1, lo, hi, 0.5, 10 * time.Second},
		{"third", 2, lo, hi, 0.5, 20 * time.Second},
		{"fifth", 4, lo, hi, 0.5, 80 * time.Second},
		{"capped", 5, lo, hi, 0.5, 150 * time.Second},
		{"rnd 0", 3, lo, hi, 0, 0},
		{"rnd just below 1", 0, lo, hi, justBelowOne, lo - 1},
		{"rnd 1 is clamped", 0, lo, hi, 1, lo - 1},
		{"negative rnd", 3, lo, hi, -1, 0},
		{"negative attempt", -5, lo, hi, 0.5, 5 * time.Second},
		{"attempt 62", 62, lo, hi, 0.5, 150 * time.Second},
		{"attempt 63", 63, lo, hi, 0.5, 150 * time.Second},
		{"attempt 64", 64, lo, hi, 0.5, 150 * time.Second},
		{"attempt 1000", 1000, lo, hi, 0.5, 150 * time.Second},
		{"attempt MaxInt", math.MaxInt, lo, hi, 0.5, 150 * time.Second},
		{"max is the largest duration", 1000, time.Nanosecond, math.MaxInt64, 0.5, math.MaxInt64 / 2},
		{"largest duration, rnd 1", math.MaxInt, time.Nanosecond, math.MaxInt64, 1, math.MaxInt64 - 1023},
		{"min above max", 0, 10 * time.Minute, hi, 0.5, 150 * time.Second},
		{"zero min", 3, 0, hi, 0.5, 0},
		{"zero max", 3, lo, 0, 0.5, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := backoff.FullJitter(tt.attempt, tt.minWait, tt.maxWait, tt.rnd)
			// float64 carries 53 bits: allow its rounding on huge values.
			tol := time.Duration(float64(tt.want) * 1e-15)
			if d := got - tt.want; d > tol || d < -tol {
				t.Errorf("FullJitter(%d, %v, %v, %v) = %v, want %v", tt.attempt, tt.minWait, tt.maxWait, tt.rnd, got, tt.want)
			}
			if got < 0 {
				t.Errorf("Backoff is negative: %v", got)
			}
		})
	}
}
