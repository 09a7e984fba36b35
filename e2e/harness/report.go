package harness

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"
)

// Result is one checked invariant.
type Result struct {
	Scenario, Invariant string
	Measured, Bound     string
	Pass                bool
}

// Line is the result as one line: scenario, invariant, measured, bound, verdict.
func (r Result) Line() string {
	return fmt.Sprintf("INVARIANT %s | %s | measured %s | bound %s | %s", r.Scenario, r.Invariant, r.Measured, r.Bound, verdict(r.Pass))
}

func verdict(pass bool) string {
	if pass {
		return "PASS"
	}
	return "FAIL"
}

// Report collects the results of a run, in order.
type Report struct {
	mu      sync.Mutex
	results []Result
}

func (r *Report) add(res Result) {
	r.mu.Lock()
	r.results = append(r.results, res)
	r.mu.Unlock()
}

// Results returns a copy of the results so far.
func (r *Report) Results() []Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Result(nil), r.results...)
}

// Print writes the results as a table (nothing when there are none).
func (r *Report) Print(w io.Writer) {
	results := r.Results()
	if len(results) == 0 {
		return
	}
	failed := 0
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SCENARIO\tINVARIANT\tMEASURED\tBOUND\tRESULT")
	for _, res := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", res.Scenario, res.Invariant, res.Measured, res.Bound, verdict(res.Pass))
		if !res.Pass {
			failed++
		}
	}
	fmt.Fprintln(w)
	tw.Flush()
	fmt.Fprintf(w, "%d invariants checked, %d failed\n", len(results), failed)
}

// Checker checks the invariants of one scenario: each check prints its line
// at once, is added to the run's table, and fails the test (without
// stopping it, so every invariant is reported) when it does not hold.
type Checker struct {
	s        *Suite
	t        testing.TB
	scenario string
	report   *Report
}

// Checker returns a checker for a scenario's invariants.
func (s *Suite) Checker(t testing.TB, scenario string) *Checker {
	return &Checker{s: s, t: t, scenario: scenario, report: s.report}
}

func (c *Checker) record(invariant, measured, bound string, pass bool) bool {
	c.t.Helper()
	res := Result{Scenario: c.scenario, Invariant: invariant, Measured: measured, Bound: bound, Pass: pass}
	c.report.add(res)
	fmt.Println(res.Line())
	if !pass {
		c.t.Errorf("invariant %s / %s does not hold: measured %s, bound %s; replay: %s", c.scenario, invariant, measured, bound, c.s.Replay(c.t))
	}
	return pass
}

// Within checks a duration against an upper bound.
func (c *Checker) Within(invariant string, measured, bound time.Duration) bool {
	c.t.Helper()
	return c.record(invariant, fmtDuration(measured), "<= "+fmtDuration(bound), measured <= bound)
}

// AtLeastDuration checks a duration against a lower bound.
func (c *Checker) AtLeastDuration(invariant string, measured, bound time.Duration) bool {
	c.t.Helper()
	return c.record(invariant, fmtDuration(measured), ">= "+fmtDuration(bound), measured >= bound)
}

// AtMost checks a count against an upper bound.
func (c *Checker) AtMost(invariant string, measured, bound int) bool {
	c.t.Helper()
	return c.record(invariant, fmt.Sprint(measured), fmt.Sprintf("<= %d", bound), measured <= bound)
}

// AtLeast checks a count against a lower bound.
func (c *Checker) AtLeast(invariant string, measured, bound int) bool {
	c.t.Helper()
	return c.record(invariant, fmt.Sprint(measured), fmt.Sprintf(">= %d", bound), measured >= bound)
}

// Equal checks a count against the one value it must have.
func (c *Checker) Equal(invariant string, measured, want int) bool {
	c.t.Helper()
	return c.record(invariant, fmt.Sprint(measured), fmt.Sprintf("= %d", want), measured == want)
}

// Holds checks a condition described in words.
func (c *Checker) Holds(invariant string, ok bool, measured, bound string) bool {
	c.t.Helper()
	return c.record(invariant, measured, bound, ok)
}

// Missed records an invariant that could not be measured (the state it
// waits for never came): it fails with the reason as the measurement.
func (c *Checker) Missed(invariant, why, bound string) bool {
	c.t.Helper()
	return c.record(invariant, "never ("+why+")", bound, false)
}

func fmtDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.2fs", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%dms", d.Milliseconds())
	}
	return d.String()
}

// Short lists items for a measurement, at most n of them.
func Short(items []string, n int) string {
	if len(items) == 0 {
		return "none"
	}
	if len(items) > n {
		return strings.Join(items[:n], ",") + fmt.Sprintf(",... (%d)", len(items))
	}
	return strings.Join(items, ",")
}
