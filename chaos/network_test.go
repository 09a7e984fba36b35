package chaos

import (
	"context"
	"fmt"
	"testing"
	"time"

	toxiclient "github.com/Shopify/toxiproxy/v2/client"

	"github.com/llorch/llorch/e2e/harness"
)

// TestPauseControlPlane freezes the control plane (cgroup freezer: sockets
// stay open, nothing runs) for longer than the offline threshold, then
// thaws it: the fleet must reconverge without a storm of transitions.
func TestPauseControlPlane(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	const size = 4
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: size, HeartbeatInterval: heartbeat, OfflineAfter: offlineAfter})
	o := f.Opts
	chk := suite.Checker(t, "pause-control-plane")
	fleet := harness.NodeIDs(f.Edges())
	before := takeSnapshot(t, ctx, f)

	pause := 2 * o.OfflineAfter
	if err := f.CP.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	f.Notef("control plane paused for %s", pause)
	if err := harness.Hold(ctx, pause); err != nil {
		t.Fatal(err)
	}
	if err := f.CP.Unpause(ctx); err != nil {
		t.Fatal(err)
	}
	resumedAt := time.Now()
	f.Notef("control plane resumed")
	// The freeze is a fault healed at the resume: the edges' attempts made
	// during it wait on live connections and go through at the thaw.
	bound := onlineAfterHeal(o, size)
	converged := f.WaitStatus(t, ctx, "online", bound+10*time.Second, fleet...)
	chk.Within("fleet online after the resume", converged, bound)
	changes := f.WaitQuiet(t, ctx, before.lastEvent, 3*o.HeartbeatInterval, 30*time.Second, fleet...)
	perNode := harness.PerNode(changes)
	most := 0
	for _, id := range fleet {
		most = max(most, perNode[id])
	}
	chk.AtMost(fmt.Sprintf("status changes in total after a %s freeze (no storm)", pause), len(changes), 2*size)
	chk.AtMost("status changes per node (down once, up once)", most, 2)
	var late []string
	for _, c := range changes {
		if c.Time.Sub(resumedAt) > bound {
			late = append(late, c.From+"->"+c.To)
		}
	}
	chk.Holds("status changes later than the reconvergence bound", len(late) == 0, harness.Short(late, 4), "none")
	// The silence was the control plane's own: the edges kept sending.
	blamed := 0
	for _, c := range changes {
		if c.To == "offline" {
			blamed++
		}
	}
	chk.Equal("nodes marked offline for the control plane's own freeze", blamed, 0)
	checkSameFleet(t, ctx, chk, f, before)
}

// TestNetworkToxics degrades the path between edges and the control plane
// below the offline threshold: latency with jitter, then connection resets.
// No node may be reported offline.
func TestNetworkToxics(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	const (
		size    = 4
		offline = 5 * time.Second // wider than the 3s elsewhere: a reset costs a reconnect with backoff
		latency = 250             // ms each way
		jitter  = 200             // ms
		rounds  = 5
	)
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: size, HeartbeatInterval: heartbeat, OfflineAfter: offline})
	o := f.Opts
	chk := suite.Checker(t, "network-toxics")
	fleet := harness.NodeIDs(f.Edges())
	before := takeSnapshot(t, ctx, f)
	proxy := f.Gateway.Proxy
	t.Cleanup(func() { f.Gateway.API.ResetState() })

	for _, stream := range []string{"upstream", "downstream"} {
		if _, err := proxy.AddToxic("latency_"+stream, "latency", stream, 1, toxiclient.Attributes{"latency": latency, "jitter": jitter}); err != nil {
			t.Fatal(err)
		}
	}
	f.Notef("latency %dms ± %dms each way", latency, jitter)
	// While it lasts, sample how long the control plane has not heard from
	// each node; it must stay under the threshold.
	var worst time.Duration
	end := time.Now().Add(8 * time.Second)
	for time.Now().Before(end) {
		now := time.Now() // before the call: the answer is at least this fresh
		nodes, err := f.CP.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nodes {
			if n.LastSeen != nil {
				worst = max(worst, now.Sub(*n.LastSeen))
			}
		}
		if err := harness.Hold(ctx, 500*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	// Heartbeats keep flowing: a node is heard from at least every interval,
	// plus the spread of one-way delays (latency-jitter for one heartbeat,
	// latency+jitter for the next), plus half a second of slack.
	heard := o.HeartbeatInterval + time.Duration(2*jitter)*time.Millisecond + 500*time.Millisecond
	chk.Within(fmt.Sprintf("longest silence seen under %dms±%dms latency (heartbeats keep flowing)", latency, jitter), worst, heard)
	for _, stream := range []string{"upstream", "downstream"} {
		if err := proxy.RemoveToxic("latency_" + stream); err != nil {
			t.Fatal(err)
		}
	}

	resetsFrom := takeSnapshot(t, ctx, f).lastEvent
	var stuck []string
	var slowest time.Duration
	resets := make([]int, rounds)
	for round := range rounds {
		mark := takeSnapshot(t, ctx, f).lastEvent
		if _, err := proxy.AddToxic("reset", "reset_peer", "upstream", 1, toxiclient.Attributes{"timeout": 0}); err != nil {
			t.Fatal(err)
		}
		// Each session is reset on its next heartbeat, within an interval:
		// wait for all of them (three intervals at most), then take the
		// toxic away at once so reconnects go through.
		_, err := harness.Until(ctx, 3*o.HeartbeatInterval, func(ctx context.Context) (bool, string, error) {
			es, err := f.CP.Events(ctx, "")
			if err != nil {
				return false, "", err
			}
			resets[round] = len(sessionsReset(harness.StatusChanges(harness.After(es, mark))))
			return resets[round] == size, fmt.Sprintf("%d of %d sessions reset", resets[round], size), nil
		})
		if rerr := proxy.RemoveToxic("reset"); rerr != nil {
			t.Fatal(rerr)
		}
		f.Notef("reset round %d: %d of %d sessions reset (%v)", round+1, resets[round], size, err)
		// A round whose fault did nothing proves nothing: an injector that
		// stopped working fails here, not silently.
		chk.AtLeast(fmt.Sprintf("sessions reset in round %d of %d (the fault did something)", round+1, rounds), resets[round], 1)
		back, err := harness.Until(ctx, o.OfflineAfter, f.StatusIs("online", fleet...))
		if err != nil {
			stuck = append(stuck, fmt.Sprintf("round %d: %v", round+1, err))
			break
		}
		slowest = max(slowest, back)
	}
	recovery := "slowest round " + slowest.Round(time.Millisecond).String()
	if len(stuck) > 0 {
		recovery = harness.Short(stuck, 1)
	}
	chk.Holds("fleet online again within the threshold after every reset round", len(stuck) == 0, recovery, fmt.Sprintf("all %d rounds within %s", rounds, o.OfflineAfter))
	es, err := f.CP.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	drops := 0
	for _, c := range harness.StatusChanges(harness.After(es, resetsFrom)) {
		if c.To == "disconnected" {
			drops++
		}
	}
	chk.AtLeast(fmt.Sprintf("sessions reset in %d rounds (the fault happened)", rounds), drops, size)

	var changes []harness.StatusChange
	if len(stuck) == 0 {
		changes = f.WaitQuiet(t, ctx, before.lastEvent, 2*o.HeartbeatInterval, 30*time.Second, fleet...)
	} else {
		// A node did not come back: count what happened, without waiting
		// for a quiet fleet that will not come.
		changes = harness.StatusChanges(harness.After(es, before.lastEvent))
	}
	falseOffline := 0
	for _, c := range changes {
		if c.To == "offline" {
			falseOffline++
		}
	}
	chk.Equal("nodes reported offline (faults below the threshold)", falseOffline, 0)
	if len(stuck) == 0 {
		checkSameFleet(t, ctx, chk, f, before)
	}
}

// sessionsReset is the set of nodes whose session the control plane saw
// lost: a move from online to disconnected, or a flapping node's moves
// summed up in one event (Coalesced).
func sessionsReset(cs []harness.StatusChange) map[string]bool {
	nodes := map[string]bool{}
	for _, c := range cs {
		if (c.From == "online" && c.To == "disconnected") || c.Coalesced > 0 {
			nodes[c.NodeID] = true
		}
	}
	return nodes
}
