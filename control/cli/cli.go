// Package cli is the `control` command: the control plane's server and its
// admin commands. Admin commands talk to a running control plane through its
// local socket (--data) or a remote URL (--server with LLORCH_API_TOKEN).
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/llorch/llorch/internal/version"
)

// Main runs the command line and returns the process exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(stderr, "control: %s\n", errorLine(err))
		return 1
	}
	return 0
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "control",
		Short:         "llorch control plane: enrolls GPU machines and keeps track of them",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(newServeCmd(), newDevCmd(), newTokenCmd(), newNodeCmd(), newCACmd())
	return root
}

// errorLine is the one line a failed command prints: a Connect error's
// message without its code prefix.
func errorLine(err error) string {
	var cerr *connect.Error
	if errors.As(err, &cerr) {
		if cerr.Code() == connect.CodeUnavailable {
			return "control plane unavailable: " + cerr.Message()
		}
		return cerr.Message()
	}
	return err.Error()
}

func defaultDataDir() string {
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "llorch")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "llorch")
	}
	return "llorch-data"
}
