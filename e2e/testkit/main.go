// Command testkit is the one helper the test images carry besides the real
// binaries. The product images hold nothing but control or edge, so the
// suites put testkit in a separate test-only image (with a copy of edge) and
// run it as sidecars: a network probe placed like the control plane, a fake
// inference engine that hands itself over to an edge, a disk filler sharing
// the control plane's data volume, and a runner that bounds commands exec'd
// into a container. It is static (CGO_ENABLED=0) and runs in a scratch image.
//
//	testkit sleep                          block until SIGTERM (keeps a sidecar up)
//	testkit dial [-timeout D] ADDR...      try a TCP connection to each address
//	testkit engine -listen ADDR -handoff FILE -pool P -replica R -url U [-model M]
//	testkit fill [-leave BYTES] FILE       write FILE until the disk is full
//	testkit rm FILE...                     remove files
//	testkit run [-timeout D] -- CMD ARG... run CMD, SIGKILL it after D (exit 124)
//
// dial prints one line per address, "<addr> <result> <detail>", where result
// is connected, refused, unreachable, timeout or dns; it exits 0 once every
// address was tried, whatever the results.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		var exit exitCode
		if errors.As(err, &exit) {
			os.Exit(int(exit))
		}
		fmt.Fprintf(os.Stderr, "testkit: %s\n", err)
		os.Exit(1)
	}
}

// exitCode is an error that only carries the exit status to pass on.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func run(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: testkit sleep|dial|engine|fill|rm|run ...")
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "sleep":
		<-ctx.Done()
		return nil
	case "dial":
		return dial(ctx, args, out)
	case "engine":
		return engine(ctx, args, out)
	case "fill":
		return fill(args, out)
	case "rm":
		for _, f := range args {
			if err := os.Remove(f); err != nil {
				return err
			}
		}
		return nil
	case "run":
		return bounded(ctx, args)
	}
	return fmt.Errorf("unknown command %q", cmd)
}

func dial(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("dial", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 2*time.Second, "limit per address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("dial: no address")
	}
	for _, addr := range fs.Args() {
		result, detail := classify(ctx, addr, *timeout)
		fmt.Fprintf(out, "%s %s %s\n", addr, result, detail)
	}
	return nil
}

// classify dials addr once and names the outcome. "refused" means a host
// answered (with a reset), so the address is reachable; "unreachable",
// "timeout" and "dns" mean no packet came back.
func classify(ctx context.Context, addr string, timeout time.Duration) (string, string) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		c.Close()
		return "connected", "-"
	}
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr):
		return "dns", dnsErr.Err
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused", err.Error()
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable", err.Error()
	case errors.Is(err, context.DeadlineExceeded), os.IsTimeout(err):
		return "timeout", "no answer within " + timeout.String()
	}
	return "error", err.Error()
}

// engine hands a fake engine replica over to an edge the way a provisioner
// does (a handoff file written to a hidden name, then renamed), then serves
// GET /health until stopped, when it takes the file back.
func engine(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("engine", flag.ContinueOnError)
	listen := fs.String("listen", ":8080", "address to serve /health on")
	file := fs.String("handoff", "", "handoff file to write (in the edge's engines directory)")
	pool := fs.String("pool", "", "pool_id")
	replica := fs.String("replica", "", "replica_id")
	url := fs.String("url", "", "url the edge probes (this engine, as the edge reaches it)")
	model := fs.String("model", "", "model id")
	slots := fs.Int("slots", 1, "slots")
	if err := fs.Parse(args); err != nil {
		return err
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/health" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintln(w, `{"status":"ok"}`)
	})}
	go srv.Serve(l)
	defer srv.Close()
	if *file != "" {
		doc := map[string]any{
			"pool_id": *pool, "replica_id": *replica, "engine": "fake", "engine_version": "0.0.1",
			"url": *url, "slots": *slots, "pid": os.Getpid(),
		}
		if *model != "" {
			doc["model"] = *model
		}
		data, err := json.MarshalIndent(doc, "", "  ")
		if err != nil {
			return err
		}
		tmp := filepath.Join(filepath.Dir(*file), "."+filepath.Base(*file)+".tmp")
		if err := os.WriteFile(tmp, data, 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, *file); err != nil {
			return err
		}
		defer os.Remove(*file)
	}
	fmt.Fprintf(out, "engine serving on %s\n", l.Addr())
	<-ctx.Done()
	return nil
}

// fill writes zeros to file until the file system is full, then gives back
// leave bytes, so that only writes that need more than that fail.
func fill(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("fill", flag.ContinueOnError)
	leave := fs.Int64("leave", 0, "bytes to give back after the disk is full")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("fill: want one file")
	}
	f, err := os.OpenFile(fs.Arg(0), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	var written int64
	for {
		n, err := f.Write(buf)
		written += int64(n)
		if errors.Is(err, syscall.ENOSPC) {
			break
		}
		if err != nil {
			return err
		}
	}
	// Whatever is left is less than one buffer: fill it byte by byte.
	for {
		n, err := f.Write(buf[:1])
		written += int64(n)
		if err != nil {
			break
		}
	}
	if *leave > 0 {
		written -= min(*leave, written)
		if err := f.Truncate(written); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil && !errors.Is(err, syscall.ENOSPC) {
		return err
	}
	fmt.Fprintf(out, "filled %s with %d bytes\n", fs.Arg(0), written)
	return nil
}

// bounded runs a command and kills it when the timeout passes, so that a
// command exec'd into a container never outlives the test's wait for it.
func bounded(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 30*time.Second, "limit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("run: no command")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, fs.Arg(0), fs.Args()[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		fmt.Fprintf(os.Stderr, "testkit: %s killed after %s\n", fs.Arg(0), *timeout)
		return exitCode(124)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return exitCode(ee.ExitCode())
	}
	return err
}
