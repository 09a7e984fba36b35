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
// corrupted, liveness goes on, and it recovers once space is freed.
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
	// A status change while the disk is full: the goodbye is seen at once
	// and must be written once there is room.
	if err := edges[1].Stop(ctx); err != nil {
		t.Fatal(err)
	}
	f.WaitStatus(t, ctx, "offline", 5*time.Second, edges[1].NodeID)

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
	if err != nil {
		chk.Missed("writes succeed again after space is freed", err.Error(), "<= 5s")
	} else {
		chk.Within("writes succeed again after space is freed", recovered, 5*time.Second)
	}
	// Recorded with the time it was written: after the space came back
	// (the writer retries with backoff up to 5s), or before if it fit.
	var written time.Time
	_, err = harness.Until(ctx, 30*time.Second, func(ctx context.Context) (bool, string, error) {
		es, err := f.CP.Events(ctx, edges[1].NodeID)
		if err != nil {
			return false, "", err
		}
		c, ok := harness.FirstTo(harness.StatusChanges(es), edges[1].NodeID, "offline")
		written = c.Time
		return ok, fmt.Sprintf("%d events", len(es)), nil
	})
	if err != nil {
		chk.Missed("the goodbye made while the disk was full is recorded", err.Error(), "<= 10s after freeing")
	} else {
		chk.Within("the goodbye made while the disk was full is recorded", written.Sub(freedAt), 10*time.Second)
	}

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
	f.WaitStatus(t, ctx, "online", 10*time.Second, edges[0].NodeID)

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
