package cli

import (
	"time"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/edge/agent"
	"github.com/llorch/llorch/internal/logging"
)

func newRunCmd() *cobra.Command {
	var dir, logFormat, logLevel string
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the agent: check in with the control plane and keep the certificate renewed",
		Long: `Run the agent as the enrolled node. It only ever dials out to the control plane
and never listens on a port. It renews the node certificate at about 2/3 of its
lifetime with a fresh key. If the certificate expired while the machine was
offline, it says so and exits: enroll again with a new token.`,
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
			a := agent.New(agent.Config{StateDir: dir, Logger: logger}, id)
			return a.Run(cmd.Context())
		},
	}
	addStateFlag(cmd, &dir)
	cmd.Flags().StringVar(&logFormat, "log-format", "text", "log format: text or json")
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}
