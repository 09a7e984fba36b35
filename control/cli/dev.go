package cli

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/edge/agent"
	"github.com/llorch/llorch/edge/enroll"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/logging"
	"github.com/llorch/llorch/internal/version"
)

func newDevCmd() *cobra.Command {
	cfg := server.DefaultConfig()
	var dir, logLevel string
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a complete single-machine deployment: control plane plus one local edge",
		Long: `Run the control plane and one edge on this machine, on the default settings,
with all state under --dir (default .llorch). The edge enrolls once with a
token made on the spot; later runs reuse its identity. Stop with Ctrl-C.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := logging.New(cmd.ErrOrStderr(), "text", logLevel)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			cfg.DataDir = filepath.Join(dir, "control")
			cfg.Logger = logger.With("component", "control")
			cfg.APIToken = os.Getenv("LLORCH_API_TOKEN")
			cfg.TuneGC = tuneGC()
			cfg.Version = version.Version
			srv, err := server.New(ctx, cfg)
			if err != nil {
				return err
			}
			defer srv.Close()
			// The control plane stops after the edge (which says goodbye, so
			// its node is recorded offline), and Close waits for it to stop.
			srvCtx, stopServer := context.WithCancel(context.Background())
			srvDone := make(chan error, 1)
			go func() { srvDone <- srv.Run(srvCtx) }()
			defer func() { stopServer(); <-srvDone }()

			edgeDir := filepath.Join(dir, "edge")
			res, err := enrollLocalEdge(ctx, cfg.DataDir, edgeDir, srv.URL())
			if err != nil {
				return fmt.Errorf("local edge: %w", err)
			}
			// The local edge always dials this control plane, wherever it listens now.
			res.Identity.ControlURL = srv.URL()
			a := agent.New(agent.Config{StateDir: edgeDir, EnginesDir: filepath.Join(dir, "engines"), Logger: logger.With("component", "edge")}, res.Identity)
			edgeCtx, stopEdge := context.WithCancel(context.Background())
			edgeDone := make(chan error, 1)
			go func() { edgeDone <- a.Run(edgeCtx) }()
			defer func() { stopEdge(); <-edgeDone }()

			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "llorch dev: control plane %s at %s (data %s)\n", version.Version, srv.URL(), cfg.DataDir)
			fmt.Fprintf(out, "CA fingerprint: %s\n", srv.Fingerprint())
			fmt.Fprintf(out, "local edge: node %s (%s), state %s, engine handoff files in %s\n\n", res.Identity.NodeID, res.Identity.NodeName, edgeDir, filepath.Join(dir, "engines"))
			self := os.Args[0] // as the user ran it, e.g. bin/control
			fmt.Fprintf(out, "In another terminal:\n")
			fmt.Fprintf(out, "  %s node list --data %s\n\n", self, cfg.DataDir)
			fmt.Fprintf(out, "To enroll another machine, serve on an address it can reach (with an API token), e.g.\n")
			fmt.Fprintf(out, "  LLORCH_API_TOKEN=$(openssl rand -hex 32) %s dev --listen 0.0.0.0:8443 --san <this machine's IP or name>\n", self)
			fmt.Fprintf(out, "then:\n")
			fmt.Fprintf(out, "  %s token create --data %s --name gpu-2 > token.txt\n", self, cfg.DataDir)
			fmt.Fprintf(out, "  edge enroll --control https://<this machine>:%s --token-file token.txt   (on the other machine)\n", port(srv.Addr()))
			fmt.Fprintf(out, "  edge run\n")
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
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", ".llorch", "directory for the control plane's data and the local edge's state")
	f.StringVar(&cfg.Listen, "listen", server.DefaultListen, "address of the TLS port")
	addFleetFlags(f, &cfg)
	f.StringArrayVar(&cfg.SANs, "san", nil, "extra DNS name or IP for the server certificate (repeatable)")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

// enrollLocalEdge enrolls the local edge once; later runs find its identity
// and spend no token.
func enrollLocalEdge(ctx context.Context, dataDir, edgeDir, url string) (enroll.Result, error) {
	if id, err := state.Load(edgeDir); err == nil && !id.Expired(time.Now()) {
		return enroll.Result{Identity: id, AlreadyEnrolled: true}, nil
	}
	t := target{dataDir: dataDir}
	admin, err := t.adminClient()
	if err != nil {
		return enroll.Result{}, err
	}
	resp, err := admin.CreateJoinToken(ctx, connect.NewRequest(&llorchv1.CreateJoinTokenRequest{
		Name: "local", Ttl: durationpb.New(5 * time.Minute), Labels: map[string]string{"llorch.dev/profile": "home"},
	}))
	if err != nil {
		return enroll.Result{}, err
	}
	hostname, _ := os.Hostname()
	return enroll.Enroll(ctx, enroll.Config{StateDir: edgeDir, ControlURL: url, Token: resp.Msg.GetToken(), Hostname: hostname})
}

func port(a net.Addr) string {
	_, p, _ := net.SplitHostPort(a.String())
	return p
}
