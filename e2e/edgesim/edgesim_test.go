package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseMetrics(t *testing.T) {
	const text = `# HELP llorch_sessions Edge sessions currently connected.
# TYPE llorch_sessions gauge
llorch_sessions 9998
go_memstats_heap_inuse_bytes 6.48847360e+08
llorch_node_transitions_total{from="online",to="offline"} 3
llorch_node_transitions_total{from="unknown",to="offline"} 2
llorch_node_transitions_total{from="unknown",to="online"} 10000
`
	m, err := parseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		match []string
		want  float64
	}{
		{"llorch_sessions", nil, 9998},
		{"go_memstats_heap_inuse_bytes", nil, 648847360},
		{"llorch_node_transitions_total", []string{`to="offline"`}, 5},
		{"llorch_node_transitions_total", nil, 10005},
		{"llorch_missing", nil, 0},
	}
	for _, tt := range tests {
		if got := m.sum(tt.name, tt.match...); got != tt.want {
			t.Errorf("sum(%s, %v) = %v, want %v", tt.name, tt.match, got, tt.want)
		}
	}
}

func TestSummarize(t *testing.T) {
	us := make([]int64, 0, 1000)
	for i := 1000; i >= 1; i-- { // 1..1000 microseconds, unsorted
		us = append(us, int64(i))
	}
	got := summarize(us)
	want := Latency{Count: 1000, MeanMS: 0.5, P50MS: 0.5, P90MS: 0.9, P99MS: 0.99, P999MS: 0.999, MaxMS: 1}
	if got != want {
		t.Errorf("summarize = %+v, want %+v", got, want)
	}
	if got := summarize(nil); got != (Latency{}) {
		t.Errorf("summarize(nil) = %+v, want zero", got)
	}
}

func TestRegistrationsSinceMark(t *testing.T) {
	r := newRegistrations(3)
	t0 := time.Now()
	r.add(0, t0)
	r.add(1, t0)
	r.add(0, t0) // a re-registration
	if ever, total, since := r.counts(); ever != 2 || total != 3 || since != 0 {
		t.Fatalf("before the mark: ever %d total %d since %d, want 2 3 0", ever, total, since)
	}
	r.setMark(t0)
	r.add(2, t0.Add(time.Second))
	r.add(2, t0.Add(2*time.Second)) // counted once
	r.add(0, t0.Add(3*time.Second))
	if ever, _, since := r.counts(); ever != 3 || since != 2 {
		t.Fatalf("after the mark: ever %d since %d, want 3 2", ever, since)
	}
	if times := r.sinceTimes(); len(times) != 2 || !times[0].Equal(t0.Add(time.Second)) {
		t.Errorf("since times = %v, want the first registration of each edge", times)
	}
}

func TestConfigValidate(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "control")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		edit    func(*Config)
		wantErr string
	}{
		{"defaults", func(*Config) {}, ""},
		{"no edges", func(c *Config) { c.Edges = 0 }, "--edges"},
		{"offline too soon", func(c *Config) { c.OfflineAfter = c.HeartbeatInterval }, "--offline-after"},
		{"batch above a token's uses", func(c *Config) { c.EnrollBatch = 1001 }, "--enroll-batch"},
		{"no binary", func(c *Config) { c.ControlBin = filepath.Join(t.TempDir(), "missing") }, "--control-bin"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.ControlBin = bin
			tt.edit(&cfg)
			err := cfg.Validate()
			if tt.wantErr == "" && err != nil {
				t.Fatalf("Validate() = %v, want nil", err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("Validate() = %v, want an error naming %s", err, tt.wantErr)
			}
		})
	}
}

func TestParseFlags(t *testing.T) {
	cfg, err := parseFlags([]string{"--edges", "200", "--heartbeat-interval", "1s", "--offline-after", "3s", "--restart=false"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Edges != 200 || cfg.HeartbeatInterval != time.Second || cfg.OfflineAfter != 3*time.Second || cfg.Restart {
		t.Errorf("parseFlags = %+v", cfg)
	}
	if _, err := parseFlags([]string{"extra"}, io.Discard); err == nil {
		t.Error("parseFlags accepted a positional argument")
	}
}
