package chaos

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/e2e/harness"
)

// TestPartitionOne cuts one edge off its network past the offline
// threshold, then heals the link.
func TestPartitionOne(t *testing.T) { partition(t, "partition-one", 3, 1) }

// TestPartitionHalf does the same to half the fleet at once.
func TestPartitionHalf(t *testing.T) { partition(t, "partition-half", 4, 2) }

// partitionHold is how long an edge stays cut off: longer than the control
// plane's HTTP/2 keepalive gives a dead stream (heartbeat + 5s idle, then a
// 5s ping timeout, control/server), so a partition that outlives its stream
// is covered.
const partitionHold = 15 * time.Second

func partition(t *testing.T, scenario string, size, cut int) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: size, HeartbeatInterval: heartbeat, OfflineAfter: offlineAfter})
	o := f.Opts
	chk := suite.Checker(t, scenario)
	victims, others := f.Edges()[:cut], f.Edges()[cut:]
	before := takeSnapshot(t, ctx, f)

	cutAt := time.Now()
	for _, e := range victims {
		if err := e.Partition(ctx); err != nil {
			t.Fatal(err)
		}
	}
	f.Notef("partitioned %s", names(victims))
	fastest, detected := waitEach(t, ctx, f, before.lastEvent, "offline", cutAt, detectBound(o)+10*time.Second, victims)
	chk.Within(fmt.Sprintf("offline after the cut (slowest of %d)", cut), detected, detectBound(o))
	chk.AtLeastDuration(fmt.Sprintf("offline after the cut (fastest of %d: not before the threshold)", cut), fastest, detectFloor(o))
	// Keep the edges cut off past the point where the control plane's
	// HTTP/2 pings give up on their dead streams, so that what happens to a
	// node already offline is seen too.
	if err := harness.Hold(ctx, partitionHold-time.Since(cutAt)); err != nil {
		t.Fatal(err)
	}
	stillUp := f.StatusIs("online", harness.NodeIDs(others)...)
	up, seen, err := stillUp(ctx)
	chk.Holds("nodes not cut stay online during the partition", err == nil && up, orErr(seen, err), "all online")
	es, err := f.CP.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	during := harness.PerNode(harness.StatusChanges(harness.After(es, before.lastEvent)))
	most := 0
	for _, e := range victims {
		most = max(most, during[e.NodeID])
	}
	chk.AtMost(fmt.Sprintf("status changes per cut node while cut off for %s (online -> offline only)", partitionHold), most, 1)

	healAt := time.Now()
	for _, e := range victims {
		if err := e.Heal(ctx); err != nil {
			t.Fatal(err)
		}
	}
	f.Notef("healed %s", names(victims))
	bound := onlineAfterHeal(o, cut)
	_, back := waitEach(t, ctx, f, before.lastEvent, "online", healAt, bound+10*time.Second, victims)
	chk.Within(fmt.Sprintf("online after the heal (slowest of %d)", cut), back, bound)

	changes := f.WaitQuiet(t, ctx, before.lastEvent, 2*heartbeat, 30*time.Second, harness.NodeIDs(f.Edges())...)
	checkSameFleet(t, ctx, chk, f, before)
	backward := 0
	for _, c := range changes {
		if c.From == "offline" && c.To == "disconnected" {
			backward++
		}
	}
	chk.Equal("offline -> disconnected transitions (a node already offline is not back inside grace)", backward, 0)
	perNode := harness.PerNode(changes)
	most = 0
	for _, e := range victims {
		most = max(most, perNode[e.NodeID])
	}
	// online -> offline, offline -> online; nothing else.
	chk.AtMost("status changes per cut node (no flapping)", most, 2)
	quietOthers := 0
	for _, e := range others {
		quietOthers += perNode[e.NodeID]
	}
	chk.Equal("status changes of nodes not cut", quietOthers, 0)
}

// snapshot is what must not change across a fault.
type snapshot struct {
	lastEvent int64
	enrolled  int
	uses      map[string]int
	nodes     map[string]harness.Node
}

func takeSnapshot(t testing.TB, ctx context.Context, f *harness.Fleet) snapshot {
	t.Helper()
	es, err := f.CP.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	tokens, err := f.CP.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := f.NodeMap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s := snapshot{lastEvent: harness.LastEventID(es), enrolled: harness.CountKind(es, "enrolled"), uses: map[string]int{}, nodes: nodes}
	for _, tok := range tokens {
		s.uses[tok.ID] = tok.Uses
	}
	return s
}

// checkSameFleet checks that the fleet came back as itself: the same nodes
// (IDs, names, certificates), no new enrollment, no token spent.
func checkSameFleet(t testing.TB, ctx context.Context, chk *harness.Checker, f *harness.Fleet, before snapshot) {
	t.Helper()
	after := takeSnapshot(t, ctx, f)
	names := map[string]int{}
	for _, n := range after.nodes {
		names[n.Name]++
	}
	dup := 0
	for _, c := range names {
		dup += c - 1
	}
	chk.Equal("nodes after the fault (none lost)", len(after.nodes), len(before.nodes))
	chk.Equal("duplicate nodes (same name twice)", dup, 0)
	var changed []string
	for id, n := range before.nodes {
		a, ok := after.nodes[id]
		if !ok || a.Name != n.Name || a.CertificateSerial != n.CertificateSerial || a.TokenID != n.TokenID {
			changed = append(changed, n.Name)
		}
	}
	slices.Sort(changed)
	chk.Holds("same node IDs and certificates", len(changed) == 0, "changed: "+harness.Short(changed, 5), "none changed")
	chk.Equal("new enrolled events (re-enrollments)", after.enrolled-before.enrolled, 0)
	spent := 0
	for id, u := range after.uses {
		if u != before.uses[id] {
			spent++
		}
	}
	chk.Equal("tokens whose use count changed", spent, 0)
}

// waitEach waits until each edge's node has a status change to `to` after
// event `after`, and returns the fastest and the slowest, measured from
// `from` to the change's time as the control plane recorded it.
func waitEach(t testing.TB, ctx context.Context, f *harness.Fleet, after int64, to string, from time.Time, timeout time.Duration, edges []*harness.Edge) (fastest, slowest time.Duration) {
	t.Helper()
	harness.WaitFor(t, ctx, fmt.Sprintf("%s %s", names(edges), to), timeout, func(ctx context.Context) (bool, string, error) {
		es, err := f.CP.Events(ctx, "")
		if err != nil {
			return false, "", err
		}
		cs := harness.StatusChanges(harness.After(es, after))
		var missing []string
		fastest, slowest = time.Duration(math.MaxInt64), 0
		for _, e := range edges {
			c, ok := harness.FirstTo(cs, e.NodeID, to)
			if !ok {
				missing = append(missing, e.Name)
				continue
			}
			fastest, slowest = min(fastest, c.Time.Sub(from)), max(slowest, c.Time.Sub(from))
		}
		return len(missing) == 0, "no change to " + to + " yet: " + strings.Join(missing, ","), nil
	})
	return fastest, slowest
}

func names(edges []*harness.Edge) string {
	var ns []string
	for _, e := range edges {
		ns = append(ns, e.Name)
	}
	return strings.Join(ns, ",")
}

// orErr is what a Cond saw, or its error.
func orErr(seen string, err error) string {
	if err != nil {
		return "error: " + err.Error()
	}
	return seen
}
