package server

import (
	"context"
	"log/slog"
	"runtime"
	"runtime/debug"
	"time"
)

// The garbage collector's target, as GOGC percentages: how far the heap may
// grow past what was live after the last collection (stacks count as live)
// before the next one starts.
//
// A connected fleet makes little garbage, but at Go's default (100) the
// collector still lets the heap grow by as much as is live: at 10,000 edges
// about 75 KiB of RSS per session where 49 KiB are live. At 5 it holds about
// 62 KiB, for about a tenth of a core more (10 held 62-64 KiB for less). A reconnection storm
// (every edge handshaking again after a restart) is the opposite: it makes
// garbage as fast as the CPUs allow, and a tight target there turns into
// collections that slow the handshakes (with GOGC=25 throughout, 10,000 edges
// took 33-35 s to come back instead of 26-29 s; docs/BENCHMARKS.md). So the
// control plane runs lean while the fleet is steady and at Go's default while
// edges connect in numbers.
const (
	gcSteadyPercent = 5
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
	collect    func()                // runtime.GC
	log        *slog.Logger

	steady   bool
	last     uint64    // handshakes at the last observation
	lastAt   time.Time // time of the last observation
	busyAt   time.Time // the last time the rate was a storm's
	previous int       // the target before the tuner took over
}

func newGCTuner(handshakes func() uint64, log *slog.Logger) *gcTuner {
	return &gcTuner{handshakes: handshakes, setPercent: debug.SetGCPercent, collect: runtime.GC, log: log}
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
		// Collect first, under the storm's target: lowered with the
		// storm's heap still there, the target would be far behind and
		// every allocating goroutine (heartbeat acks) would be made to help
		// mark (hundreds of milliseconds, once). After this collection the
		// heap is what is live, and the lean target starts from it.
		t.collect()
		t.setPercent(gcSteadyPercent)
		t.log.Info("fleet steady: garbage collection lean", "gogc", gcSteadyPercent)
	}
}
