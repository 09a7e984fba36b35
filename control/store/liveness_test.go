package store_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/llorch/llorch/control"
)

func TestSetNodeStatuses(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	for _, id := range []string{"a", "b", "gone"} {
		mustEnroll(t, s, newNode(id))
	}
	if _, err := s.RemoveNode(ctx, "gone", "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	err := s.SetNodeStatuses(ctx, []control.StatusChange{
		{NodeID: "a", Status: control.StatusOnline, Reason: "registered"},
		{NodeID: "b", Status: control.StatusOnline, Reason: "registered"},
		{NodeID: "a", Status: control.StatusOffline, Reason: "shutdown"},
		{NodeID: "gone", Status: control.StatusOnline, Reason: "late"}, // skipped: removed
	}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if n := mustGetNode(t, s, "a"); n.Status != control.StatusOffline || n.StatusReason != "shutdown" {
		t.Errorf("a = %s (%s), want offline (shutdown)", n.Status, n.StatusReason)
	}
	if n := mustGetNode(t, s, "gone"); n.Status != control.StatusRemoved {
		t.Errorf("removed node changed to %s", n.Status)
	}
	if got := countKind(mustListEvents(t, s, "a"), control.EventStatus); got != 2 {
		t.Errorf("a has %d status events, want 2", got)
	}
	// A missing node fails the whole batch: nothing written.
	err = s.SetNodeStatuses(ctx, []control.StatusChange{
		{NodeID: "b", Status: control.StatusOffline, Reason: "x"},
		{NodeID: "nope", Status: control.StatusOnline, Reason: "x"},
	}, time.Now())
	wantErr(t, err, control.ErrNotFound)
	if n := mustGetNode(t, s, "b"); n.Status != control.StatusOnline {
		t.Errorf("b = %s after a failed batch, want online", n.Status)
	}
}

func TestSetDraining(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	mustEnroll(t, s, newNode("a"))
	for range 2 { // the second is a no-op
		n, err := s.SetDraining(ctx, "a", true, "maintenance", time.Now())
		if err != nil || !n.Draining {
			t.Fatalf("SetDraining = %+v, %v", n, err)
		}
	}
	if got := countKind(mustListEvents(t, s, "a"), control.EventDrained); got != 1 {
		t.Errorf("%d drained events, want 1", got)
	}
	if n, err := s.SetDraining(ctx, "a", false, "done", time.Now()); err != nil || n.Draining {
		t.Fatalf("undrain = %+v, %v", n, err)
	}
	_, err := s.SetDraining(ctx, "nope", true, "", time.Now())
	wantErr(t, err, control.ErrNotFound)
	s.RemoveNode(ctx, "a", "test", time.Now())
	_, err = s.SetDraining(ctx, "a", true, "", time.Now())
	wantErr(t, err, control.ErrNodeRemoved)
}

func TestUpdateLastSeen(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	mustEnroll(t, s, newNode("a"))
	t1 := time.Now().Truncate(time.Millisecond)
	if err := s.UpdateLastSeen(ctx, map[string]time.Time{"a": t1, "unknown": t1}); err != nil {
		t.Fatal(err)
	}
	if err := s.UpdateLastSeen(ctx, map[string]time.Time{"a": t1.Add(-time.Hour)}); err != nil { // older: ignored
		t.Fatal(err)
	}
	if got := mustGetNode(t, s, "a").LastSeen; !got.Equal(t1) {
		t.Errorf("last seen %v, want %v", got, t1)
	}
	if len(mustListEvents(t, s, "a")) != 1 { // only the enrollment
		t.Error("UpdateLastSeen recorded events")
	}
}

func TestListEventsAfter(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	mustEnroll(t, s, newNode("a"))
	mustEnroll(t, s, newNode("b"))
	all, err := s.ListEventsAfter(ctx, "", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(all); i++ {
		if all[i].ID <= all[i-1].ID {
			t.Fatalf("not oldest first: %v", all)
		}
	}
	rest, err := s.ListEventsAfter(ctx, "", all[0].ID, 0)
	if err != nil || len(rest) != len(all)-1 {
		t.Fatalf("after the first: %d events, %v; want %d", len(rest), err, len(all)-1)
	}
	onlyB, err := s.ListEventsAfter(ctx, "b", 0, 0)
	if err != nil || len(onlyB) != 1 || onlyB[0].NodeID != "b" {
		t.Fatalf("node b: %v, %v", onlyB, err)
	}
}

// Events past the retention go, and so do the oldest beyond the count;
// what is left is the newest. Both span several of the batches a prune
// deletes at a time.
func TestPruneEvents(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "llorch.db")
	s := openStore(t, path)
	mustEnroll(t, s, newNode("n1"))
	before, _ := s.CountEvents(ctx) // the token's and the enrollment's, at t0
	db := rawDB(t, path)
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 12_000; i++ {
		if _, err := tx.Exec(`INSERT INTO events (time, node_id, kind, reason) VALUES (?, 'n1', 'drained', 'x')`, t0.Add(time.Duration(i)*time.Second).UnixNano()); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	// Before t0 + 2,000.5 s: the first ones and 2,000 drains.
	n, err := s.PruneEvents(ctx, t0.Add(2000*time.Second+time.Second/2), 0)
	if err != nil || n != before+2000 {
		t.Fatalf("pruned %d (%v) by age, want %d", n, err, before+2000)
	}
	// Keep the newest 3,000 of the 10,000 left.
	if n, err = s.PruneEvents(ctx, t0, 3000); err != nil || n != 7000 {
		t.Fatalf("pruned %d (%v) by count, want 7000", n, err)
	}
	if c, _ := s.CountEvents(ctx); c != 3000 {
		t.Fatalf("%d events left, want 3000", c)
	}
	if es := mustListEvents(t, s, ""); !es[0].Time.Equal(t0.Add(12_000 * time.Second)) {
		t.Errorf("newest left %v", es[0].Time)
	}
	if n, _ := s.PruneEvents(ctx, t0, 3000); n != 0 {
		t.Errorf("pruning again deleted %d", n)
	}
}
