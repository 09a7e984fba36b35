package registry_test

import (
	"testing"
	"time"

	"github.com/llorch/llorch/control/registry"
	"github.com/llorch/llorch/internal/clock"
)

func TestAdmission(t *testing.T) {
	clk := clock.NewFake(time.Now())
	reg := registry.New(registry.Config{Clock: clk, Admission: registry.Admission{Rate: 10, Burst: 3}})
	for i := range 3 {
		if ok, _ := reg.Admit(); !ok {
			t.Fatalf("session %d of the burst refused", i)
		}
	}
	var hints []time.Duration
	for range 20 {
		ok, wait := reg.Admit()
		if ok {
			t.Fatal("admitted past the burst with no time passing")
		}
		if wait < 100*time.Millisecond || wait > 2*time.Second+100*time.Millisecond {
			t.Fatalf("retry hint %s, want between 1/rate and the 2s the 20 refused need", wait)
		}
		hints = append(hints, wait)
	}
	lo, hi := hints[0], hints[0]
	for _, h := range hints {
		lo, hi = min(lo, h), max(hi, h)
	}
	if hi-lo < 200*time.Millisecond {
		t.Errorf("hints %s..%s are not spread out", lo, hi)
	}
	clk.Advance(100 * time.Millisecond) // one token at 10/s
	if ok, _ := reg.Admit(); !ok {
		t.Fatal("refused after a token refilled")
	}
	if ok, _ := reg.Admit(); ok {
		t.Fatal("admitted two on one token")
	}
	unpaced := registry.New(registry.Config{Clock: clk})
	for range 1000 {
		if ok, _ := unpaced.Admit(); !ok {
			t.Fatal("the zero Admission refused a session")
		}
	}
}
