package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/store"
	"github.com/llorch/llorch/edge/state"
)

// Config is one simulation.
type Config struct {
	ControlBin string
	// DataDir is the control plane's data directory; empty: one in the
	// temporary directory.
	DataDir           string
	Edges             int
	HeartbeatInterval time.Duration
	OfflineAfter      time.Duration
	Duration          time.Duration // steady-state hold
	RampRate          int           // session connects per second
	EnrollConcurrency int
	EnrollBatch       int // enrollments per token and per worker process
	Restart           bool
	RestartTimeout    time.Duration
	JSONPath          string // empty: no JSON
	Keep              bool   // keep the temporary directory
	ControlLogLevel   string
}

// Validate checks the configuration and names the bad flag.
func (c Config) Validate() error {
	switch {
	case c.Edges < 1 || c.Edges > 100_000:
		return fmt.Errorf("--edges %d: must be between 1 and 100000", c.Edges)
	case c.HeartbeatInterval < 100*time.Millisecond:
		return fmt.Errorf("--heartbeat-interval %s: must be at least 100ms", c.HeartbeatInterval)
	case c.OfflineAfter < 2*c.HeartbeatInterval:
		return fmt.Errorf("--offline-after %s: must be at least twice the heartbeat interval", c.OfflineAfter)
	case c.Duration < time.Second || c.Duration > time.Hour:
		return fmt.Errorf("--duration %s: must be between 1s and 1h", c.Duration)
	case c.RampRate < 1 || c.RampRate > 100_000:
		return fmt.Errorf("--ramp-rate %d: must be between 1 and 100000", c.RampRate)
	case c.EnrollConcurrency < 1 || c.EnrollConcurrency > 1024:
		return fmt.Errorf("--enroll-concurrency %d: must be between 1 and 1024", c.EnrollConcurrency)
	case c.EnrollBatch < 1 || c.EnrollBatch > 1000:
		return fmt.Errorf("--enroll-batch %d: must be between 1 and 1000 (a token's most uses)", c.EnrollBatch)
	case c.RestartTimeout < time.Second || c.RestartTimeout > 30*time.Minute:
		return fmt.Errorf("--restart-timeout %s: must be between 1s and 30m", c.RestartTimeout)
	}
	if st, err := os.Stat(c.ControlBin); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("--control-bin %s: not an executable file (build it with `go tool task build`)", c.ControlBin)
	}
	return nil
}

// Sim runs one simulation.
type Sim struct {
	cfg        Config
	progress   io.Writer
	began      time.Time
	cp         *controlProc
	controlURL string
	fleet      *fleet
	tmp        string
}

// New returns a simulation that writes progress lines to progress.
func New(cfg Config, progress io.Writer) *Sim {
	return &Sim{cfg: cfg, progress: progress}
}

// fdsNeeded is how many descriptors each process (this one and the control
// plane) needs: one per session, plus margin for reconnects in flight, the
// database, listeners and logs. The limit is per process, so the two do not
// add up.
func fdsNeeded(edges int) uint64 { return uint64(edges + edges/10 + 512) }

// Run runs the phases in order: start, enroll, baseline, ramp, steady state,
// restarts. On error or cancellation it returns what it measured so far.
func (s *Sim) Run(ctx context.Context) (*Result, error) {
	res, err := s.run(ctx)
	if res != nil {
		if s.fleet != nil {
			res.Ack = s.fleet.acks.summary()
		}
		res.Targets = targets(res)
		res.Seconds = time.Since(s.began).Seconds()
	}
	return res, err
}

func (s *Sim) run(ctx context.Context) (*Result, error) {
	cfg := s.cfg
	s.began = time.Now()
	res := &Result{Started: s.began, Config: cfg, Env: Env{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}}

	tmp, err := os.MkdirTemp("", "edgesim-")
	if err != nil {
		return nil, err
	}
	res.TempDir, s.tmp = tmp, tmp
	defer func() {
		if !cfg.Keep {
			os.RemoveAll(tmp)
		}
	}()
	limit, err := raiseFileLimit()
	if err != nil {
		return res, err
	}
	res.Env.FileLimit = limit
	if need := fdsNeeded(cfg.Edges); limit < need {
		return res, fmt.Errorf("RLIMIT_NOFILE hard limit is %d; %d edges need about %d descriptors in this process and as many in the control plane (one per session plus margin): raise it (ulimit -Hn, LimitNOFILE=) or simulate fewer edges", limit, cfg.Edges, need)
	}
	port, err := freePort()
	if err != nil {
		return res, err
	}
	dataDir := cfg.DataDir
	if dataDir == "" {
		dataDir = filepath.Join(tmp, "data")
	} else if _, err := os.Stat(filepath.Join(dataDir, "llorch.db")); err == nil {
		// Node lists and event counts assume every node is simulated.
		return res, fmt.Errorf("--data %s already holds a control plane; give a new directory", dataDir)
	}
	listen := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	s.controlURL = "https://" + listen
	s.cp = newControlProc(cfg.ControlBin, dataDir, listen, tmp, cfg.ControlLogLevel, cfg.HeartbeatInterval, cfg.OfflineAfter)
	defer s.cp.stop()
	s.logf("control plane: %s serve --data %s --listen %s (logs in %s)", cfg.ControlBin, dataDir, listen, tmp)
	if err := s.cp.start(); err != nil {
		return res, err
	}
	if err := s.cp.waitReady(ctx, time.Minute); err != nil {
		return res, err
	}

	// Enrollment.
	dirs := edgeDirs(filepath.Join(tmp, "edges"), cfg.Edges)
	res.Enroll, err = s.enrollFleet(ctx, dirs)
	if err != nil {
		return res, err
	}
	s.logf("enrolled %d edges in %.1fs (%.0f/s)", res.Enroll.Enrolled, res.Enroll.Seconds, res.Enroll.PerSecond)
	edges := make([]*simEdge, len(dirs))
	for i, d := range dirs {
		id, err := state.Load(d)
		if err != nil {
			return res, err
		}
		edges[i] = newSimEdge(i, id)
	}

	// Baseline: a fresh control plane with every node enrolled and none
	// connected, so enrollment garbage does not count.
	if _, err := s.cp.signal(syscall.SIGTERM, 30*time.Second); err != nil {
		return res, err
	}
	if err := s.cp.start(); err != nil {
		return res, err
	}
	if err := s.cp.waitReady(ctx, time.Minute); err != nil {
		return res, err
	}
	if err := sleep(ctx, 3*time.Second); err != nil {
		return res, err
	}
	if res.Baseline, err = s.sample(ctx); err != nil {
		return res, err
	}
	if res.BaselineLive, _, err = s.liveSample(ctx, "baseline"); err != nil {
		return res, err
	}
	s.logf("baseline: control plane RSS %s, heap %s (%s live), stack %s, %d goroutines",
		mib(res.Baseline.RSS), mib(res.Baseline.HeapInuse), mib(res.BaselineLive.HeapAlloc), mib(res.Baseline.StackInuse), res.Baseline.Goroutines)

	// Ramp.
	f := newFleet(edges)
	s.fleet = f
	fleetCtx, stopFleet := context.WithCancel(ctx)
	fleetStopped := false
	defer func() {
		if !fleetStopped {
			stopFleet()
			f.wait(15 * time.Second)
		}
	}()
	if res.Ramp, err = s.ramp(ctx, fleetCtx, f); err != nil {
		return res, err
	}

	// Steady state.
	res.Steady, err = s.hold(ctx, f)
	res.Steady.perSession(res.Baseline, res.BaselineLive)
	if err != nil {
		return res, err
	}

	// Restarts.
	if cfg.Restart {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			// Let heartbeats run on every session before the next restart.
			f.acks.setPhase("settle")
			if err := sleep(ctx, cfg.HeartbeatInterval+2*time.Second); err != nil {
				return res, err
			}
			r, err := s.restart(ctx, f, sig)
			res.Restarts = append(res.Restarts, r)
			if err != nil {
				return res, err
			}
		}
	}

	// Stop the control plane first (graceful: sessions are told to come back
	// later), then the edges; then read the event log.
	f.acks.setPhase("end")
	res.Fatal = int(f.fatal.Load())
	if v, ok := f.fatalErr.Load().(string); ok {
		res.FatalError = v
	}
	runEnd := time.Now()
	s.cp.stop()
	stopFleet()
	fleetStopped = true
	if !f.wait(15 * time.Second) {
		dump := filepath.Join(s.tmp, "goroutines-end.txt")
		dumpGoroutines(dump)
		res.Problems = append(res.Problems, "some sessions did not end within 15s of the end; goroutines of edgesim in "+dump+" (labelled by edge; --keep keeps it)")
	}
	if err := s.countOfflineEvents(ctx, dataDir, res, runEnd); err != nil {
		res.Problems = append(res.Problems, err.Error())
	}
	return res, nil
}

// ramp opens the sessions at the ramp rate and waits until every edge has
// registered once (at most N/rate + 60s).
func (s *Sim) ramp(ctx, fleetCtx context.Context, f *fleet) (RampResult, error) {
	n := len(f.edges)
	r := RampResult{Edges: n, Rate: s.cfg.RampRate}
	t0 := time.Now()
	cpu, overflows := s.cpuMeter(), listenOverflows()
	f.start(fleetCtx, s.cfg.RampRate)
	stop := s.progressEvery(2*time.Second, func(time.Duration) string {
		ever, _, _ := f.regs.counts()
		return fmt.Sprintf("sessions: started %d/%d, registered %d", f.started.Load(), n, ever)
	})
	limit := time.Duration(n/s.cfg.RampRate)*time.Second + time.Minute
	err := pollUntil(ctx, limit, func() bool { ever, _, _ := f.regs.counts(); return ever >= n })
	stop()
	ever, total, _ := f.regs.counts()
	r.Seconds = time.Since(t0).Seconds()
	r.Registered, r.Reregistrations = ever, total-ever
	r.Ack = f.acks.summary("ramp")
	r.ControlCPUPercent, r.SimCPUPercent = cpu()
	r.ListenOverflows = listenOverflows() - overflows
	if errors.Is(err, errTimeout) {
		return r, fmt.Errorf("only %d of %d edges registered within %s", ever, n, limit)
	}
	return r, err
}

// hold keeps the fleet up for the configured duration and samples the
// control plane's memory, heartbeat counter and CPU. Interrupted, it
// summarizes the samples it has.
func (s *Sim) hold(ctx context.Context, f *fleet) (SteadyResult, error) {
	r := SteadyResult{}
	f.acks.setPhase("steady")
	every := min(5*time.Second, max(s.cfg.Duration/6, time.Second))
	first, err := s.sample(ctx)
	if err != nil {
		return r, err
	}
	r.Samples = append(r.Samples, first)
	end := time.Now().Add(s.cfg.Duration)
	for err == nil && time.Now().Before(end) {
		if err = sleep(ctx, min(every, time.Until(end))); err != nil {
			break
		}
		var smp MemSample
		if smp, err = s.sample(ctx); err != nil {
			break
		}
		prev := r.Samples[len(r.Samples)-1]
		r.Samples = append(r.Samples, smp)
		ack := f.acks.summary("steady")
		s.logf("steady %3.0fs/%s: sessions %d, acks %d (p99 %.1fms), control RSS %s heap %s, CPU control %.0f%% edgesim %.0f%%",
			smp.At-first.At, s.cfg.Duration, smp.Sessions, ack.Count, ack.P99MS, mib(smp.RSS), mib(smp.HeapInuse),
			pctCPU(prev, smp, false), pctCPU(prev, smp, true))
	}
	if len(r.Samples) < 2 {
		return r, err
	}
	last := r.Samples[len(r.Samples)-1]
	r.Seconds = last.At - first.At
	r.Sessions = last.Sessions
	r.Ack = f.acks.summary("steady")
	r.HeartbeatsCounted = last.Heartbeats - first.Heartbeats
	r.HeartbeatsExpected = float64(last.Sessions) * r.Seconds / s.cfg.HeartbeatInterval.Seconds()
	r.ControlCPUPercent = pctCPU(first, last, false)
	r.SimCPUPercent = pctCPU(first, last, true)
	// Memory: the median of the samples, against the baseline.
	var rss, heap []int64
	for _, smp := range r.Samples {
		rss, heap = append(rss, smp.RSS), append(heap, smp.HeapInuse+smp.StackInuse)
	}
	r.MedianRSS, r.MedianHeapStack = median(rss), median(heap)
	if err == nil {
		r.Live, r.HeapProfile, err = s.liveSample(ctx, "steady")
	}
	return r, err
}

// liveSample collects the control plane's garbage (by asking for its heap
// profile, which it saves under the temporary directory) and samples it
// right after: what it holds without the collector's headroom.
func (s *Sim) liveSample(ctx context.Context, phase string) (MemSample, string, error) {
	path := filepath.Join(s.tmp, "heap-"+phase+".pb.gz")
	if err := s.cp.heapProfile(ctx, path); err != nil {
		return MemSample{}, "", fmt.Errorf("control plane heap profile: %w", err)
	}
	smp, err := s.sample(ctx)
	return smp, path, err
}

// restart stops the control plane with sig, starts it again on the same
// data directory and port, and times the fleet's return.
func (s *Sim) restart(ctx context.Context, f *fleet, sig syscall.Signal) (RestartResult, error) {
	n := len(f.edges)
	name := strings.ToUpper(unix(sig))
	r := RestartResult{Signal: name, Edges: n}
	f.acks.setPhase("restart-" + name)
	_, before, _ := f.regs.counts()
	overflows := listenOverflows()
	t0 := time.Now()
	r.WindowStart = t0
	s.logf("restart: sending %s to the control plane", name)
	exit, err := s.cp.signal(sig, 30*time.Second)
	r.ExitSeconds = exit.Seconds()
	if err != nil {
		r.Problem = err.Error()
	}
	_, atExit, _ := f.regs.counts()
	r.RegisteredWithOld = atExit - before
	f.regs.setMark(time.Now())
	if err := s.cp.start(); err != nil {
		return r, err
	}
	cpu := s.cpuMeter()
	if err := s.cp.waitReady(ctx, time.Minute); err != nil {
		return r, err
	}
	r.ReadySeconds = time.Since(t0).Seconds()
	stop := s.progressEvery(time.Second, func(time.Duration) string {
		_, _, back := f.regs.counts()
		return fmt.Sprintf("restart (%s): %d/%d back after %.1fs", name, back, n, time.Since(t0).Seconds())
	})
	err = pollUntil(ctx, s.cfg.RestartTimeout-time.Since(t0), func() bool { _, _, back := f.regs.counts(); return back >= n })
	stop()
	if err != nil && !errors.Is(err, errTimeout) {
		return r, err
	}
	times := f.regs.sinceTimes()
	r.Back = len(times)
	if len(times) > 0 {
		slices.SortFunc(times, func(a, b time.Time) int { return a.Compare(b) })
		at := func(q float64) float64 { return times[int(q*float64(len(times)-1))].Sub(t0).Seconds() }
		r.FirstBackSeconds, r.P50BackSeconds, r.P90BackSeconds, r.LastBackSeconds = at(0), at(0.5), at(0.9), at(1)
		for _, t := range times {
			sec := int(t.Sub(t0) / time.Second)
			for len(r.BackPerSecond) <= sec {
				r.BackPerSecond = append(r.BackPerSecond, 0)
			}
			r.BackPerSecond[sec]++
		}
	}
	r.AllBack = r.Back == n
	r.ControlCPUPercent, r.SimCPUPercent = cpu()
	r.ListenOverflows = listenOverflows() - overflows
	if !r.AllBack {
		r.Problem = strings.TrimSpace(r.Problem + fmt.Sprintf(" only %d of %d back within %s; missing: %s",
			r.Back, n, s.cfg.RestartTimeout, strings.Join(f.regs.missingSince(10), " ")))
		dump := filepath.Join(s.tmp, "goroutines-restart-"+strings.ToLower(name)+".txt")
		if err := dumpGoroutines(dump); err == nil {
			r.Problem += "; goroutines of edgesim in " + dump + " (labelled by edge; --keep keeps it)"
		}
	}
	if r.NodeStatuses, err = s.cp.nodeStatuses(ctx); err != nil {
		return r, err
	}
	m, err := s.cp.metrics(ctx)
	if err != nil {
		return r, err
	}
	r.OfflineTransitions = int(m.sum("llorch_node_transitions_total", `to="offline"`))
	r.SessionsMetric = int(m.sum("llorch_sessions"))
	r.WindowEnd = time.Now()
	r.Ack = f.acks.summary("restart-" + name)
	s.logf("restart (%s): %d/%d back, last after %.1fs (control plane answering after %.1fs); node list: %v",
		name, r.Back, n, r.LastBackSeconds, r.ReadySeconds, r.NodeStatuses)
	return r, nil
}

// countOfflineEvents reads the event log of the stopped control plane and
// counts status events into offline: in each restart window, and over the
// whole run before it was stopped.
func (s *Sim) countOfflineEvents(ctx context.Context, dataDir string, res *Result, runEnd time.Time) error {
	if s.cp.running() {
		return errors.New("control plane still running; event log not read")
	}
	st, err := store.Open(ctx, filepath.Join(dataDir, "llorch.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	total := 0
	var after int64
	for {
		es, err := st.ListEventsAfter(ctx, "", after, 10000)
		if err != nil {
			return err
		}
		for _, e := range es {
			after = e.ID
			if e.Kind != control.EventStatus || e.To != control.StatusOffline {
				continue
			}
			if e.Time.Before(runEnd) {
				total++
			}
			for i := range res.Restarts {
				r := &res.Restarts[i]
				if !e.Time.Before(r.WindowStart) && !e.Time.After(r.WindowEnd) {
					r.OfflineEvents++
				}
			}
		}
		if len(es) < 10000 {
			break
		}
	}
	res.OfflineEventsDuringRun = total
	res.EventLogRead = true
	return nil
}

// sample reads the control plane's memory and counters and this process's
// own resources.
func (s *Sim) sample(ctx context.Context) (MemSample, error) {
	m, err := s.cp.metrics(ctx)
	if err != nil {
		return MemSample{}, fmt.Errorf("read control plane metrics: %w", err)
	}
	p, err := readProc(s.cp.pid())
	if err != nil {
		return MemSample{}, err
	}
	self, err := readProc(0)
	if err != nil {
		return MemSample{}, err
	}
	return MemSample{
		At:  time.Since(s.began).Seconds(),
		RSS: p.RSS, PeakRSS: p.PeakRSS, HeapInuse: int64(m.sum("go_memstats_heap_inuse_bytes")), HeapAlloc: int64(m.sum("go_memstats_heap_alloc_bytes")),
		StackInuse: int64(m.sum("go_memstats_stack_inuse_bytes")),
		NextGC:     int64(m.sum("go_memstats_next_gc_bytes")),
		Goroutines: int(m.sum("go_goroutines")), Sessions: int(m.sum("llorch_sessions")), Heartbeats: m.sum("llorch_heartbeats_total"),
		CPUSeconds: p.CPU.Seconds(), FDs: p.FDs, Threads: p.Threads,
		SimRSS: self.RSS, SimCPUSeconds: self.CPU.Seconds(), SimFDs: self.FDs, SimGoroutines: runtime.NumGoroutine(),
	}, nil
}

// cpuMeter starts measuring the CPU the control plane (the process running
// now) and edgesim use; the returned func gives both as a percentage of one
// core since then.
func (s *Sim) cpuMeter() func() (control, sim float64) {
	t0, pid := time.Now(), s.cp.pid()
	c0, _ := readProc(pid)
	s0, _ := readProc(0)
	return func() (float64, float64) {
		wall := time.Since(t0).Seconds()
		c1, _ := readProc(pid)
		s1, _ := readProc(0)
		return 100 * (c1.CPU - c0.CPU).Seconds() / wall, 100 * (s1.CPU - s0.CPU).Seconds() / wall
	}
}

func pctCPU(a, b MemSample, sim bool) float64 {
	wall := b.At - a.At
	if wall <= 0 {
		return 0
	}
	if sim {
		return 100 * (b.SimCPUSeconds - a.SimCPUSeconds) / wall
	}
	return 100 * (b.CPUSeconds - a.CPUSeconds) / wall
}

// progressEvery prints line() to the progress writer every interval until
// the returned stop is called, which prints it once more.
func (s *Sim) progressEvery(interval time.Duration, line func(elapsed time.Duration) string) (stop func()) {
	t0 := time.Now()
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				s.logf("%s", line(time.Since(t0)))
			}
		}
	}()
	return func() {
		close(done)
		<-finished
		s.logf("%s", line(time.Since(t0)))
	}
}

func (s *Sim) logf(format string, args ...any) {
	fmt.Fprintf(s.progress, "[%6.1fs] %s\n", time.Since(s.began).Seconds(), fmt.Sprintf(format, args...))
}

var errTimeout = errors.New("timed out")

// pollUntil checks cond every 50ms until it holds, ctx ends or limit passes.
func pollUntil(ctx context.Context, limit time.Duration, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return errTimeout
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func median(v []int64) int64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}

func unix(sig syscall.Signal) string {
	switch sig {
	case syscall.SIGTERM:
		return "sigterm"
	case syscall.SIGKILL:
		return "sigkill"
	}
	return sig.String()
}
