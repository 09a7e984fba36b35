package store_test

import (
	"context"
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
