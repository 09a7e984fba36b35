package chaos

import (
	"math"
	"time"

	"github.com/llorch/llorch/e2e/harness"
)

// Every time bound a scenario checks is a function of the settings its
// control plane runs with (the fleet's harness.FleetOptions, as NewFleet
// filled them in and passed them to `control serve`) and of the design's
// numbers below, plus slack that is named for what it covers. Change a
// scenario's heartbeat, threshold or pacing and its bounds follow. The
// figures in the comments are for the settings most scenarios use: a 1s
// heartbeat, offline after 3s, pacing at 1000/s with bursts of 100.

// The design's numbers (docs/ARCHITECTURE.md, "The edge session and
// liveness"; the code they come from in brackets).
const (
	// backoffCap caps the edge's reconnect backoff, 500ms doubling with full
	// jitter, at 10s or the heartbeat interval if that is shorter
	// (edge/session).
	backoffCap = 10 * time.Second
	// A control plane that shuts down sends every session a DISCONNECT
	// whose retry hint is restartFloor plus a uniform share of
	// spread(nodes) = clamp(nodes × spreadPerNode, spreadMin, spreadMax)
	// (control/registry DisconnectAll).
	restartFloor  = 2 * time.Second
	spreadPerNode = time.Millisecond
	spreadMin     = time.Second
	spreadMax     = 10 * time.Second
	// A refused edge's retry hint is spread over the time the refused crowd
	// needs, at least pacingWindowMin, plus one token's time
	// (control/registry Admit).
	pacingWindowMin = time.Second
	// sweepTickMax: the sweeper runs every min(1s, interval/2).
	sweepTickMax = time.Second
	// writerBackoffMax caps the status writer's retry backoff (100ms
	// doubling) after a failed write (control/registry writer).
	writerBackoffMax = 5 * time.Second
	// lastSeenFlush: last-seen times are written in one batch this often;
	// on a full disk each flush fails once and counts a write error too.
	lastSeenFlush = 5 * time.Second
)

// Slack, named for what it covers. These are this machine's numbers, not
// the design's; they are generous enough for a loaded 2-core machine
// shared with other builds, and nowhere near the design's own terms.
const (
	// handshake is a TLS 1.3 handshake (resumed, or full) and the Register
	// round trip through the gateway, up to the status event's commit:
	// tens of milliseconds on an idle machine.
	handshake = 500 * time.Millisecond
	// processStart is `docker start` of a scratch image until the binary
	// serves: for the control plane, its port bound and its fleet loaded
	// (the restart's unknown events). About 0.5-1s here; the restart
	// scenarios check it on its own ("serving after docker start").
	processStart = 3 * time.Second
	// loadSlack is what a loaded 2-core machine adds to a chain of steps:
	// the scheduler, the docker API calls that make and heal a fault,
	// fsyncs on fuse-overlayfs.
	loadSlack = 1500 * time.Millisecond
	// eventSlack: a status event's time is when the status writer's
	// transaction began, which is at most one commit after the registry
	// moved the node, never before.
	eventSlack = 100 * time.Millisecond
)

// backoffCeiling is the longest an edge waits between two attempts to
// reconnect, for this run:
//
//	min(10s, heartbeat)                                  = 1s
func backoffCeiling(o harness.FleetOptions) time.Duration {
	return min(backoffCap, o.HeartbeatInterval)
}

// sweepTick is how often the sweeper looks for silent nodes:
//
//	min(1s, heartbeat/2)                                 = 500ms
func sweepTick(o harness.FleetOptions) time.Duration {
	return min(sweepTickMax, o.HeartbeatInterval/2)
}

// detectBound is how soon after a cut (or a kill -9) a silent node must be
// offline, measured from the moment the harness starts the fault:
//
//	offline-after + heartbeat + sweep tick + loadSlack   = 3s + 1s + 500ms + 1.5s = 6s
//
// Silence counts from the node's last heartbeat, which came at most at the
// cut; the heartbeat term covers one that got through while docker was
// still making the cut; the sweeper sees the silence within a tick.
func detectBound(o harness.FleetOptions) time.Duration {
	return o.OfflineAfter + o.HeartbeatInterval + sweepTick(o) + loadSlack
}

// detectFloor is how soon after a cut a node may be offline at the
// earliest: its last heartbeat came at most one interval before the cut
// (later, if the edge was held up on a loaded machine):
//
//	offline-after − heartbeat − loadSlack                = 3s − 1s − 1.5s = 500ms
func detectFloor(o harness.FleetOptions) time.Duration {
	return max(0, o.OfflineAfter-o.HeartbeatInterval-loadSlack)
}

// pacing is how long the registration bucket takes to let in n edges that
// arrive at once: the burst at once, then one every 1/rate:
//
//	max(0, n − burst) / rate                             10 edges at 8/s, burst 2: 1s
func pacing(o harness.FleetOptions, n int) time.Duration {
	return time.Duration(float64(max(0, n-o.RegistrationBurst)) / o.RegistrationRate * float64(time.Second))
}

// pacedReturn is the longest n edges that come back at once can spend in
// the pacing: the bucket's time for all of them, plus the longest retry
// hint the last refused edge may sleep through (spread over the refused
// crowd's time, at least a second, plus one token's time):
//
//	pacing + max(pacing, 1s) + 1/rate   when n > burst, else 0
//	                                                     10 edges at 8/s, burst 2: 1s + 1s + 125ms = 2.125s
func pacedReturn(o harness.FleetOptions, n int) time.Duration {
	if n <= o.RegistrationBurst {
		return 0
	}
	p := pacing(o, n)
	return p + max(p, pacingWindowMin) + time.Duration(float64(time.Second)/o.RegistrationRate)
}

// reconnectSpread is the window a shutting-down control plane spreads its
// n nodes' return over:
//
//	clamp(n × 1ms, 1s, 10s)                              10 nodes: 1s
func reconnectSpread(n int) time.Duration {
	return min(max(time.Duration(n)*spreadPerNode, spreadMin), spreadMax)
}

// shutdownHintMax is the longest retry hint in the DISCONNECT a control
// plane with n nodes sends when it shuts down:
//
//	2s + spread(n)                                       10 nodes: 3s
func shutdownHintMax(n int) time.Duration { return restartFloor + reconnectSpread(n) }

// onlineAfterHeal is how soon after a fault is healed (a partition, a
// freeze of the control plane) its n nodes must be online again, measured
// from the heal:
//
//	backoff ceiling + pacedReturn(n) + handshake + heartbeat + loadSlack
//	                                                     = 1s + 0 + 500ms + 1s + 1.5s = 4s for a few nodes
//
// The heartbeat is for a node whose old session survived the fault: it is
// back with its next heartbeat ("heartbeat resumed"), not a registration.
// An edge whose session was lost dials a new connection for the next one
// (edge/agent), so a connection that died in a partition costs nothing.
func onlineAfterHeal(o harness.FleetOptions, n int) time.Duration {
	return backoffCeiling(o) + pacedReturn(o, n) + handshake + o.HeartbeatInterval + loadSlack
}

// onlineAfterRestart is how soon after `docker start` of a control plane
// its n nodes must be online again. Edges told to wait hint (the longest
// shutdown retry hint for a graceful stop, 0 after kill -9; the hint began
// before the start) come back when it ends, or, if the control plane was
// slower to start, within a backoff ceiling of its serving:
//
//	max(hint, processStart + backoff ceiling) + pacedReturn(n) + handshake + loadSlack
//	                                                     kill -9, 3 nodes: max(0, 3s + 1s) + 0 + 500ms + 1.5s = 6s
//	                                                     SIGTERM, 10 nodes at 8/s, burst 2: max(3s, 4s) + 2.125s + 500ms + 1.5s = 8.125s
func onlineAfterRestart(o harness.FleetOptions, n int, hint time.Duration) time.Duration {
	return max(hint, processStart+backoffCeiling(o)) + pacedReturn(o, n) + handshake + loadSlack
}

// edgeBack is how soon an edge restarted on its state must be online: it
// registers at once when it starts, with no backoff:
//
//	processStart + handshake + loadSlack                 = 3s + 500ms + 1.5s = 5s
func edgeBack() time.Duration { return processStart + handshake + loadSlack }

// hintWindowFloor is the least the n returns of a graceful restart may be
// spread over if each edge waits its DISCONNECT hint, a uniform draw over
// a window of w = spread(n): the range of n uniform draws is below r·w with
// probability n·r^(n−1) − (n−1)·r^n, and r is chosen so that this is
// below falseAlarm (one run in ten thousand):
//
//	r·spread(n)                                          10 nodes: 0.288 × 1s = 288ms
func hintWindowFloor(n int) time.Duration {
	const falseAlarm = 1e-4
	if n < 2 {
		return 0
	}
	below := func(r float64) float64 {
		return float64(n)*math.Pow(r, float64(n-1)) - float64(n-1)*math.Pow(r, float64(n))
	}
	lo, hi := 0.0, 1.0
	for range 60 {
		mid := (lo + hi) / 2
		if below(mid) < falseAlarm {
			lo = mid
		} else {
			hi = mid
		}
	}
	return time.Duration(lo * float64(reconnectSpread(n)))
}

// restartSpreadFloor is the least time the first to the last of n returns
// after a graceful restart may span: no faster than the pacing lets them in,
// and, when the new control plane was serving before the first hint ran
// out (so that the hints, not the start, decide when edges come), over
// roughly the hint's window:
//
//	max(pacing(n), hintWindowFloor(n) if serving in time) − eventSlack
//	                                                     10 nodes at 8/s, burst 2: max(1s, 288ms) − 100ms = 900ms
func restartSpreadFloor(o harness.FleetOptions, n int, servingInTime bool) time.Duration {
	floor := pacing(o, n)
	if servingInTime {
		floor = max(floor, hintWindowFloor(n))
	}
	return max(0, floor-eventSlack)
}

// pacedAtMost is how many registrations the bucket lets in within a window
// of event times d wide (each event at most eventSlack after its
// admission):
//
//	burst + rate × (d + eventSlack)                      100ms at 8/s, burst 2: 2 + 1.6 → 3
func pacedAtMost(o harness.FleetOptions, d time.Duration) int {
	return o.RegistrationBurst + int(math.Floor(o.RegistrationRate*(d+eventSlack).Seconds()))
}

// goodbyeWritten is how soon after space is freed a status change queued
// while the disk was full must be written: the writer is at most one
// backoff away from its next try:
//
//	5s + loadSlack                                       = 6.5s
func goodbyeWritten() time.Duration { return writerBackoffMax + loadSlack }

// flushErrorsAtMost is how many write errors the last-seen flushes can
// account for in d on a full disk: one per flush interval, and one more
// for where the window falls:
//
//	floor(d / 5s) + 1
func flushErrorsAtMost(d time.Duration) int { return int(d/lastSeenFlush) + 1 }
