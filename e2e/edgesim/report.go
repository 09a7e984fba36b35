package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"
)

// Result is every figure of a run; --json writes it as is.
type Result struct {
	Started time.Time `json:"started"`
	Seconds float64   `json:"seconds"`
	Config  Config    `json:"-"`
	Flags   flagsJSON `json:"config"`
	Env     Env       `json:"environment"`
	TempDir string    `json:"temp_dir"`

	Enroll   EnrollResult `json:"enroll"`
	Baseline MemSample    `json:"baseline"`
	// BaselineLive is the baseline again right after a garbage collection.
	BaselineLive MemSample       `json:"baseline_live"`
	Ramp         RampResult      `json:"ramp"`
	Steady       SteadyResult    `json:"steady"`
	Restarts     []RestartResult `json:"restarts"`
	// Ack covers every acknowledgement of the run, all phases.
	Ack Latency `json:"ack_all_phases"`

	// OfflineEventsDuringRun counts "-> offline" status events before the
	// final shutdown (read from the event log once the control plane stopped).
	OfflineEventsDuringRun int  `json:"offline_events_during_run"`
	EventLogRead           bool `json:"event_log_read"`
	// Fatal counts sessions that ended for good (revoked, expired, superseded).
	Fatal      int      `json:"fatal_sessions"`
	FatalError string   `json:"fatal_error,omitempty"`
	Problems   []string `json:"problems,omitempty"`
	Targets    []Target `json:"targets"`
}

type flagsJSON struct {
	Edges             int    `json:"edges"`
	HeartbeatInterval string `json:"heartbeat_interval"`
	OfflineAfter      string `json:"offline_after"`
	Duration          string `json:"duration"`
	RampRate          int    `json:"ramp_rate"`
	EnrollConcurrency int    `json:"enroll_concurrency"`
	Restart           bool   `json:"restart"`
}

// Env is the machine the figures come from.
type Env struct {
	CPUs      int    `json:"cpus"`
	GoVersion string `json:"go_version"`
	FileLimit uint64 `json:"rlimit_nofile"`
}

// EnrollResult is the enrollment phase.
type EnrollResult struct {
	Edges        int     `json:"edges"`
	Enrolled     int     `json:"enrolled"`
	Failed       int     `json:"failed"`
	Concurrency  int     `json:"concurrency"`
	Tokens       int     `json:"tokens"`
	TokenSeconds float64 `json:"token_create_seconds"`
	Seconds      float64 `json:"seconds"`
	PerSecond    float64 `json:"per_second"`
	// CPU while enrolling, as a percentage of one core.
	ControlCPUPercent float64 `json:"control_cpu_percent"`
	WorkerCPUPercent  float64 `json:"edge_workers_cpu_percent"`
}

// MemSample is one look at the control plane (and at edgesim itself).
type MemSample struct {
	At            float64 `json:"at_seconds"`
	RSS           int64   `json:"rss_bytes"`
	PeakRSS       int64   `json:"peak_rss_bytes"`
	HeapInuse     int64   `json:"heap_inuse_bytes"`
	HeapAlloc     int64   `json:"heap_alloc_bytes"`
	StackInuse    int64   `json:"stack_inuse_bytes"`
	NextGC        int64   `json:"next_gc_bytes"`
	Goroutines    int     `json:"goroutines"`
	Sessions      int     `json:"sessions"`
	Heartbeats    float64 `json:"heartbeats_total"`
	CPUSeconds    float64 `json:"cpu_seconds"`
	FDs           int     `json:"fds"`
	Threads       int     `json:"threads"`
	SimRSS        int64   `json:"edgesim_rss_bytes"`
	SimCPUSeconds float64 `json:"edgesim_cpu_seconds"`
	SimFDs        int     `json:"edgesim_fds"`
	SimGoroutines int     `json:"edgesim_goroutines"`
}

// RampResult is the fleet coming up.
type RampResult struct {
	Edges      int     `json:"edges"`
	Rate       int     `json:"rate_per_second"`
	Seconds    float64 `json:"seconds"`
	Registered int     `json:"registered"`
	// Reregistrations counts registrations beyond each edge's first (lost sessions).
	Reregistrations   int     `json:"reregistrations"`
	Ack               Latency `json:"ack"`
	ControlCPUPercent float64 `json:"control_cpu_percent"`
	SimCPUPercent     float64 `json:"edgesim_cpu_percent"`
	// ListenOverflows counts connections the kernel dropped meanwhile
	// because the listen queue was full (the whole network namespace).
	ListenOverflows int64 `json:"listen_overflows"`
}

// SteadyResult is the fleet held up.
type SteadyResult struct {
	Seconds            float64 `json:"seconds"`
	Sessions           int     `json:"sessions"`
	Ack                Latency `json:"ack"`
	HeartbeatsCounted  float64 `json:"heartbeats_counted"`
	HeartbeatsExpected float64 `json:"heartbeats_expected"`
	ControlCPUPercent  float64 `json:"control_cpu_percent"`
	SimCPUPercent      float64 `json:"edgesim_cpu_percent"`
	MedianRSS          int64   `json:"median_rss_bytes"`
	MedianHeapStack    int64   `json:"median_heap_plus_stack_bytes"`
	RSSPerSession      float64 `json:"rss_per_session_bytes"`
	// PeakRSSPerSession is the most the control plane held since it
	// started (the ramp included), over the baseline, per session.
	PeakRSSPerSession float64     `json:"peak_rss_per_session_bytes"`
	HeapStackPerSess  float64     `json:"heap_stack_per_session_bytes"`
	GoroutinesPerSess float64     `json:"goroutines_per_session"`
	Samples           []MemSample `json:"samples"`
	// Live is a sample taken at the end of the hold right after a garbage
	// collection: what the sessions hold, without the collector's headroom.
	// LivePerSession is its heap and stacks over the live baseline's.
	Live           MemSample `json:"live"`
	LivePerSession float64   `json:"live_heap_stack_per_session_bytes"`
	// HeapProfile is the heap profile taken with Live (kept with --keep).
	HeapProfile string `json:"heap_profile,omitempty"`
}

// RestartResult is one restart of the control plane. Times are from the signal.
type RestartResult struct {
	Signal           string  `json:"signal"`
	Edges            int     `json:"edges"`
	ExitSeconds      float64 `json:"exit_seconds"`
	ReadySeconds     float64 `json:"ready_seconds"`
	Back             int     `json:"back"`
	AllBack          bool    `json:"all_back"`
	FirstBackSeconds float64 `json:"first_back_seconds"`
	P50BackSeconds   float64 `json:"p50_back_seconds"`
	P90BackSeconds   float64 `json:"p90_back_seconds"`
	LastBackSeconds  float64 `json:"last_back_seconds"`
	BackPerSecond    []int   `json:"back_per_second"`
	// RegisteredWithOld counts registrations with the old process after
	// the signal (sessions reopened while it was shutting down).
	RegisteredWithOld int `json:"registered_with_old_process"`
	// CPU from the new process's start until all were back, in % of one core.
	ControlCPUPercent float64 `json:"control_cpu_percent"`
	SimCPUPercent     float64 `json:"edgesim_cpu_percent"`
	// ListenOverflows counts connections the kernel dropped because the
	// listen queue was full, from the signal until all were back.
	ListenOverflows int64 `json:"listen_overflows"`
	// NodeStatuses is `control node list --json` right after all were back.
	NodeStatuses       map[string]int `json:"node_statuses"`
	SessionsMetric     int            `json:"llorch_sessions"`
	OfflineTransitions int            `json:"offline_transitions_metric"`
	OfflineEvents      int            `json:"offline_events"`
	Ack                Latency        `json:"ack"`
	WindowStart        time.Time      `json:"window_start"`
	WindowEnd          time.Time      `json:"window_end"`
	Problem            string         `json:"problem,omitempty"`
}

// Latency summarizes acknowledgement round trips.
type Latency struct {
	Count  int     `json:"count"`
	MeanMS float64 `json:"mean_ms"`
	P50MS  float64 `json:"p50_ms"`
	P90MS  float64 `json:"p90_ms"`
	P99MS  float64 `json:"p99_ms"`
	P999MS float64 `json:"p999_ms"`
	MaxMS  float64 `json:"max_ms"`
}

// Target is one of the targets, met or not.
type Target struct {
	Name string `json:"name"`
	Want string `json:"want"`
	Got  string `json:"got"`
	Met  bool   `json:"met"`
}

// perSession divides the growth over the baselines by the sessions held.
func (st *SteadyResult) perSession(base, baseLive MemSample) {
	if st.Sessions == 0 || len(st.Samples) == 0 {
		return
	}
	n := float64(st.Sessions)
	st.RSSPerSession = float64(st.MedianRSS-base.RSS) / n
	st.PeakRSSPerSession = float64(st.Samples[len(st.Samples)-1].PeakRSS-base.RSS) / n
	st.HeapStackPerSess = float64(st.MedianHeapStack-base.HeapInuse-base.StackInuse) / n
	st.GoroutinesPerSess = float64(st.Samples[len(st.Samples)-1].Goroutines-base.Goroutines) / n
	if st.Live.Sessions > 0 {
		st.LivePerSession = float64(st.Live.HeapAlloc+st.Live.StackInuse-baseLive.HeapAlloc-baseLive.StackInuse) / float64(st.Live.Sessions)
	}
}

func targets(res *Result) []Target {
	st := res.Steady
	ts := []Target{
		{"sessions held", "10000", fmt.Sprint(st.Sessions), st.Sessions >= 10000},
		{"heartbeat ack p99 (steady)", "< 50 ms", fmt.Sprintf("%.1f ms", st.Ack.P99MS), st.Ack.Count > 0 && st.Ack.P99MS < 50},
		{"control-plane RSS per session", "< 64 KiB", kib(st.RSSPerSession), st.Sessions > 0 && st.RSSPerSession < 64<<10},
		{"control-plane live heap+stack per session", "< 64 KiB", kib(st.LivePerSession), st.Live.Sessions > 0 && st.LivePerSession < 64<<10},
	}
	for _, r := range res.Restarts {
		ts = append(ts, Target{"all back after " + r.Signal, "< 30 s", backText(r), r.AllBack && r.LastBackSeconds < 30})
		ts = append(ts, Target{"offline events, " + r.Signal + " restart", "0", fmt.Sprint(r.OfflineEvents), res.EventLogRead && r.OfflineEvents == 0})
	}
	return ts
}

func backText(r RestartResult) string {
	if !r.AllBack {
		return fmt.Sprintf("%d/%d back", r.Back, r.Edges)
	}
	return fmt.Sprintf("%.1f s", r.LastBackSeconds)
}

func printSummary(w io.Writer, res *Result) {
	c := res.Config
	fmt.Fprintf(w, "edgesim: %d edges, heartbeat %s, offline after %s, hold %s; %d CPUs, %s, RLIMIT_NOFILE %d\n\n",
		c.Edges, c.HeartbeatInterval, c.OfflineAfter, c.Duration, res.Env.CPUs, res.Env.GoVersion, res.Env.FileLimit)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	e := res.Enroll
	fmt.Fprintf(tw, "enrollment\t%d/%d in %.1fs: %.0f/s (concurrency %d; %d tokens in %.1fs); CPU control %.0f%%, edge side %.0f%%\n",
		e.Enrolled, e.Edges, e.Seconds, e.PerSecond, e.Concurrency, e.Tokens, e.TokenSeconds, e.ControlCPUPercent, e.WorkerCPUPercent)
	b := res.Baseline
	fmt.Fprintf(tw, "baseline\tRSS %s, heap %s, stack %s, %d goroutines (every node enrolled, none connected)\n", mib(b.RSS), mib(b.HeapInuse), mib(b.StackInuse), b.Goroutines)
	r := res.Ramp
	if r.Edges > 0 {
		fmt.Fprintf(tw, "ramp\t%d/%d registered in %.1fs (%.0f/s, asked %d/s); %d re-registrations; CPU control %.0f%%, edgesim %.0f%%; %d listen overflows\n",
			r.Registered, r.Edges, r.Seconds, float64(r.Registered)/r.Seconds, r.Rate, r.Reregistrations, r.ControlCPUPercent, r.SimCPUPercent, r.ListenOverflows)
		fmt.Fprintf(tw, "\tack %s\n", latText(r.Ack))
	}
	st := res.Steady
	if st.Seconds > 0 {
		last := st.Samples[len(st.Samples)-1]
		fmt.Fprintf(tw, "steady\t%d sessions for %.0fs; ack %s\n", st.Sessions, st.Seconds, latText(st.Ack))
		fmt.Fprintf(tw, "\theartbeats counted %.0f, expected %.0f\n", st.HeartbeatsCounted, st.HeartbeatsExpected)
		fmt.Fprintf(tw, "\tcontrol plane: RSS %s (%s/session), heap+stack %s (%s/session), %d goroutines (%.1f/session), %d fds, CPU %.0f%%\n",
			mib(st.MedianRSS), kib(st.RSSPerSession), mib(st.MedianHeapStack), kib(st.HeapStackPerSess), last.Goroutines, st.GoroutinesPerSess, last.FDs, st.ControlCPUPercent)
		fmt.Fprintf(tw, "\tpeak RSS %s (%s/session; the most since it started, the ramp included)\n", mib(last.PeakRSS), kib(st.PeakRSSPerSession))
		fmt.Fprintf(tw, "\tafter a garbage collection: heap %s + stacks %s (%s/session live); heap profile %s\n",
			mib(st.Live.HeapAlloc), mib(st.Live.StackInuse), kib(st.LivePerSession), st.HeapProfile)
		fmt.Fprintf(tw, "\tedgesim: RSS %s, %d goroutines, %d fds, CPU %.0f%%\n", mib(last.SimRSS), last.SimGoroutines, last.SimFDs, st.SimCPUPercent)
	}
	for _, rs := range res.Restarts {
		fmt.Fprintf(tw, "restart %s\told exited %.2fs, new one's admin socket answered %.2fs; %d/%d back: first %.1fs, p50 %.1fs, p90 %.1fs, last %.1fs after the signal\n",
			rs.Signal, rs.ExitSeconds, rs.ReadySeconds, rs.Back, rs.Edges, rs.FirstBackSeconds, rs.P50BackSeconds, rs.P90BackSeconds, rs.LastBackSeconds)
		fmt.Fprintf(tw, "\t%d sessions re-registered with the old process while it shut down; CPU until all back: control %.0f%%, edgesim %.0f%%; %d listen overflows\n",
			rs.RegisteredWithOld, rs.ControlCPUPercent, rs.SimCPUPercent, rs.ListenOverflows)
		fmt.Fprintf(tw, "\tback per second: %s\n", perSecondText(rs.BackPerSecond))
		fmt.Fprintf(tw, "\tnode list: %s; offline transitions (metric) %d, offline events %d; ack %s\n",
			statusText(rs.NodeStatuses), rs.OfflineTransitions, rs.OfflineEvents, latText(rs.Ack))
		if rs.Problem != "" {
			fmt.Fprintf(tw, "\tproblem: %s\n", rs.Problem)
		}
	}
	if res.EventLogRead {
		fmt.Fprintf(tw, "event log\t%d \"-> offline\" status events during the run\n", res.OfflineEventsDuringRun)
	}
	if res.Fatal > 0 {
		fmt.Fprintf(tw, "fatal\t%d sessions ended for good: %s\n", res.Fatal, res.FatalError)
	}
	for _, p := range res.Problems {
		fmt.Fprintf(tw, "problem\t%s\n", p)
	}
	tw.Flush()
	if len(res.Targets) > 0 {
		fmt.Fprintln(w, "\ntargets:")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, t := range res.Targets {
			verdict := "met"
			if !t.Met {
				verdict = "NOT MET"
			}
			fmt.Fprintf(tw, "  %s\twant %s\tgot %s\t%s\n", t.Name, t.Want, t.Got, verdict)
		}
		tw.Flush()
	}
}

func latText(l Latency) string {
	if l.Count == 0 {
		return "none"
	}
	return fmt.Sprintf("n=%d p50 %.1fms p90 %.1fms p99 %.1fms max %.1fms", l.Count, l.P50MS, l.P90MS, l.P99MS, l.MaxMS)
}

func perSecondText(counts []int) string {
	var parts []string
	for s, n := range counts {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%ds:%d", s, n))
		}
	}
	return strings.Join(parts, " ")
}

func statusText(m map[string]int) string {
	var parts []string
	for _, s := range []string{"online", "unknown", "offline", "disconnected", "enrolled"} {
		if m[s] > 0 || s == "offline" || s == "unknown" {
			parts = append(parts, fmt.Sprintf("%s %d", s, m[s]))
		}
	}
	return strings.Join(parts, ", ")
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func kib(b float64) string { return fmt.Sprintf("%.1f KiB", b/1024) }

func writeJSON(path string, res *Result) error {
	c := res.Config
	res.Flags = flagsJSON{
		Edges: c.Edges, HeartbeatInterval: c.HeartbeatInterval.String(), OfflineAfter: c.OfflineAfter.String(),
		Duration: c.Duration.String(), RampRate: c.RampRate, EnrollConcurrency: c.EnrollConcurrency, Restart: c.Restart,
	}
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
