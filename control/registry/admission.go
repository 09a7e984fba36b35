package registry

import (
	"time"
)

// Admission paces new sessions, so that a fleet coming back at once (after
// a control-plane restart, or a network heal) registers as a stream rather
// than a stampede. It is a token bucket: Rate sessions per second with
// bursts of Burst. A refused edge is told when to retry, spread at random
// over the time the queue ahead of it needs.
type Admission struct {
	Rate  float64 // sessions per second; 0: no limit
	Burst int     // 0: 1
}

// Default admission: far above what a fleet needs in steady state, low
// enough that 10,000 edges reconnecting are spread over seconds.
const (
	DefaultRegistrationRate  = 1000
	DefaultRegistrationBurst = 100
)

// restartFloor is the least a control plane that is shutting down asks edges
// to wait: long enough for its successor to be listening.
const restartFloor = 2 * time.Second

type bucket struct {
	tokens    float64
	last      time.Time
	refused   int // refusals in the current second
	refusedAt time.Time
}

// Admit says whether a new session may register now, and if not, after how
// long the edge should try again.
func (r *Registry) Admit() (bool, time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopping {
		// Shutting down: come back to the next process, spread out.
		return false, restartFloor + r.jitter(time.Second)
	}
	a := r.cfg.Admission
	if a.Rate <= 0 {
		return true, 0
	}
	burst := float64(max(a.Burst, 1))
	now := r.clock.Now()
	b := &r.admission
	if b.last.IsZero() {
		b.tokens = burst
	} else {
		b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*a.Rate)
	}
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	if now.Sub(b.refusedAt) > time.Second {
		b.refused, b.refusedAt = 0, now
	}
	b.refused++
	r.metrics.SessionPaced()
	// Those refused in the last second need refused/Rate seconds to get in;
	// spread them over that window (at least a second).
	window := max(time.Duration(float64(b.refused)/a.Rate*float64(time.Second)), time.Second)
	return false, r.jitter(window) + time.Duration(float64(time.Second)/a.Rate)
}

// jitter is a random duration in [0, d), from Config.Rand.
func (r *Registry) jitter(d time.Duration) time.Duration {
	return time.Duration(r.rand() * float64(d))
}
