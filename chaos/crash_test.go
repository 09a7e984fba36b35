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
	Seq     int       `json:"seq"`
	Kind    string    `json:"kind"` // create, enroll, revoke
	Invoke  time.Time `json:"invoke"`
	Done    time.Time `json:"done"`
	Outcome string    `json:"outcome"`        // ok or info
	Name    string    `json:"name,omitempty"` // a create's token name
	TokenID string    `json:"token_id"`
	NodeID  string    `json:"node_id,omitempty"`
	Detail  string    `json:"detail,omitempty"`
}

// inFlightAt says whether o was under way at t: invoked before, not
// answered by then.
func (o op) inFlightAt(t time.Time) bool { return o.Invoke.Before(t) && o.Done.After(t) }

var workloadKinds = []string{"create", "enroll", "revoke"}

// workload runs one worker per kind at once, so that the three can be in
// flight together: one creates tokens and sets each aside for enrollment or
// revocation, one enrolls with those (from a sidecar holding the edge
// binary, each into a fresh state directory), one revokes the others. It
// records every operation, and what is in flight at any moment.
type workload struct {
	f        *harness.Fleet
	enroller string // sidecar container ID
	seed     uint64

	mu       sync.Mutex
	history  []op
	next     int               // sequence numbers, names, state directories
	toEnroll []string          // acknowledged, untouched token IDs set aside for enrollment
	toRevoke []string          // ... and for revocation
	secrets  map[string]string // token ID -> token
	inflight map[int]op        // started, not answered
}

func newWorkload(f *harness.Fleet, enroller string, seed uint64) *workload {
	return &workload{f: f, enroller: enroller, seed: seed, secrets: map[string]string{}, inflight: map[int]op{}}
}

// stock creates tokens until each pool holds n, before the workers start,
// so that enrollments and revocations have work from the first moment.
func (w *workload) stock(ctx context.Context, n int) error {
	for {
		w.mu.Lock()
		ready := len(w.toEnroll) >= n && len(w.toRevoke) >= n
		w.mu.Unlock()
		if ready {
			return nil
		}
		if o := w.create(ctx, nil); o.Outcome != "ok" {
			return fmt.Errorf("stock the workload: %s", o.Detail)
		}
	}
}

// run runs the three workers until stop is closed and they have finished
// what they started.
func (w *workload) run(ctx context.Context, stop <-chan struct{}) {
	var wg sync.WaitGroup
	for i, kind := range workloadKinds {
		rng := rand.New(rand.NewPCG(w.seed, uint64(i+1)))
		wg.Go(func() {
			idle := time.NewTicker(10 * time.Millisecond)
			defer idle.Stop()
			for {
				select {
				case <-stop:
					return
				default:
				}
				var o op
				switch kind {
				case "create":
					o = w.create(ctx, rng)
				case "enroll":
					o = w.enroll(ctx, rng)
				case "revoke":
					o = w.revoke(ctx, rng)
				}
				if o.Kind == "" { // nothing to do yet: its pool is empty
					select {
					case <-stop:
						return
					case <-idle.C:
					}
				}
			}
		})
	}
	wg.Wait()
}

// begin records an operation as in flight.
func (w *workload) begin(kind string) op {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.next++
	o := op{Seq: w.next, Kind: kind, Invoke: time.Now(), Outcome: "info"}
	w.inflight[o.Seq] = o
	return o
}

// end records an operation's answer.
func (w *workload) end(o op) op {
	o.Done = time.Now()
	w.mu.Lock()
	delete(w.inflight, o.Seq)
	w.history = append(w.history, o)
	w.mu.Unlock()
	return o
}

// take removes a token ID from a pool, at random; "" when it is empty.
func (w *workload) take(pool *[]string, rng *rand.Rand) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(*pool) == 0 {
		return ""
	}
	i := rng.IntN(len(*pool))
	id := (*pool)[i]
	*pool = slices.Delete(*pool, i, i+1)
	return id
}

// allInFlight reports whether every kind has an operation in flight that
// started at least minAge ago (so that it has left the harness).
func (w *workload) allInFlight(minAge time.Duration) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	kinds := map[string]bool{}
	for _, o := range w.inflight {
		if time.Since(o.Invoke) >= minAge {
			kinds[o.Kind] = true
		}
	}
	return len(kinds) == len(workloadKinds)
}

func (w *workload) create(ctx context.Context, rng *rand.Rand) op {
	o := w.begin("create")
	o.Name = fmt.Sprintf("wl-%d", o.Seq)
	token, id, err := w.f.CP.CreateToken(ctx, o.Name)
	if err != nil {
		o.Detail = err.Error()
		return w.end(o)
	}
	o.Outcome, o.TokenID = "ok", id
	w.mu.Lock()
	w.secrets[id] = token
	// Keep the pools level; revocations are quicker, so they draw more.
	switch {
	case len(w.toEnroll) < len(w.toRevoke):
		w.toEnroll = append(w.toEnroll, id)
	case len(w.toEnroll) > len(w.toRevoke) || rng == nil || rng.IntN(2) == 0:
		w.toRevoke = append(w.toRevoke, id)
	default:
		w.toEnroll = append(w.toEnroll, id)
	}
	w.mu.Unlock()
	return w.end(o)
}

func (w *workload) revoke(ctx context.Context, rng *rand.Rand) op {
	id := w.take(&w.toRevoke, rng)
	if id == "" {
		return op{}
	}
	o := w.begin("revoke")
	o.TokenID = id
	if _, err := w.f.CP.AdminOK(ctx, "token", "revoke", id); err != nil {
		o.Detail = err.Error()
	} else {
		o.Outcome = "ok"
	}
	return w.end(o)
}

func (w *workload) enroll(ctx context.Context, rng *rand.Rand) op {
	id := w.take(&w.toEnroll, rng)
	if id == "" {
		return op{}
	}
	w.mu.Lock()
	token := w.secrets[id]
	w.mu.Unlock()
	o := w.begin("enroll")
	o.TokenID = id
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	res, err := w.f.Suite().ExecEnv(ctx, w.enroller, []string{"LLORCH_ENROLL_TOKEN=" + token},
		harness.TestkitBin, "run", "-timeout", "10s", "--",
		harness.EdgeBin, "enroll", "--control", harness.ControlURL, "--state", fmt.Sprintf("/var/lib/wl/%d", o.Seq))
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
	return w.end(o)
}

// maxKills is how many times the scenario kills the control plane to land
// one kill with a creation, an enrollment and a revocation in flight.
const maxKills = 3

// TestKillControlPlane kills the control plane with SIGKILL while edges
// heartbeat and a token creation, an enrollment and a revocation are in
// flight (checked from the history, and the kill tried again when one
// finished first), checks the database it left, restarts it and checks that
// nothing acknowledged was lost, nothing happened twice, and nothing was
// left half done.
func TestKillControlPlane(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	seed, rng := harness.Seed(t)
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: 3, HeartbeatInterval: heartbeat, OfflineAfter: offlineAfter})
	o := f.Opts
	chk := suite.Checker(t, "kill-control-plane")
	fleet := harness.NodeIDs(f.Edges())
	before := takeSnapshot(t, ctx, f)
	enroller, err := f.Sidecar(ctx, "enroller", []string{"sleep"}, tcnetwork.WithNetwork(nil, f.Site))
	if err != nil {
		t.Fatal(err)
	}

	w := newWorkload(f, enroller.GetContainerID(), seed)
	var (
		killedAt, startAt time.Time
		mark              int64 // the last event before the last kill
		dbs               []harness.DBCheck
		inFlight          map[string][]op // at the last kill, by kind
		kills             int
	)
	for kills < maxKills {
		kills++
		if err := w.stock(ctx, 4); err != nil {
			t.Fatal(err)
		}
		es, err := f.CP.Events(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		mark = harness.LastEventID(es)
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() { defer close(done); w.run(ctx, stop) }()
		// A while into the workload, at the first moment each kind has an
		// operation that has been under way for minAge.
		hold := 500*time.Millisecond + time.Duration(rng.Int64N(int64(1500*time.Millisecond)))
		minAge := 20*time.Millisecond + time.Duration(rng.Int64N(int64(60*time.Millisecond)))
		if err := harness.Hold(ctx, hold); err != nil {
			t.Fatal(err)
		}
		waited := pollFor(ctx, 10*time.Second, 2*time.Millisecond, func() bool { return w.allInFlight(minAge) })
		killedAt = time.Now()
		close(stop) // the workers finish what is in flight, and start nothing more
		if err := f.CP.Kill(ctx); err != nil {
			t.Fatal(err)
		}
		<-done

		w.mu.Lock()
		inFlight = map[string][]op{}
		for _, h := range w.history {
			if h.inFlightAt(killedAt) {
				inFlight[h.Kind] = append(inFlight[h.Kind], h)
			}
		}
		w.mu.Unlock()
		f.Notef("kill -9 %d of the control plane %s into the workload (+%s waiting for all three kinds %s in flight): in flight %s",
			kills, hold.Round(time.Millisecond), waited.Round(time.Millisecond), minAge.Round(time.Millisecond), describeInFlight(inFlight))

		db, err := suite.IntegrityCheck(ctx, f.CP.ID, harness.ControlDB, filepath.Join(t.TempDir(), fmt.Sprintf("db-%d", kills)))
		if err != nil {
			t.Fatalf("check the database the killed control plane left: %v", err)
		}
		dbs = append(dbs, db)

		startAt = time.Now()
		readyAt := f.CP.Start(t, ctx)
		f.Notef("control plane restarted after %s down", readyAt.Sub(killedAt).Round(time.Millisecond))
		if len(inFlight) == len(workloadKinds) {
			break
		}
		// One finished first: the fleet back, then try again.
		f.WaitStatus(t, ctx, "online", onlineAfterRestart(o, len(fleet), 0)+10*time.Second, fleet...)
	}
	history, _ := json.MarshalIndent(w.history, "", "  ")
	f.WriteArtifact("history.json", history)

	chk.AtMost("kills -9 until one landed with a create, an enroll and a revoke in flight", kills, maxKills)
	for _, kind := range workloadKinds {
		chk.AtLeast(fmt.Sprintf("%s operations in flight at the kill (invoked before it, answered after)", kind), len(inFlight[kind]), 1)
	}
	var notOK []string
	for i, db := range dbs {
		if db.Integrity != "ok" {
			notOK = append(notOK, fmt.Sprintf("kill %d: %s", i+1, db.Integrity))
		}
	}
	integrity := "ok"
	if len(notOK) > 0 {
		integrity = harness.Short(notOK, 2)
	}
	chk.Holds(fmt.Sprintf("PRAGMA integrity_check of the database left by each kill -9 (%d)", len(dbs)), len(notOK) == 0, integrity, "ok")
	var half []string
	for i, db := range dbs {
		for _, h := range halfStates(db) {
			half = append(half, fmt.Sprintf("kill %d: %s", i+1, h))
		}
	}
	chk.Holds("half-done writes in the database left by kill -9 (uses without nodes, nodes without events, events without rows)", len(half) == 0, harness.Short(half, 3), "none")

	es, err := f.CP.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if restarted, ok := firstTo(harness.StatusChanges(harness.After(es, mark)), "unknown"); ok {
		chk.Within("control plane serving after docker start (fleet loaded)", restarted.Time.Sub(startAt), processStart)
	} else {
		chk.Missed("control plane serving after docker start (fleet loaded)", "no restart events", "<= "+processStart.String())
	}
	bound := onlineAfterRestart(o, len(fleet), 0)
	_, back := waitEach(t, ctx, f, mark, "online", startAt, bound+10*time.Second, f.Edges())
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
	byID, byName := map[string]harness.Token{}, map[string]harness.Token{}
	for _, tok := range tokens {
		byID[tok.ID], byName[tok.Name] = tok, tok
	}
	perToken := map[string]int{}
	for _, n := range nodes {
		perToken[n.TokenID]++
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

	// Indeterminate operations happened entirely or not at all: a token
	// created is whole and untouched (nobody else had its secret), an
	// enrollment made exactly the node its use counts, a revocation left
	// the token unspent, revoked or not.
	happened := map[string]int{}
	var halfDone []string
	for _, o := range w.history {
		if o.Outcome == "ok" {
			continue
		}
		switch o.Kind {
		case "create":
			if tok, ok := byName[o.Name]; ok {
				happened[o.Kind]++
				if tok.Uses != 0 || tok.Revoked || tok.MaxUses != 1 {
					halfDone = append(halfDone, fmt.Sprintf("create %s: uses %d/%d revoked %v", o.Name, tok.Uses, tok.MaxUses, tok.Revoked))
				}
			}
		case "enroll":
			tok := byID[o.TokenID]
			if tok.Uses > 0 {
				happened[o.Kind]++
			}
			if tok.Uses > 1 || perToken[o.TokenID] != tok.Uses {
				halfDone = append(halfDone, fmt.Sprintf("enroll %s: uses %d, nodes %d", o.TokenID, tok.Uses, perToken[o.TokenID]))
			}
		case "revoke":
			tok, ok := byID[o.TokenID]
			if tok.Revoked {
				happened[o.Kind]++
			}
			if !ok || tok.Uses != 0 {
				halfDone = append(halfDone, fmt.Sprintf("revoke %s: present %v uses %d", o.TokenID, ok, tok.Uses))
			}
		}
	}
	chk.Holds(fmt.Sprintf("indeterminate operations all or nothing (create %d/%d, enroll %d/%d, revoke %d/%d happened)",
		happened["create"], counts["create/info"], happened["enroll"], counts["enroll/info"], happened["revoke"], counts["revoke/info"]),
		len(halfDone) == 0, harness.Short(halfDone, 3), "none half done")

	// At most once: each token's uses match the nodes enrolled with it and
	// stay within its limit, indeterminate operations included.
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

	offline := 0
	for _, c := range harness.StatusChanges(harness.After(es, before.lastEvent)) {
		if slices.Contains(fleet, c.NodeID) && c.To == "offline" {
			offline++
		}
	}
	chk.Equal("fleet nodes marked offline by the control plane's crash", offline, 0)
}

// halfStates lists what a crash left half written in a database file: a
// token's uses that do not match the nodes made with it (or exceed its
// limit), a node without its enrolled event, tokens created or revoked
// without their events (or events without them).
func halfStates(db harness.DBCheck) []string {
	var out []string
	perToken := map[string]int{}
	for _, n := range db.NodeRows {
		perToken[n.TokenID]++
		if n.EnrolledEvents != 1 {
			out = append(out, fmt.Sprintf("node %s with %d enrolled events", n.ID, n.EnrolledEvents))
		}
	}
	revoked := 0
	for _, tok := range db.TokenRows {
		if tok.Uses > tok.MaxUses || tok.Uses != perToken[tok.ID] {
			out = append(out, fmt.Sprintf("token %s uses %d/%d with %d nodes", tok.ID, tok.Uses, tok.MaxUses, perToken[tok.ID]))
		}
		if tok.Revoked {
			revoked++
		}
	}
	if n := db.EventKinds["token_created"]; n != len(db.TokenRows) {
		out = append(out, fmt.Sprintf("%d token_created events for %d tokens", n, len(db.TokenRows)))
	}
	if n := db.EventKinds["token_revoked"]; n != revoked {
		out = append(out, fmt.Sprintf("%d token_revoked events for %d revoked tokens", n, revoked))
	}
	return out
}

func describeInFlight(m map[string][]op) string {
	var parts []string
	for _, kind := range workloadKinds {
		var seqs []string
		for _, o := range m[kind] {
			seqs = append(seqs, fmt.Sprintf("#%d %s", o.Seq, o.Outcome))
		}
		parts = append(parts, fmt.Sprintf("%s [%s]", kind, strings.Join(seqs, ", ")))
	}
	return strings.Join(parts, ", ")
}

// pollFor checks cond every `every` until it holds or timeout passes, and
// returns how long that took (a state of the harness itself, too quick for
// harness.Until's pace).
func pollFor(ctx context.Context, timeout, every time.Duration, cond func() bool) time.Duration {
	start := time.Now()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for !cond() && time.Since(start) < timeout {
		select {
		case <-ctx.Done():
			return time.Since(start)
		case <-tick.C:
		}
	}
	return time.Since(start)
}

// firstTo is the first status change of any node to status to.
func firstTo(cs []harness.StatusChange, to string) (harness.StatusChange, bool) {
	for _, c := range cs {
		if c.To == to {
			return c, true
		}
	}
	return harness.StatusChange{}, false
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
