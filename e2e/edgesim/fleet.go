package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/session"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

// simEdge is one simulated edge: its identity, its own HTTP/2 transport
// (so its own TCP and TLS connection) and what it reports.
type simEdge struct {
	idx    int
	url    string
	hc     *http.Client
	system *llorchv1.NodeSystem
	report *llorchv1.NodeStatusReport
}

func newSimEdge(idx int, id state.Identity) *simEdge {
	name := edgeName(idx)
	return &simEdge{
		idx: idx,
		url: id.ControlURL,
		hc:  client.HTTPClient(client.NewIdentity(id)),
		system: &llorchv1.NodeSystem{
			Hostname: name, Os: runtime.GOOS, Arch: runtime.GOARCH, AgentVersion: "edgesim",
		},
		// One GPU and one pool with one replica: what a small real edge sends.
		report: &llorchv1.NodeStatusReport{
			GpuInventory: &llorchv1.GpuInventory{
				DriverVersion: "550.54.15", CudaVersion: "12.4",
				Gpus: []*llorchv1.Gpu{{
					Index: 0, Uuid: fmt.Sprintf("GPU-%08x-0000-0000-0000-000000000000", idx), Name: "NVIDIA L4",
					MemoryTotalBytes: 24 << 30, MemoryUsedBytes: 18 << 30, UtilizationPercent: 42, TemperatureC: 61,
				}},
			},
			Pools: []*llorchv1.Pool{{
				Id: "llama-8b", Engine: "llama.cpp", EngineVersion: "b4000", Model: "llama-3.1-8b-instruct-q4_k_m",
				SlotsTotal: 4, SlotsFree: 3, Ready: true,
				Replicas: []*llorchv1.Replica{{
					Id: "r0", Url: "http://127.0.0.1:8080", Ready: true, DeviceMask: "0", Slots: 4, Pid: 4242,
					File: "/var/lib/llorch-edge/engines/llama-8b-r0.json",
				}},
			}},
		},
	}
}

// fleet runs the simulated edges and records what they see.
type fleet struct {
	edges []*simEdge
	acks  *latencies
	regs  *registrations

	wg       sync.WaitGroup
	started  atomic.Int64
	fatal    atomic.Int64
	fatalErr atomic.Value
}

func newFleet(edges []*simEdge) *fleet {
	return &fleet{edges: edges, acks: newLatencies(), regs: newRegistrations(len(edges))}
}

// start opens the sessions at rate per second, in the background; the
// sessions run until ctx ends.
func (f *fleet) start(ctx context.Context, rate int) {
	f.wg.Go(func() {
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for _, e := range f.edges {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			f.started.Add(1)
			f.wg.Go(func() { f.runEdge(ctx, e) })
		}
	})
}

// runEdge runs one edge's session. Its goroutines carry the pprof label
// edge=<name>, so a goroutine dump (see dumpGoroutines) shows where a stuck
// edge is.
func (f *fleet) runEdge(ctx context.Context, e *simEdge) {
	pprof.Do(ctx, pprof.Labels("edge", edgeName(e.idx)), func(ctx context.Context) { f.runSession(ctx, e) })
}

func (f *fleet) runSession(ctx context.Context, e *simEdge) {
	dialer := llorchv1connect.NewSessionServiceClient(e.hc, e.url)
	err := session.Run(ctx, session.Config{
		Dial:         func() session.Dialer { return dialer },
		System:       e.system,
		Report:       func(context.Context) *llorchv1.NodeStatusReport { return e.report },
		OnRegistered: func(*llorchv1.Registered) { f.regs.add(e.idx, time.Now()) },
		OnAck:        f.acks.add,
	})
	if err != nil {
		f.fatal.Add(1)
		f.fatalErr.CompareAndSwap(nil, err.Error())
	}
}

// wait waits for every session to return, at most timeout.
func (f *fleet) wait(timeout time.Duration) bool {
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		return false
	}
	for _, e := range f.edges {
		e.hc.CloseIdleConnections()
	}
	return true
}

// dumpGoroutines writes every goroutine, grouped by stack and labelled by
// edge, to path.
func dumpGoroutines(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("goroutine").WriteTo(f, 1)
}

// latencies keeps every heartbeat acknowledgement round trip, by phase.
type latencies struct {
	mu      sync.Mutex
	phase   string
	samples map[string][]int64 // microseconds
	dropped int64
}

// maxSamples bounds memory: 10,000 edges at a 1s interval for 10 minutes.
const maxSamples = 6_000_000

func newLatencies() *latencies {
	return &latencies{phase: "ramp", samples: map[string][]int64{}}
}

func (l *latencies) add(rtt time.Duration) {
	l.mu.Lock()
	s := l.samples[l.phase]
	if len(s) < maxSamples {
		l.samples[l.phase] = append(s, rtt.Microseconds())
	} else {
		l.dropped++
	}
	l.mu.Unlock()
}

func (l *latencies) setPhase(p string) {
	l.mu.Lock()
	l.phase = p
	l.mu.Unlock()
}

// summary summarizes the phases named (all of them when none is named).
func (l *latencies) summary(phases ...string) Latency {
	l.mu.Lock()
	var all []int64
	for p, s := range l.samples {
		if len(phases) == 0 || slices.Contains(phases, p) {
			all = append(all, s...)
		}
	}
	l.mu.Unlock()
	return summarize(all)
}

func (l *latencies) count(phase string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.samples[phase])
}

// summarize sorts samples (microseconds) and reads off the percentiles.
func summarize(us []int64) Latency {
	if len(us) == 0 {
		return Latency{}
	}
	slices.Sort(us)
	pct := func(p float64) float64 {
		i := int(p*float64(len(us))+0.5) - 1
		return ms(us[min(max(i, 0), len(us)-1)])
	}
	var sum int64
	for _, v := range us {
		sum += v
	}
	return Latency{
		Count: len(us), MeanMS: ms(sum / int64(len(us))),
		P50MS: pct(0.50), P90MS: pct(0.90), P99MS: pct(0.99), P999MS: pct(0.999), MaxMS: ms(us[len(us)-1]),
	}
}

func ms(us int64) float64 { return float64(us) / 1000 }

// registrations counts session registrations: edges ever registered, and
// edges registered since a mark (the start of a restarted control plane).
type registrations struct {
	mu     sync.Mutex
	ever   []bool
	nEver  int
	total  int
	mark   time.Time
	since  []bool
	nSince int
	times  []time.Time // first registration of each edge since mark
}

func newRegistrations(n int) *registrations {
	return &registrations{ever: make([]bool, n), since: make([]bool, n)}
}

func (r *registrations) add(idx int, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.total++
	if !r.ever[idx] {
		r.ever[idx] = true
		r.nEver++
	}
	if !r.mark.IsZero() && !r.since[idx] {
		r.since[idx] = true
		r.nSince++
		r.times = append(r.times, at)
	}
}

// setMark starts counting registrations afresh from at.
func (r *registrations) setMark(at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.mark = at
	clear(r.since)
	r.nSince, r.times = 0, nil
}

func (r *registrations) counts() (ever, total, since int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nEver, r.total, r.nSince
}

// missingSince names up to max edges not registered since the mark.
func (r *registrations) missingSince(max int) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for i, ok := range r.since {
		if !ok && len(out) < max {
			out = append(out, edgeName(i))
		}
	}
	return out
}

func (r *registrations) sinceTimes() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.times)
}
