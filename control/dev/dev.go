// Package dev runs a complete single-machine deployment in one process: a
// control plane and one local edge enrolled with it (the origin's HOME
// profile), which is what `control dev` is. It is the one package that
// links both sides: the import rules (internal/importrules) allow it here
// and nowhere else, so the edge binary never carries the control plane and
// the control plane's packages never lean on the edge's.
package dev

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/control/adminclient"
	"github.com/llorch/llorch/control/server"
	edgeagent "github.com/llorch/llorch/edge/agent"
	edgeenroll "github.com/llorch/llorch/edge/enroll"
	edgestate "github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/version"
)

// Config configures a local deployment.
type Config struct {
	// Dir holds everything: the control plane's data in control/, the
	// edge's state in edge/, engine handoff files in engines/.
	Dir string
	// Server configures the control plane; its DataDir is Dir/control.
	Server server.Config
	// Out is where the banner goes: addresses and how to enroll another machine.
	Out io.Writer
	// Self is how the user ran the binary (e.g. bin/control), for the banner.
	Self   string
	Logger *slog.Logger // nil: discard
}

// Run runs the control plane and the local edge until ctx ends, then stops
// the edge first (it says goodbye, so its node is recorded offline) and the
// control plane after it.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	sc := cfg.Server
	sc.DataDir = filepath.Join(cfg.Dir, "control")
	sc.Logger = log.With("component", "control")
	srv, err := server.New(ctx, sc)
	if err != nil {
		return err
	}
	defer srv.Close()
	srvCtx, stopServer := context.WithCancel(context.Background())
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Run(srvCtx) }()
	defer func() { stopServer(); <-srvDone }()

	edgeDir, enginesDir := filepath.Join(cfg.Dir, "edge"), filepath.Join(cfg.Dir, "engines")
	res, err := enrollLocalEdge(ctx, sc.DataDir, edgeDir, srv.URL())
	if err != nil {
		return fmt.Errorf("local edge: %w", err)
	}
	// The local edge always dials this control plane, wherever it listens now.
	res.Identity.ControlURL = srv.URL()
	a := edgeagent.New(edgeagent.Config{StateDir: edgeDir, EnginesDir: enginesDir, Logger: log.With("component", "edge")}, res.Identity)
	edgeCtx, stopEdge := context.WithCancel(context.Background())
	edgeDone := make(chan error, 1)
	go func() { edgeDone <- a.Run(edgeCtx) }()
	defer func() { stopEdge(); <-edgeDone }()

	banner(cfg, srv, sc.DataDir, edgeDir, enginesDir, res.Identity)
	select {
	case <-ctx.Done():
		return nil
	case err := <-edgeDone:
		edgeDone <- err // for the deferred wait
		return fmt.Errorf("local edge: %w", err)
	case err := <-srvDone:
		srvDone <- err
		return err
	}
}

func banner(cfg Config, srv *server.Server, dataDir, edgeDir, enginesDir string, id edgestate.Identity) {
	out, self := cfg.Out, cfg.Self
	if out == nil {
		out = io.Discard
	}
	fmt.Fprintf(out, "llorch dev: control plane %s at %s (data %s)\n", version.Version, srv.URL(), dataDir)
	fmt.Fprintf(out, "CA fingerprint: %s\n", srv.Fingerprint())
	fmt.Fprintf(out, "local edge: node %s (%s), state %s, engine handoff files in %s\n\n", id.NodeID, id.NodeName, edgeDir, enginesDir)
	fmt.Fprintf(out, "In another terminal:\n")
	fmt.Fprintf(out, "  %s node list --data %s\n\n", self, dataDir)
	fmt.Fprintf(out, "To enroll another machine, serve on an address it can reach (with an API token), e.g.\n")
	fmt.Fprintf(out, "  LLORCH_API_TOKEN=$(openssl rand -hex 32) %s dev --listen 0.0.0.0:8443 --san <this machine's IP or name>\n", self)
	fmt.Fprintf(out, "then:\n")
	fmt.Fprintf(out, "  %s token create --data %s --name gpu-2 > token.txt\n", self, dataDir)
	fmt.Fprintf(out, "  edge enroll --control https://<this machine>:%s --token-file token.txt   (on the other machine)\n", port(srv.Addr()))
	fmt.Fprintf(out, "  edge run\n")
}

// enrollLocalEdge enrolls the local edge once; later runs find its identity
// and spend no token.
func enrollLocalEdge(ctx context.Context, dataDir, edgeDir, url string) (edgeenroll.Result, error) {
	if id, err := edgestate.Load(edgeDir); err == nil && !id.Expired(time.Now()) {
		return edgeenroll.Result{Identity: id, AlreadyEnrolled: true}, nil
	}
	admin, err := adminclient.Local(dataDir)
	if err != nil {
		return edgeenroll.Result{}, err
	}
	resp, err := admin.CreateJoinToken(ctx, connect.NewRequest(&llorchv1.CreateJoinTokenRequest{
		Name: "local", Ttl: durationpb.New(5 * time.Minute), Labels: map[string]string{"llorch.dev/profile": "home"},
	}))
	if err != nil {
		return edgeenroll.Result{}, err
	}
	hostname, _ := os.Hostname()
	return edgeenroll.Enroll(ctx, edgeenroll.Config{StateDir: edgeDir, ControlURL: url, Token: resp.Msg.GetToken(), Hostname: hostname})
}

func port(a net.Addr) string {
	_, p, _ := net.SplitHostPort(a.String())
	return p
}
