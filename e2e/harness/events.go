package harness

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"
)

// StatusChange is a status event: a node's move (Event.From, Event.To).
type StatusChange struct {
	Event
}

// StatusChanges picks the status events out of es.
func StatusChanges(es []Event) []StatusChange {
	var out []StatusChange
	for _, e := range es {
		if e.Kind == "status" {
			out = append(out, StatusChange{Event: e})
		}
	}
	return out
}

// After keeps the events recorded after the event with ID id.
func After(es []Event, id int64) []Event {
	var out []Event
	for _, e := range es {
		if e.ID > id {
			out = append(out, e)
		}
	}
	return out
}

// LastEventID is the ID of the newest event (0 when there is none).
func LastEventID(es []Event) int64 {
	var id int64
	for _, e := range es {
		id = max(id, e.ID)
	}
	return id
}

// CountKind counts the events of a kind.
func CountKind(es []Event, kind string) int {
	n := 0
	for _, e := range es {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

// FirstTo is the first status change of node to status to, if any.
func FirstTo(cs []StatusChange, node, to string) (StatusChange, bool) {
	for _, c := range cs {
		if c.NodeID == node && c.To == to {
			return c, true
		}
	}
	return StatusChange{}, false
}

// PerNode counts status changes per node.
func PerNode(cs []StatusChange) map[string]int {
	m := map[string]int{}
	for _, c := range cs {
		m[c.NodeID]++
	}
	return m
}

// Environment knobs for replays.
const (
	// EnvSeed is the run's random seed (LLORCH_CHAOS_SEED); unset, the run
	// draws one from the time and prints it.
	EnvSeed = "LLORCH_CHAOS_SEED"
	// EnvTask names the task that started the run (the Taskfile sets it),
	// so a failure can say how to repeat the whole run.
	EnvTask = "LLORCH_TEST_TASK"
)

var runSeed struct {
	once sync.Once
	seed uint64
	err  error
}

// RunSeed is the run's seed: LLORCH_CHAOS_SEED when set, else drawn from
// the time once per process, so every scenario of a run uses the same one
// and one variable repeats them all (or any one of them alone).
func RunSeed() (uint64, error) {
	runSeed.once.Do(func() {
		runSeed.seed = uint64(time.Now().UnixNano())
		if v := os.Getenv(EnvSeed); v != "" {
			runSeed.seed, runSeed.err = strconv.ParseUint(v, 10, 64)
			if runSeed.err != nil {
				runSeed.err = fmt.Errorf("%s=%q: %w", EnvSeed, v, runSeed.err)
			}
		}
	})
	return runSeed.seed, runSeed.err
}

// Seed returns the run's random seed (RunSeed) and a generator drawn from
// it alone, so a scenario makes the same choices whether it runs with the
// others or by itself; it is logged so that a run can be repeated.
func Seed(t testing.TB) (uint64, *rand.Rand) {
	t.Helper()
	seed, err := RunSeed()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("seed %d (%s=%d repeats this run's choices)", seed, EnvSeed, seed)
	return seed, rand.New(rand.NewPCG(seed, seed>>1|1))
}

// Hold keeps a fault in place for d. It is the fault's duration, chosen by
// the scenario, never a wait for a state (states are polled).
func Hold(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// WaitQuiet waits until every node in ids is online and no status event
// was recorded for quiet, and returns the status changes since event
// after. The quiet period makes late transitions (a flap) visible.
func (f *Fleet) WaitQuiet(t testing.TB, ctx context.Context, after int64, quiet, timeout time.Duration, ids ...string) []StatusChange {
	t.Helper()
	var changes []StatusChange
	WaitFor(t, ctx, fmt.Sprintf("the fleet online and quiet for %s", quiet), timeout, func(ctx context.Context) (bool, string, error) {
		online, seen, err := f.StatusIs("online", ids...)(ctx)
		if err != nil || !online {
			return false, seen, err
		}
		es, err := f.CP.Events(ctx, "")
		if err != nil {
			return false, "", err
		}
		changes = StatusChanges(After(es, after))
		if len(changes) > 0 {
			if last := changes[len(changes)-1].Time; time.Since(last) < quiet {
				return false, fmt.Sprintf("last status change %s ago", time.Since(last).Round(time.Millisecond)), nil
			}
		}
		return true, "", nil
	})
	return changes
}
