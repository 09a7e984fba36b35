package harness

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestStatusChanges(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	es := []Event{
		{ID: 1, Time: t0, NodeID: "a", Kind: "enrolled", Reason: "token t1"},
		{ID: 2, Time: t0, NodeID: "a", Kind: "status", From: "enrolled", To: "online", Reason: "registered"},
		{ID: 3, Time: t0, NodeID: "a", Kind: "status", From: "online", To: "offline", Reason: "no heartbeat for 3s"},
		{ID: 4, Time: t0, NodeID: "b", Kind: "status", From: "online", To: "offline", Reason: "shutdown"},
		{ID: 5, Time: t0, NodeID: "a", Kind: "drained", Reason: "not a transition"},
	}
	cs := StatusChanges(After(es, 2))
	if len(cs) != 2 {
		t.Fatalf("got %d changes after event 2, want 2: %+v", len(cs), cs)
	}
	if c := cs[0]; c.NodeID != "a" || c.From != "online" || c.To != "offline" || c.Reason != "no heartbeat for 3s" {
		t.Errorf("first change = %+v", c)
	}
	if c, ok := FirstTo(cs, "b", "offline"); !ok || c.Reason != "shutdown" {
		t.Errorf("FirstTo(b, offline) = %+v, %v", c, ok)
	}
	if _, ok := FirstTo(cs, "b", "online"); ok {
		t.Error("FirstTo found a change that is not there")
	}
	if got := PerNode(cs); got["a"] != 1 || got["b"] != 1 {
		t.Errorf("PerNode = %v", got)
	}
	if LastEventID(es) != 5 || CountKind(es, "enrolled") != 1 {
		t.Errorf("LastEventID %d, CountKind %d", LastEventID(es), CountKind(es, "enrolled"))
	}
}

func TestTokenID(t *testing.T) {
	for _, tc := range []struct {
		name, token, want string
		ok                bool
	}{
		{"valid", "llorch1.sha256hex.abcdefghijkl.secret", "abcdefghijkl", true},
		{"wrong prefix", "other1.fp.id.secret", "", false},
		{"truncated", "llorch1.fp.id", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := TokenID(tc.token)
			if (err == nil) != tc.ok || got != tc.want {
				t.Errorf("TokenID(%q) = %q, %v", tc.token, got, err)
			}
		})
	}
}

func TestReport(t *testing.T) {
	r := &Report{}
	r.add(Result{Scenario: "s", Invariant: "offline after the cut", Measured: "3.10s", Bound: "<= 5.00s", Pass: true})
	r.add(Result{Scenario: "s", Invariant: "flaps", Measured: "3", Bound: "<= 2", Pass: false})
	var buf bytes.Buffer
	r.Print(&buf)
	out := buf.String()
	for _, want := range []string{"SCENARIO", "offline after the cut", "3.10s", "PASS", "FAIL", "2 invariants checked, 1 failed"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if got := r.Results()[1].Line(); got != "INVARIANT s | flaps | measured 3 | bound <= 2 | FAIL" {
		t.Errorf("Line() = %q", got)
	}
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP llorch_store_write_errors_total Failed writes of liveness state to the store (retried).
# TYPE llorch_store_write_errors_total counter
llorch_store_write_errors_total 7
llorch_node_transitions_total{from="online",to="offline"} 2
llorch_node_transitions_total{from="offline",to="online"} 1.5e+00
weird{reason="a \"quoted\" value with spaces"} 3 1700000000000

go_goroutines 12
`
	m, err := ParseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		want float64
	}{
		{"llorch_store_write_errors_total", 7},
		{"llorch_node_transitions_total", 3.5},
		{"weird", 3},
		{"llorch_nodes", 0},
		{"go_goroutine", 0}, // a prefix of another name is not that metric
	} {
		if got := m.Sum(tc.name); got != tc.want {
			t.Errorf("Sum(%s) = %g, want %g", tc.name, got, tc.want)
		}
	}
	if _, err := ParseMetrics(strings.NewReader("no_value\n")); err == nil {
		t.Error("a line without a value parsed")
	}
}

func TestReplay(t *testing.T) {
	s := &Suite{Gate: "LLORCH_CHAOS", Pkg: "./chaos/", Seeded: true}
	t.Setenv(EnvTask, "chaos:ci")
	seed, err := RunSeed()
	if err != nil {
		t.Fatal(err)
	}
	got := s.Replay(t)
	for _, want := range []string{
		fmt.Sprintf("%s=%d LLORCH_CHAOS=1 ", EnvSeed, seed),
		"-run '^TestReplay$' ./chaos/",
		fmt.Sprintf("(the whole run: %s=%d go tool task chaos:ci)", EnvSeed, seed),
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Replay() = %q, lacks %q", got, want)
		}
	}
}
