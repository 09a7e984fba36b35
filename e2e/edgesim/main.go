// Command edgesim is a load tool: it simulates a fleet of edges against a
// real control plane process and reports what it measured. It starts the
// control plane itself (--control-bin) on a free loopback port with a data
// directory of its own, enrolls --edges identities through edge/enroll,
// opens one edge/session per identity, each over its own mTLS HTTP/2
// connection, holds the fleet for --duration, then restarts the control
// plane (SIGTERM, then SIGKILL) and times how fast the fleet comes back.
//
// Figures: enrollment rate, heartbeat acknowledgement round trips (p50, p90,
// p99, max), the control plane's memory per session (RSS, and what is live
// right after a garbage collection: Go heap and stacks, with a heap profile
// from the admin socket's profiler; both against a baseline with every node
// enrolled and none connected), and the
// reconnection time and spread after each restart. A summary goes to stdout,
// progress to stderr, everything to --json FILE.
//
// It only ever uses loopback addresses, every wait is bounded, and the
// control plane child and the temporary directory are removed on exit (also
// on Ctrl-C; --keep keeps the directory).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	if os.Getenv(workerEnv) != "" {
		code := runEnrollWorker(ctx, os.Stdin, os.Stdout)
		stop()
		os.Exit(code)
	}
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		fmt.Fprintf(stderr, "edgesim: %v\n", err)
		return 2
	}
	res, err := New(cfg, stderr).Run(ctx)
	if res != nil {
		printSummary(stdout, res)
		if cfg.JSONPath != "" {
			if werr := writeJSON(cfg.JSONPath, res); werr != nil {
				fmt.Fprintf(stderr, "edgesim: %v\n", werr)
				return 1
			}
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "edgesim: %v\n", err)
		return 1
	}
	return 0
}

func parseFlags(args []string, stderr io.Writer) (Config, error) {
	cfg := DefaultConfig()
	fs := flag.NewFlagSet("edgesim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, `edgesim simulates many edges against a real control plane process and reports
enrollment rate, heartbeat acknowledgement latency, control-plane memory per
session, and reconnection time after a graceful (SIGTERM) and a hard (SIGKILL)
restart of the control plane.

Usage:
  go tool task build
  go run ./e2e/edgesim --control-bin bin/control --edges 10000 --json edgesim.json

Flags:
`)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.ControlBin, "control-bin", cfg.ControlBin, "control plane binary to run (go tool task build makes bin/control)")
	fs.StringVar(&cfg.DataDir, "data", "", "control plane data directory (default: a new one in the temporary directory)")
	fs.IntVar(&cfg.Edges, "edges", cfg.Edges, "how many edges to simulate")
	fs.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", cfg.HeartbeatInterval, "heartbeat interval the control plane sets")
	fs.DurationVar(&cfg.OfflineAfter, "offline-after", cfg.OfflineAfter, "control plane's offline threshold")
	fs.DurationVar(&cfg.Duration, "duration", cfg.Duration, "how long to hold the fleet once every edge is registered")
	fs.IntVar(&cfg.RampRate, "ramp-rate", cfg.RampRate, "session connects per second while the fleet comes up")
	fs.IntVar(&cfg.EnrollConcurrency, "enroll-concurrency", cfg.EnrollConcurrency, "enrollments in flight at once")
	fs.IntVar(&cfg.EnrollBatch, "enroll-batch", cfg.EnrollBatch, "enrollments per join token and per worker process (at most 1000)")
	fs.BoolVar(&cfg.Restart, "restart", cfg.Restart, "restart the control plane (SIGTERM, then SIGKILL) and time the reconnection")
	fs.DurationVar(&cfg.RestartTimeout, "restart-timeout", cfg.RestartTimeout, "give up waiting for the fleet to come back after this long")
	fs.StringVar(&cfg.JSONPath, "json", "", "write every figure as JSON to this file")
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the temporary directory (data, edge state, control plane logs)")
	fs.StringVar(&cfg.ControlLogLevel, "control-log-level", cfg.ControlLogLevel, "the control plane's --log-level (its logs go to files in the temporary directory)")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0))
	}
	return cfg, nil
}

// DefaultConfig is the production timing and a modest fleet.
func DefaultConfig() Config {
	return Config{
		ControlBin:        "bin/control",
		Edges:             1000,
		HeartbeatInterval: 10 * time.Second,
		OfflineAfter:      30 * time.Second,
		Duration:          60 * time.Second,
		RampRate:          500,
		EnrollConcurrency: 32,
		EnrollBatch:       1000,
		Restart:           true,
		RestartTimeout:    120 * time.Second,
		ControlLogLevel:   "info",
	}
}
