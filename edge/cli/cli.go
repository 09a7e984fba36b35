// Package cli is the `edge` command: enroll a machine, show its identity as
// the control plane sees it, and run the agent.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/enroll"
	"github.com/llorch/llorch/edge/state"
	"github.com/llorch/llorch/internal/version"
)

// Main runs the command line and returns the process exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := &cobra.Command{
		Use:           "edge",
		Short:         "llorch edge agent: enrolls this GPU machine and keeps it connected to the control plane",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetArgs(args)
	root.AddCommand(newEnrollCmd(), newStatusCmd(), newRunCmd())
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(stderr, "edge: %s\n", lastLine(err))
		return 1
	}
	return 0
}

// lastLine is the one line the command prints when it fails: the error, and
// what the operator can do about it.
func lastLine(err error) string {
	line := strings.Join(strings.Fields(err.Error()), " ")
	if h := hint(err); h != "" {
		line += "; " + h
	}
	return line
}

// hint says what the operator can do about err; "" when the error says it.
func hint(err error) string {
	const enrollAgain = "enroll again with a new token (edge enroll --token-file FILE --control URL)"
	switch {
	case errors.Is(err, edge.ErrRevoked):
		// The identity on disk still looks valid, so enroll would keep it.
		return "move this node's state directory away, then " + enrollAgain
	case errors.Is(err, edge.ErrSuperseded):
		return "another machine may hold this node's identity; move this node's state directory away, then " + enrollAgain
	case errors.Is(err, edge.ErrCertExpired):
		return "the machine was probably offline past its renewal; " + enrollAgain
	}
	return ""
}

func defaultStateDir() string {
	if d := os.Getenv("LLORCH_EDGE_STATE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "llorch-edge")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "llorch-edge")
	}
	return "llorch-edge"
}

func addStateFlag(cmd *cobra.Command, dir *string) {
	cmd.Flags().StringVar(dir, "state", defaultStateDir(), "state directory holding this node's key and certificates [LLORCH_EDGE_STATE]")
}

func newEnrollCmd() *cobra.Command {
	var cfg enroll.Config
	var tokenFile string
	var tokenFlag string
	cmd := &cobra.Command{
		Use:   "enroll",
		Short: "Enroll this machine with a join token",
		Long: `Enroll this machine: make a key here, check that the control plane is the one the
token pins (before sending the token), and store the signed certificate.

The token comes from --token-file, LLORCH_ENROLL_TOKEN or --token, in that
order of preference (a token on the command line shows up in process lists).
With a valid identity already in the state directory, enroll spends no token.
While the control plane rate-limits enrollments, enroll waits as it asks and
tries again (a line on stderr each time), for up to 2 minutes.`,
		Example: `  edge enroll --control https://cp.example:8443 --token-file /run/secrets/llorch-token
  LLORCH_ENROLL_TOKEN=llorch1.... edge enroll --control https://127.0.0.1:8443`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			token, err := readToken(tokenFlag, tokenFile)
			if err != nil {
				return err
			}
			cfg.Token = token
			cfg.Hostname, _ = os.Hostname()
			cfg.Progress = cmd.ErrOrStderr() // "enrollment rate-limited ...; retrying in 3s"
			res, err := enroll.Enroll(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			id := res.Identity
			out := cmd.OutOrStdout()
			if res.AlreadyEnrolled {
				fmt.Fprintf(out, "already enrolled as node %s (%s); certificate valid until %s; no token spent\n", id.NodeID, id.NodeName, id.NotAfter().Local().Format(time.RFC3339))
				return nil
			}
			_, certPath, caPath := state.CurrentPaths(cfg.StateDir)
			fmt.Fprintf(out, "enrolled as node %s (%s) with %s\n", id.NodeID, id.NodeName, id.ControlURL)
			fmt.Fprintf(out, "identity: %s, valid until %s\n", id.SPIFFEID, id.NotAfter().Local().Format(time.RFC3339))
			fmt.Fprintf(out, "certificate: %s (CA bundle %s)\n", certPath, caPath)
			fmt.Fprintf(out, "next: edge run --state %s\n", cfg.StateDir)
			return nil
		},
	}
	addStateFlag(cmd, &cfg.StateDir)
	f := cmd.Flags()
	f.StringVar(&cfg.ControlURL, "control", os.Getenv("LLORCH_CONTROL_URL"), "control plane URL, https://host:port [LLORCH_CONTROL_URL]")
	f.StringVar(&tokenFlag, "token", "", "join token (prefer --token-file or LLORCH_ENROLL_TOKEN)")
	f.StringVar(&tokenFile, "token-file", "", "file holding the join token")
	return cmd
}

// readToken takes the token from a file, the environment or the flag.
func readToken(flag, file string) (string, error) {
	switch {
	case file != "":
		data, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("--token-file: %w", err)
		}
		return strings.TrimSpace(string(data)), nil
	case os.Getenv("LLORCH_ENROLL_TOKEN") != "":
		return os.Getenv("LLORCH_ENROLL_TOKEN"), nil
	case flag != "":
		return flag, nil
	}
	return "", errors.New("no join token: give --token-file FILE, LLORCH_ENROLL_TOKEN or --token (create one with `control token create`)")
}
