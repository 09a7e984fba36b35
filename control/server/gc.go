package server

import (
	"context"
	"log/slog"
	"runtime/debug"
	"time"
)

// The garbage collector's target, as GOGC percentages: how far the heap may
// grow past what was live after the last collection before the next one
// starts.
//
// A connected fleet makes little garbage: at 10,000 edges the heap that is
// live is almost all sessions, and heartbeats add a few megabytes a second.
// Go's default (100) lets the heap double anyway, so the process holds about
// 80 KiB per session where 53 KiB are live. A reconnection storm (every edge
// handshaking again after a restart) is the opposite: it makes garbage as fast
// as the CPUs allow, and a tight target there turns into collections that
// slow the handshakes (with GOGC=25 throughout, 10,000 edges took 33-35 s to
// come back after a restart instead of 26-29 s; docs/BENCHMARKS.md). So the control plane runs lean while the
// fleet is steady and at Go's default while edges are connecting in numbers.
const (
	gcSteadyPercent = 25
	gcStormPercent  = 100
	// gcStormHandshakes is the handshake rate on the public port (per
	// second) that counts as a storm.
	gcStormHandshakes = 20
	// gcSettle is how long the rate must stay below gcStormHandshakes before
	// the collector goes lean again.
	gcSettle = 10 * time.Second
)

// gcTuner sets the collector's target from the rate of TLS handshakes on
// the public port. It starts at gcStormPercent: a control plane that starts
// has edges to take back. Only commands use it (Config.TuneGC), never
// tests: the target is the whole process's.
type gcTuner struct {
	handshakes func() uint64         // handshakes so far
	setPercent func(percent int) int // debug.SetGCPercent
	release    func()                // debug.FreeOSMemory
	log        *slog.Logger

	steady   bool
	last     uint64    // handshakes at the last observation
	lastAt   time.Time // time of the last observation
	busyAt   time.Time // the last time the rate was a storm's
	previous int       // the target before the tuner took over
}

func newGCTuner(handshakes func() uint64, log *slog.Logger) *gcTuner {
	return &gcTuner{handshakes: handshakes, setPercent: debug.SetGCPercent, release: debug.FreeOSMemory, log: log}
}

// run observes the handshake rate every second until ctx ends, then puts the
// target back as it found it.
func (t *gcTuner) run(ctx context.Context) {
	t.start(time.Now())
	defer t.setPercent(t.previous)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			t.observe(now)
		}
	}
}

func (t *gcTuner) start(now time.Time) {
	t.previous = t.setPercent(gcStormPercent)
	t.last, t.lastAt, t.busyAt = t.handshakes(), now, now
}

// observe reads the handshake count and changes the target when the fleet
// starts or stops connecting in numbers.
func (t *gcTuner) observe(now time.Time) {
	n := t.handshakes()
	elapsed := now.Sub(t.lastAt).Seconds()
	rate := float64(n-t.last) / max(elapsed, 0.001)
	t.last, t.lastAt = n, now
	if rate >= gcStormHandshakes {
		t.busyAt = now
		if t.steady {
			t.steady = false
			t.setPercent(gcStormPercent)
			t.log.Info("edges are connecting in numbers: garbage collection relaxed until they are done", "handshakes_per_second", int(rate), "gogc", gcStormPercent)
		}
		return
	}
	if !t.steady && now.Sub(t.busyAt) >= gcSettle {
		t.steady = true
		t.setPercent(gcSteadyPercent)
		// The storm's heap is free now but still mapped; the runtime's own
		// scavenger would take minutes to hand it back. This collects and
		// returns it at once (a collection's worth of CPU, once per storm).
		t.release()
		t.log.Info("fleet steady: garbage collection lean, free memory returned to the OS", "gogc", gcSteadyPercent)
	}
}
