package cli

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/control/dev"
	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/internal/logging"
	"github.com/llorch/llorch/internal/version"
)

func newDevCmd() *cobra.Command {
	cfg := dev.Config{Server: server.DefaultConfig()}
	var logLevel string
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
			cfg.Server.APIToken = os.Getenv("LLORCH_API_TOKEN")
			cfg.Server.TuneGC = tuneGC()
			cfg.Server.Version = version.Version
			cfg.Out, cfg.Self, cfg.Logger = cmd.OutOrStdout(), os.Args[0], logger
			return dev.Run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Dir, "dir", ".llorch", "directory for the control plane's data and the local edge's state")
	f.StringVar(&cfg.Server.Listen, "listen", server.DefaultListen, "address of the TLS port")
	addFleetFlags(f, &cfg.Server)
	f.StringArrayVar(&cfg.Server.SANs, "san", nil, "extra DNS name or IP for the server certificate (repeatable)")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}
