// Package metrics holds the control plane's Prometheus metrics, on a registry
// of their own (no global state), served at /metrics.
package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the control plane's counters and gauges. A nil *Metrics is
// valid and records nothing, so packages can take one optionally.
type Metrics struct {
	Registry     *prometheus.Registry
	Sessions     prometheus.Gauge
	Heartbeats   prometheus.Counter
	Enrollments  *prometheus.CounterVec // result: ok, refused
	Renewals     *prometheus.CounterVec // result: ok, refused
	Transitions  *prometheus.CounterVec // from, to
	StoreErrors  prometheus.Counter
	Paced        prometheus.Counter
	ConnsRefused *prometheus.CounterVec // reason: the cap a new connection was over
	RateLimited  *prometheus.CounterVec // limit: enroll, credentials, node_sessions, node_renewals
	nodes        *nodesCollector
	conns        *connsCollector
}

// New registers every metric, plus Go runtime and process metrics.
func New() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		Sessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "llorch_sessions", Help: "Edge sessions currently connected.",
		}),
		Heartbeats: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "llorch_heartbeats_total", Help: "Heartbeats received from edges.",
		}),
		Enrollments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_enrollments_total", Help: "Enrollment attempts by result.",
		}, []string{"result"}),
		Renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_renewals_total", Help: "Certificate renewals by result.",
		}, []string{"result"}),
		Transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_node_transitions_total", Help: "Node status transitions.",
		}, []string{"from", "to"}),
		StoreErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "llorch_store_write_errors_total", Help: "Failed writes of liveness state to the store (retried).",
		}),
		Paced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "llorch_sessions_paced_total", Help: "New sessions told to retry later because too many were registering at once.",
		}),
		ConnsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_conns_refused_total", Help: "Connections to the public port closed at once, by the cap they were over.",
		}, []string{"reason"}),
		RateLimited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "llorch_rate_limited_total", Help: "Calls refused by a rate limit, by limit.",
		}, []string{"limit"}),
		nodes: &nodesCollector{desc: prometheus.NewDesc("llorch_nodes", "Nodes by status.", []string{"status"}, nil)},
		conns: &connsCollector{desc: prometheus.NewDesc("llorch_public_conns", "Open connections to the public port; class unauthenticated counts those in their handshake or without a client certificate.", []string{"class"}, nil)},
	}
	m.Registry.MustRegister(m.Sessions, m.Heartbeats, m.Enrollments, m.Renewals, m.Transitions, m.StoreErrors, m.Paced,
		m.ConnsRefused, m.RateLimited, m.nodes, m.conns,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// CountNodes sets the function the nodes-by-status gauge is read from at
// each scrape (counting at scrape time keeps it off the registry's hot path).
func (m *Metrics) CountNodes(count func() map[string]int) {
	if m != nil {
		m.nodes.mu.Lock()
		m.nodes.count = count
		m.nodes.mu.Unlock()
	}
}

type nodesCollector struct {
	desc  *prometheus.Desc
	mu    sync.Mutex
	count func() map[string]int
}

func (c *nodesCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *nodesCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	count := c.count
	c.mu.Unlock()
	if count == nil {
		return
	}
	for status, n := range count() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), status)
	}
}

// Heartbeat counts one heartbeat.
func (m *Metrics) Heartbeat() {
	if m != nil {
		m.Heartbeats.Inc()
	}
}

// SessionOpened and SessionClosed track connected sessions.
func (m *Metrics) SessionOpened() {
	if m != nil {
		m.Sessions.Inc()
	}
}

// SessionClosed is the counterpart of SessionOpened.
func (m *Metrics) SessionClosed() {
	if m != nil {
		m.Sessions.Dec()
	}
}

// Transition counts a status change.
func (m *Metrics) Transition(from, to string) {
	if m != nil {
		m.Transitions.WithLabelValues(from, to).Inc()
	}
}

// Enrollment counts an enrollment attempt.
func (m *Metrics) Enrollment(ok bool) {
	if m != nil {
		m.Enrollments.WithLabelValues(result(ok)).Inc()
	}
}

// Renewal counts a renewal attempt.
func (m *Metrics) Renewal(ok bool) {
	if m != nil {
		m.Renewals.WithLabelValues(result(ok)).Inc()
	}
}

// StoreError counts a failed liveness write.
func (m *Metrics) StoreError() {
	if m != nil {
		m.StoreErrors.Inc()
	}
}

func result(ok bool) string {
	if ok {
		return "ok"
	}
	return "refused"
}

// ConnRefused counts a connection closed at once for being over a cap.
func (m *Metrics) ConnRefused(reason string) {
	if m != nil {
		m.ConnsRefused.WithLabelValues(reason).Inc()
	}
}

// Limited counts a call refused by the rate limit named limit.
func (m *Metrics) Limited(limit string) {
	if m != nil {
		m.RateLimited.WithLabelValues(limit).Inc()
	}
}

// CountConns sets the function the public port's connection gauges are
// read from at each scrape: all open connections, and the unauthenticated.
func (m *Metrics) CountConns(count func() (all, unauth int)) {
	if m != nil {
		m.conns.mu.Lock()
		m.conns.count = count
		m.conns.mu.Unlock()
	}
}

type connsCollector struct {
	desc  *prometheus.Desc
	mu    sync.Mutex
	count func() (int, int)
}

func (c *connsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *connsCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	count := c.count
	c.mu.Unlock()
	if count == nil {
		return
	}
	all, unauth := count()
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(all), "all")
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(unauth), "unauthenticated")
}

// SessionPaced counts a session told to retry later.
func (m *Metrics) SessionPaced() {
	if m != nil {
		m.Paced.Inc()
	}
}
