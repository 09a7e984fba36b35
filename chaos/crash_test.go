package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	tcnetwork "github.com/testcontainers/testcontainers-go/network"

	"github.com/llorch/llorch/e2e/harness"
)

// op is one admin or enrollment operation of the workload, as a history
// entry: ok means acknowledged (exit 0); info means indeterminate (an error,
// a timeout, a crash: it may or may not have happened).
type op struct {
	Kind    string    `json:"kind"` // create, enroll, revoke
	Invoke  time.Time `json:"invoke"`
	Done    time.Time `json:"done"`
	Outcome string    `json:"outcome"` // ok or info
	TokenID string    `json:"token_id"`
	NodeID  string    `json:"node_id,omitempty"`
	Detail  string    `json:"detail,omitempty"`
}

// workload creates tokens, enrolls with them (from a sidecar holding the edge
// binary, each into a fresh state directory) and revokes unused ones, until
// stop is closed. It records every operation.
type workload struct {
	f        *harness.Fleet
	enroller string // sidecar container ID
	rng      *rand.Rand

	mu      sync.Mutex
	history []op
	unused  map[string]string // acknowledged, neither used nor revoked: token ID -> token
}

func (w *workload) run(ctx context.Context, stop <-chan struct{}) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		w.mu.Lock()
		var pick []string
		for id := range w.unused {
			pick = append(pick, id)
		}
		slices.Sort(pick)
		roll := w.rng.IntN(10)
		w.mu.Unlock()
		switch {
		case len(pick) > 0 && roll < 4:
			w.enroll(ctx, i, pick[w.rng.IntN(len(pick))])
		case len(pick) > 1 && roll < 6:
			w.revoke(ctx, pick[w.rng.IntN(len(pick))])
		default:
			w.create(ctx, i)
		}
	}
}

func (w *workload) record(o op) {
	o.Done = time.Now()
	w.mu.Lock()
	w.history = append(w.history, o)
	w.mu.Unlock()
}

func (w *workload) create(ctx context.Context, i int) {
	o := op{Kind: "create", Invoke: time.Now(), Outcome: "info"}
	token, id, err := w.f.CP.CreateToken(ctx, fmt.Sprintf("wl-%d", i))
	if err != nil {
		o.Detail = err.Error()
	} else {
		o.Outcome, o.TokenID = "ok", id
		w.mu.Lock()
		w.unused[id] = token
		w.mu.Unlock()
	}
	w.record(o)
}

func (w *workload) revoke(ctx context.Context, id string) {
	w.mu.Lock()
	delete(w.unused, id)
	w.mu.Unlock()
	o := op{Kind: "revoke", Invoke: time.Now(), Outcome: "info", TokenID: id}
	if _, err := w.f.CP.AdminOK(ctx, "token", "revoke", id); err != nil {
		o.Detail = err.Error()
	} else {
		o.Outcome = "ok"
	}
	w.record(o)
}

func (w *workload) enroll(ctx context.Context, i int, id string) {
	w.mu.Lock()
	token := w.unused[id]
	delete(w.unused, id)
	w.mu.Unlock()
	o := op{Kind: "enroll", Invoke: time.Now(), Outcome: "info", TokenID: id}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	res, err := w.f.Suite().ExecEnv(ctx, w.enroller, []string{"LLORCH_ENROLL_TOKEN=" + token},
		harness.TestkitBin, "run", "-timeout", "10s", "--",
		harness.EdgeBin, "enroll", "--control", harness.ControlURL, "--state", fmt.Sprintf("/var/lib/wl/%d", i))
	switch {
	case err != nil:
		o.Detail = err.Error()
	case res.Code == 0:
		if m := strings.Fields(strings.TrimPrefix(res.Stdout, "enrolled as node ")); len(m) > 0 && strings.HasPrefix(res.Stdout, "enrolled as node ") {
			o.Outcome, o.NodeID = "ok", m[0]
		} else {
			o.Detail = "unexpected output: " + res.Stdout
		}
	default:
		o.Detail = res.String()
	}
	w.record(o)
}

// TestKillControlPlane kills the control plane with SIGKILL while edges
// heartbeat and tokens, enrollments and revocations are under way, checks
// the database it left, restarts it and checks that nothing acknowledged
// was lost and nothing happened twice.
func TestKillControlPlane(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	_, rng := harness.Seed(t)
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: 3, HeartbeatInterval: heartbeat, OfflineAfter: offlineAfter})
	o := f.Opts
	chk := suite.Checker(t, "kill-control-plane")
	fleet := harness.NodeIDs(f.Edges())
	before := takeSnapshot(t, ctx, f)
	enroller, err := f.Sidecar(ctx, "enroller", []string{"sleep"}, tcnetwork.WithNetwork(nil, f.Site))
	if err != nil {
		t.Fatal(err)
	}

	w := &workload{f: f, enroller: enroller.GetContainerID(), rng: rng, unused: map[string]string{}}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx, stop) }()
	killAfter := 1500*time.Millisecond + time.Duration(rng.Int64N(int64(1500*time.Millisecond)))
	if err := harness.Hold(ctx, killAfter); err != nil {
		t.Fatal(err)
	}
	if err := f.CP.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now()
	f.Notef("kill -9 of the control plane %s into the workload", killAfter.Round(time.Millisecond))
	close(stop)
	<-done
	history, _ := json.MarshalIndent(w.history, "", "  ")
	f.WriteArtifact("history.json", history)

	db, err := suite.IntegrityCheck(ctx, f.CP.ID, harness.ControlDB, filepath.Join(t.TempDir(), "db"))
	if err != nil {
		t.Fatalf("check the database the killed control plane left: %v", err)
	}
	chk.Holds("PRAGMA integrity_check of the database left by kill -9", db.Integrity == "ok", db.Integrity, "ok")

	startAt := time.Now()
	readyAt := f.CP.Start(t, ctx)
	f.Notef("control plane restarted after %s down", readyAt.Sub(killedAt).Round(time.Millisecond))
	bound := onlineAfterRestart(o, len(fleet), 0)
	_, back := waitEach(t, ctx, f, before.lastEvent, "online", startAt, bound+10*time.Second, f.Edges())
	chk.Within("fleet online again after docker start (slowest)", back, bound)

	counts := map[string]int{}
	for _, o := range w.history {
		counts[o.Kind+"/"+o.Outcome]++
	}
	t.Logf("workload: %v", counts)
	chk.AtLeast("acknowledged operations before the kill (creates+enrolls+revokes)", counts["create/ok"]+counts["enroll/ok"]+counts["revoke/ok"], 5)

	tokens, err := f.CP.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := f.NodeMap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]harness.Token{}
	for _, tok := range tokens {
		byID[tok.ID] = tok
	}
	var lostTokens, lostRevokes, lostNodes []string
	for _, o := range w.history {
		if o.Outcome != "ok" {
			continue
		}
		tok, ok := byID[o.TokenID]
		switch o.Kind {
		case "create":
			if !ok {
				lostTokens = append(lostTokens, o.TokenID)
			}
		case "revoke":
			if !ok || !tok.Revoked {
				lostRevokes = append(lostRevokes, o.TokenID)
			}
		case "enroll":
			if n, ok := nodes[o.NodeID]; !ok || n.TokenID != o.TokenID {
				lostNodes = append(lostNodes, o.NodeID)
			}
		}
	}
	chk.Holds("acknowledged tokens present after restart", len(lostTokens) == 0, fmt.Sprintf("%d of %d missing %s", len(lostTokens), counts["create/ok"], harness.Short(lostTokens, 3)), "none missing")
	chk.Holds("acknowledged revocations present after restart", len(lostRevokes) == 0, fmt.Sprintf("%d of %d missing %s", len(lostRevokes), counts["revoke/ok"], harness.Short(lostRevokes, 3)), "none missing")
	chk.Holds("acknowledged enrollments present after restart", len(lostNodes) == 0, fmt.Sprintf("%d of %d missing %s", len(lostNodes), counts["enroll/ok"], harness.Short(lostNodes, 3)), "none missing")

	// At most once: each token's uses match the nodes enrolled with it and
	// stay within its limit, indeterminate operations included.
	perToken := map[string]int{}
	for _, n := range nodes {
		perToken[n.TokenID]++
	}
	var twice []string
	for _, tok := range tokens {
		if tok.Uses > tok.MaxUses || perToken[tok.ID] != tok.Uses {
			twice = append(twice, fmt.Sprintf("%s(uses %d/%d, nodes %d)", tok.ID, tok.Uses, tok.MaxUses, perToken[tok.ID]))
		}
	}
	chk.Holds("tokens used at most once, one node per use", len(twice) == 0, harness.Short(twice, 3), "none")

	var unexplained []string
	for id, n := range nodes {
		if _, ok := before.nodes[id]; ok {
			continue
		}
		if _, ok := byID[n.TokenID]; !ok || n.Status != "enrolled" {
			unexplained = append(unexplained, id)
		}
	}
	chk.Holds("nodes without a workload token (lost or doubled)", len(unexplained) == 0, harness.Short(unexplained, 3), "none")
	checkFleetIdentity(t, ctx, chk, f, before)

	es, err := f.CP.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	offline := 0
	for _, c := range harness.StatusChanges(harness.After(es, before.lastEvent)) {
		if slices.Contains(fleet, c.NodeID) && c.To == "offline" {
			offline++
		}
	}
	chk.Equal("fleet nodes marked offline by the control plane's crash", offline, 0)
}

// checkFleetIdentity checks the fleet's own nodes came back as themselves.
func checkFleetIdentity(t testing.TB, ctx context.Context, chk *harness.Checker, f *harness.Fleet, before snapshot) {
	t.Helper()
	after, err := f.NodeMap(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var changed []string
	for _, e := range f.Edges() {
		b, a := before.nodes[e.NodeID], after[e.NodeID]
		if a.ID != b.ID || a.CertificateSerial != b.CertificateSerial || a.Name != e.Name {
			changed = append(changed, e.Name)
		}
	}
	chk.Holds("fleet nodes with the same ID and certificate", len(changed) == 0, "changed: "+harness.Short(changed, 5), "none changed")
}

// TestKillEdge kills an edge with SIGKILL (no goodbye) and restarts it on
// the same state.
func TestKillEdge(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: 3, HeartbeatInterval: heartbeat, OfflineAfter: offlineAfter})
	o := f.Opts
	chk := suite.Checker(t, "kill-edge")
	e := f.Edges()[0]
	before := takeSnapshot(t, ctx, f)

	killedAt := time.Now()
	if err := e.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	f.Notef("kill -9 of %s", e.Name)
	_, detected := waitEach(t, ctx, f, before.lastEvent, "offline", killedAt, detectBound(o)+10*time.Second, []*harness.Edge{e})
	chk.Within("offline after kill -9", detected, detectBound(o))
	chk.AtLeastDuration("offline after kill -9 (not before the threshold)", detected, detectFloor(o))
	n, err := f.CP.Node(ctx, e.NodeID)
	if err != nil {
		t.Fatal(err)
	}
	chk.Holds("offline reason is not a goodbye (none was said)", n.StatusReason != "shutdown", n.StatusReason, "not shutdown")

	restartAt := time.Now()
	if err := e.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	f.Notef("restarted %s on the same state", e.Name)
	_, back := waitEach(t, ctx, f, before.lastEvent, "online", restartAt, edgeBack()+10*time.Second, []*harness.Edge{e})
	chk.Within("online after the restart", back, edgeBack())
	res, err := e.Command(ctx, "status")
	if err != nil {
		t.Fatal(err)
	}
	chk.Holds("edge status names the same node", res.Code == 0 && strings.Contains(res.Stdout, e.NodeID), fmt.Sprintf("exit %d: %s", res.Code, firstLine(res.Stdout+res.Stderr)), "node "+e.NodeID)
	changes := f.WaitQuiet(t, ctx, before.lastEvent, 2*o.HeartbeatInterval, 30*time.Second, harness.NodeIDs(f.Edges())...)
	checkSameFleet(t, ctx, chk, f, before)
	others := 0
	for _, c := range changes {
		if c.NodeID != e.NodeID {
			others++
		}
	}
	chk.Equal("status changes of the other nodes", others, 0)
}

// TestRestartMany restarts the control plane gracefully under a larger
// fleet and checks how the edges come back: not before their DISCONNECT
// hint, spread over its window, no faster than the pacing allows (here
// 8/s, bursts of 2, scaled down from the defaults of 1000/s and 100 so ten
// edges are a crowd), and all of them within the bound.
func TestRestartMany(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	const size = 10
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: size, HeartbeatInterval: heartbeat, OfflineAfter: offlineAfter,
		RegistrationRate: 8, RegistrationBurst: 2})
	o := f.Opts
	chk := suite.Checker(t, "restart-many")
	fleet := harness.NodeIDs(f.Edges())
	before := takeSnapshot(t, ctx, f)
	nodes := len(before.nodes) // what the control plane spreads its hints by

	stopAt := time.Now()
	if err := f.CP.Stop(ctx, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	f.Notef("control plane stopped (SIGTERM) in %s", time.Since(stopAt).Round(time.Millisecond))
	startAt := time.Now()
	f.CP.Start(t, ctx)
	f.Notef("control plane started again")
	bound := onlineAfterRestart(o, size, shutdownHintMax(nodes))
	changes := f.WaitQuiet(t, ctx, before.lastEvent, 2*o.HeartbeatInterval, bound+20*time.Second, fleet...)

	// The restart is the events that put every node in unknown (on the
	// control plane's clock, which is the host's); then each node's return.
	var restart time.Time
	var back []time.Time
	for _, c := range changes {
		switch {
		case c.To == "unknown" && restart.IsZero():
			restart = c.Time
		case c.From == "unknown" && c.To == "online":
			back = append(back, c.Time)
		}
	}
	if restart.IsZero() || len(back) == 0 {
		t.Fatalf("no restart seen in the status changes: %+v", changes)
	}
	sort.Slice(back, func(i, j int) bool { return back[i].Before(back[j]) })
	offsets := make([]string, len(back))
	for i, b := range back {
		offsets[i] = b.Sub(stopAt).Round(10 * time.Millisecond).String()
	}
	spread := back[len(back)-1].Sub(back[0])
	t.Logf("reconnects after the SIGTERM: %s (serving again after %s)", strings.Join(offsets, " "), restart.Sub(stopAt).Round(10*time.Millisecond))
	chk.Equal("nodes back from unknown to online", len(back), size)
	chk.Within("control plane serving after docker start (fleet loaded)", restart.Sub(startAt), processStart)
	chk.Within("last reconnect after docker start", back[len(back)-1].Sub(startAt), bound)
	// Every edge waits its hint (2s and up, from the DISCONNECT, which
	// comes after the SIGTERM), however soon the control plane is back.
	chk.AtLeastDuration("first reconnect after the SIGTERM (no edge before its hint)", back[0].Sub(stopAt), restartFloor)
	servingInTime := restart.Before(stopAt.Add(restartFloor))
	floorWhy := "pacing"
	if servingInTime {
		floorWhy = "pacing, and the hint's window"
	}
	chk.AtLeastDuration(fmt.Sprintf("reconnect spread, first to last of %d (p50 %s; floor from %s)", size, offsets[len(offsets)/2], floorWhy),
		spread, restartSpreadFloor(o, size, servingInTime))
	peak := 0
	for i := range back {
		j := i
		for j < len(back) && back[j].Sub(back[i]) < 100*time.Millisecond {
			j++
		}
		peak = max(peak, j-i)
	}
	chk.AtMost("reconnects in the busiest 100ms", peak, pacedAtMost(o, 100*time.Millisecond))
	// The bucket's promise for every window: no more than burst + rate × its width.
	worst, worstAt := math.MinInt, ""
	for i := range back {
		for j := i; j < len(back); j++ {
			if excess := (j - i + 1) - pacedAtMost(o, back[j].Sub(back[i])); excess > worst {
				worst, worstAt = excess, fmt.Sprintf("%d in %s (the bucket allows %d)", j-i+1, back[j].Sub(back[i]).Round(time.Millisecond), pacedAtMost(o, back[j].Sub(back[i])))
			}
		}
	}
	chk.Holds(fmt.Sprintf("reconnects no faster than the pacing (%g/s, bursts of %d) in any window", o.RegistrationRate, o.RegistrationBurst),
		worst <= 0, "tightest: "+worstAt, "<= burst + rate × window")
	offline := 0
	for _, c := range changes {
		if c.To == "offline" {
			offline++
		}
	}
	chk.Equal("nodes marked offline by the restart", offline, 0)
	checkSameFleet(t, ctx, chk, f, before)
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
