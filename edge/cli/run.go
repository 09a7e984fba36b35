package cli

import (
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/edge/agent"
	"github.com/llorch/llorch/edge/handoff"
	"github.com/llorch/llorch/internal/logging"
)

func newRunCmd() *cobra.Command {
	var dir, enginesDir, logFormat, logLevel string
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the agent: hold the session with the control plane, report GPUs and engines, renew the certificate",
		Long: `Run the agent as the enrolled node. It dials out to the control plane and holds
one long-lived session over mutual TLS: it registers, then heartbeats with its
GPU inventory (NVML) and its engine pools (handoff files in --engines-dir), and
takes commands (drain, undrain, renew now, disconnect). It never listens on a
port, so it works behind NAT. A lost session is retried with exponential
backoff and full jitter.

It renews the node certificate at about 2/3 of its lifetime with a fresh key.
On SIGTERM or Ctrl-C it says goodbye, so the node is offline at once. If the
certificate expired while the machine was offline, or the node was removed, it
says so and exits: enroll again with a new token.

It holds a lock on the state directory (STATE/edge.lock) while it runs, so a
second agent on the same directory is refused.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := logging.New(cmd.ErrOrStderr(), logFormat, logLevel)
			if err != nil {
				return err
			}
			id, err := loadIdentity(dir, time.Now())
			if err != nil {
				return err
			}
			a := agent.New(agent.Config{StateDir: dir, EnginesDir: enginesDir, Logger: logger}, id)
			return a.Run(cmd.Context())
		},
	}
	addStateFlag(cmd, &dir)
	cmd.Flags().StringVar(&enginesDir, "engines-dir", envOrDefault("LLORCH_ENGINES_DIR", handoff.DefaultDir), "directory of engine handoff files (*.json) [LLORCH_ENGINES_DIR]")
	cmd.Flags().StringVar(&logFormat, "log-format", "text", "log format: text or json")
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

func envOrDefault(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
