package server

import (
	"context"
	"log/slog"
	"testing"
	"time"
)

// tunerUnderTest is a gcTuner on a handshake count and a collector target
// that the test moves by hand.
type tunerUnderTest struct {
	*gcTuner
	count   uint64
	percent int
	// percentAtCollect is the target each forced collection ran under.
	percentAtCollect []int
	now              time.Time
}

func newTunerUnderTest() *tunerUnderTest {
	u := &tunerUnderTest{percent: 100, now: time.Unix(1_000_000, 0)}
	u.gcTuner = &gcTuner{
		handshakes: func() uint64 { return u.count },
		setPercent: func(p int) int { old := u.percent; u.percent = p; return old },
		collect:    func() { u.percentAtCollect = append(u.percentAtCollect, u.percent) },
		log:        slog.New(slog.DiscardHandler),
	}
	u.start(u.now)
	return u
}

// second passes one second in which n handshakes happen.
func (u *tunerUnderTest) second(n uint64) {
	u.now = u.now.Add(time.Second)
	u.count += n
	u.observe(u.now)
}

func TestGCTunerLeanOnceTheFleetIsSteady(t *testing.T) {
	u := newTunerUnderTest()
	if u.percent != gcStormPercent {
		t.Fatalf("target at start %d, want %d: a start has edges to take back", u.percent, gcStormPercent)
	}
	// A restart's reconnection: hundreds of handshakes a second.
	for range 25 {
		u.second(400)
		if u.percent != gcStormPercent {
			t.Fatalf("target %d during a storm, want %d", u.percent, gcStormPercent)
		}
	}
	// Quiet, but not yet for gcSettle.
	for range int(gcSettle/time.Second) - 1 {
		u.second(2)
	}
	if u.percent != gcStormPercent {
		t.Fatalf("target %d before the fleet settled, want %d", u.percent, gcStormPercent)
	}
	if len(u.percentAtCollect) != 0 {
		t.Fatal("a collection was forced before the fleet settled")
	}
	u.second(0)
	if u.percent != gcSteadyPercent {
		t.Fatalf("target %d once steady, want %d", u.percent, gcSteadyPercent)
	}
	if len(u.percentAtCollect) != 1 || u.percentAtCollect[0] != gcStormPercent {
		t.Fatalf("collections forced under targets %v, want one under %d, before the target was lowered", u.percentAtCollect, gcStormPercent)
	}
	// A few edges come and go: still lean.
	for range 30 {
		u.second(gcStormHandshakes - 1)
	}
	if u.percent != gcSteadyPercent {
		t.Fatalf("target %d with a trickle of handshakes, want %d", u.percent, gcSteadyPercent)
	}
	// A partition heals and a rack reconnects at once: relaxed at the first
	// busy second.
	u.second(gcStormHandshakes)
	if u.percent != gcStormPercent {
		t.Fatalf("target %d when a storm starts, want %d", u.percent, gcStormPercent)
	}
}

func TestGCTunerPutsTheTargetBack(t *testing.T) {
	percent, seen := 80, []int{} // 80: what the process had before the tuner
	g := &gcTuner{
		handshakes: func() uint64 { return 0 },
		setPercent: func(p int) int { old := percent; percent = p; seen = append(seen, p); return old },
		log:        slog.New(slog.DiscardHandler),
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	g.run(ctx)
	if len(seen) != 2 || seen[0] != gcStormPercent || percent != 80 {
		t.Fatalf("targets set %v, ending at %d; want %d, then 80 back", seen, percent, gcStormPercent)
	}
}
