package pki

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/llorch/llorch/internal/clock"
)

func TestTokenDB(t *testing.T) {
	fake := clock.NewFake(time.Unix(1_700_000_000, 0))
	d := newTokenDB(fake, 3*time.Minute, 3)

	use := func(id string) bool {
		t.Helper()
		ok, err := d.UseToken(id, "token")
		if err != nil {
			t.Fatalf("UseToken(%s): %v", id, err)
		}
		return ok
	}
	if !use("a") {
		t.Fatal("first use of a refused")
	}
	if use("a") {
		t.Fatal("replay of a accepted")
	}
	fake.Advance(time.Minute)
	if !use("b") || !use("c") {
		t.Fatal("fresh tokens refused")
	}
	if _, err := d.UseToken("d", "token"); !errors.Is(err, errTooManyTokens) {
		t.Fatalf("UseToken when full = %v, want errTooManyTokens", err)
	}
	if use("a") {
		t.Fatal("replay of a accepted when full")
	}

	fake.Advance(2 * time.Minute) // a is forgotten, b and c are not
	if !use("d") {
		t.Fatal("d refused after a expired")
	}
	if use("b") {
		t.Fatal("replay of b accepted before it expired")
	}
	fake.Advance(time.Minute)
	if len(d.seen) != 3 || len(d.order) != 3 { // b, c, d (pruned on the last call)
		t.Errorf("held %d/%d, want 3", len(d.seen), len(d.order))
	}
	if !use("b") {
		t.Fatal("b refused after it expired")
	}
	if len(d.seen) != 2 { // d, b
		t.Errorf("held %d after pruning, want 2", len(d.seen))
	}
}

// BenchmarkTokenDB runs at the target rate, 500 tokens a second, so about
// 90 000 are held once the first three minutes have passed.
func BenchmarkTokenDB(b *testing.B) {
	fake := clock.NewFake(time.Unix(1_700_000_000, 0))
	d := newTokenDB(fake, 3*time.Minute, maxTokens)
	i := 0
	for b.Loop() {
		i++
		fake.Advance(2 * time.Millisecond)
		if _, err := d.UseToken(fmt.Sprint(i), ""); err != nil {
			b.Fatal(err)
		}
	}
}
