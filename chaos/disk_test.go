package chaos

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/testcontainers/testcontainers-go"

	"github.com/llorch/llorch/e2e/harness"
)

// TestDiskFull fills the control plane's data volume (a size-limited tmpfs)
// while it runs: writes must fail with a clear error, nothing may be
// corrupted, liveness goes on, the status writer fails and retries
// (llorch_store_write_errors_total), and once space is freed it recovers
// and writes every status change it held, in order.
func TestDiskFull(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: 2, HeartbeatInterval: heartbeat, OfflineAfter: offlineAfter, DataTmpfsSize: "16m"})
	chk := suite.Checker(t, "disk-full")
	edges := f.Edges()
	const data = "/data" // the control plane's data volume, in the filler
	filler, err := f.Sidecar(ctx, "filler", []string{"sleep"}, testcontainers.WithMounts(testcontainers.VolumeMount(f.DataVolume, data)))
	if err != nil {
		t.Fatal(err)
	}
	var acked []string
	for i := range 3 {
		_, id, err := f.CP.CreateToken(ctx, fmt.Sprintf("before-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		acked = append(acked, id)
	}

	res, err := suite.Exec(ctx, filler.GetContainerID(), harness.TestkitBin, "fill", data+"/filler")
	if err != nil || res.Code != 0 {
		t.Fatalf("fill the data volume: %v %s", err, res)
	}
	f.Notef("data volume full: %s", strings.TrimSpace(res.Stdout))

	// SQLite reuses WAL space it already has, so the first writes may still
	// fit: write until one does not.
	var failed harness.ExecResult
	attempts := 0
	for ; attempts < 300; attempts++ {
		res, err := f.CP.Admin(ctx, "token", "create", "--name", fmt.Sprintf("full-%d", attempts))
		if err != nil {
			t.Fatal(err)
		}
		if res.Code != 0 {
			failed = res
			break
		}
		id, err := harness.TokenID(strings.TrimSpace(res.Stdout))
		if err != nil {
			t.Fatal(err)
		}
		acked = append(acked, id)
	}
	f.Notef("first failed write after %d more tokens: %s", attempts, failed)
	stderr := strings.TrimSpace(failed.Stderr)
	chk.Holds("a write on a full disk fails", failed.Code != 0, fmt.Sprintf("exit %d after %d writes", failed.Code, attempts), "exit != 0")
	chk.Holds("its error is one clear line (says the disk is full)", failed.Code == 1 && !strings.Contains(stderr, "\n") && strings.Contains(strings.ToLower(stderr), "full"), fmt.Sprintf("%q", stderr), "one line, mentions full")

	// Liveness lives in memory: the fleet stays online, and reads work.
	up, seen, err := f.StatusIs("online", harness.NodeIDs(edges)...)(ctx)
	chk.Holds("fleet online while the disk is full", err == nil && up, orErr(seen, err), "all online")

	// Status changes while the disk is full: edge-2 says goodbye and comes
	// back. Both moves are seen at once (in memory); the status writer must
	// fail, retry, and write them once there is room, in order.
	mark := takeSnapshot(t, ctx, f).lastEvent
	mBefore, err := f.CP.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mBeforeAt := time.Now()
	if err := edges[1].Stop(ctx); err != nil {
		t.Fatal(err)
	}
	f.WaitStatus(t, ctx, "offline", 5*time.Second, edges[1].NodeID)
	if err := edges[1].Restart(ctx); err != nil {
		t.Fatal(err)
	}
	f.WaitStatus(t, ctx, "online", edgeBack()+5*time.Second, edges[1].NodeID)
	f.Notef("%s stopped and started again while the disk is full", edges[1].Name)
	// The last-seen flushes fail on a full disk too (one write error per
	// flush interval); what is beyond them is the status writer's: its
	// first try and at least one retry.
	const writeErrors = "llorch_store_write_errors_total"
	var beyond int
	var mFull harness.Metrics
	_, err = harness.Until(ctx, 2*lastSeenFlush, func(ctx context.Context) (bool, string, error) {
		m, err := f.CP.Metrics(ctx)
		if err != nil {
			return false, "", err
		}
		mFull = m
		errs := int(m.Sum(writeErrors) - mBefore.Sum(writeErrors))
		beyond = errs - flushErrorsAtMost(time.Since(mBeforeAt))
		return beyond >= 2, fmt.Sprintf("%d write errors, %d beyond the flushes", errs, beyond), nil
	})
	if err != nil {
		chk.Missed("status writes failed and were retried while the disk was full (write errors beyond the last-seen flushes)", err.Error(), ">= 2")
	} else {
		chk.AtLeast("status writes failed and were retried while the disk was full (write errors beyond the last-seen flushes)", beyond, 2)
	}
	const transitions = "llorch_node_transitions_total"
	queued := int(mFull.Sum(transitions) - mBefore.Sum(transitions))
	chk.AtLeast("status changes made while the disk was full", queued, 2)

	freeAt := time.Now()
	if res, err := suite.Exec(ctx, filler.GetContainerID(), harness.TestkitBin, "rm", data+"/filler"); err != nil || res.Code != 0 {
		t.Fatalf("free the data volume: %v %s", err, res)
	}
	freedAt := time.Now()
	f.Notef("space freed")
	var recovered time.Duration
	recovered, err = harness.Until(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
		res, err := f.CP.Admin(ctx, "token", "create", "--name", "after")
		if err != nil {
			return false, "", err
		}
		if res.Code == 0 {
			id, err := harness.TokenID(strings.TrimSpace(res.Stdout))
			acked = append(acked, id)
			return err == nil, "", err
		}
		return false, res.String(), nil
	})
	// The first write after freeing goes through: one poll, and slack.
	if err != nil {
		chk.Missed("writes succeed again after space is freed", err.Error(), "<= "+(harness.PollEvery+loadSlack).String())
	} else {
		chk.Within("writes succeed again after space is freed", recovered, harness.PollEvery+loadSlack)
	}
	// Each change is recorded with the time it was written: after the
	// space came back (the writer retries with backoff up to 5s), in the
	// order it was made.
	var moves []harness.StatusChange
	_, err = harness.Until(ctx, goodbyeWritten()+10*time.Second, func(ctx context.Context) (bool, string, error) {
		es, err := f.CP.Events(ctx, edges[1].NodeID)
		if err != nil {
			return false, "", err
		}
		moves = harness.StatusChanges(harness.After(es, mark))
		return len(moves) >= 2, fmt.Sprintf("%d status events", len(moves)), nil
	})
	var order []string
	var early []string
	var last time.Time
	for _, c := range moves {
		order = append(order, c.From+"->"+c.To)
		if c.Time.Before(freeAt) {
			early = append(early, c.From+"->"+c.To)
		}
		last = c.Time
	}
	if err != nil {
		chk.Missed("the goodbye and the return made while the disk was full are recorded", err.Error(), "<= "+goodbyeWritten().String()+" after freeing")
	} else {
		chk.Within("the goodbye and the return made while the disk was full are recorded", last.Sub(freedAt), goodbyeWritten())
	}
	chk.Holds("status changes of the stopped edge, in order", strings.Join(order, " ") == "online->offline offline->online", strings.Join(order, " "), "online->offline offline->online")
	chk.Holds("status changes written while the disk was still full (all were queued)", len(early) == 0, harness.Short(early, 2), "none")
	// Nothing lost: one status event for every move the registry made
	// since the mark (a summary of coalesced moves counts for them all).
	mAfter, err := f.CP.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	es, err := f.CP.Events(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	recorded := 0
	for _, c := range harness.StatusChanges(harness.After(es, mark)) {
		recorded += max(1, c.Coalesced)
	}
	chk.Equal("status events recorded for the moves made since the fault (nothing lost)", recorded, int(mAfter.Sum(transitions)-mBefore.Sum(transitions)))

	tokens, err := f.CP.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, tok := range tokens {
		have[tok.ID] = true
	}
	var missing []string
	for _, id := range acked {
		if !have[id] {
			missing = append(missing, id)
		}
	}
	chk.Holds("acknowledged tokens present", len(missing) == 0, fmt.Sprintf("%d of %d missing %s", len(missing), len(acked), harness.Short(missing, 3)), "none missing")
	// Fleet tokens, plus the acknowledged ones: a write that failed left nothing.
	chk.Equal("tokens in the store (failed writes left nothing)", len(tokens), len(edges)+len(acked))
	f.WaitStatus(t, ctx, "online", 10*time.Second, harness.NodeIDs(edges)...)

	// Stop it cleanly (the volume stays, held by the filler) and check the file.
	if err := f.CP.Stop(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	db, err := suite.IntegrityCheck(ctx, filler.GetContainerID(), data+"/llorch.db", filepath.Join(t.TempDir(), "db"))
	if err != nil {
		t.Fatal(err)
	}
	chk.Holds("PRAGMA integrity_check after the disk was full", db.Integrity == "ok", db.Integrity, "ok")
	f.CP.Start(t, ctx)
	after, err := f.CP.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	chk.Equal("tokens after a restart on the same data", len(after), len(tokens))
}
