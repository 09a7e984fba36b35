package cli

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/certs"
)

func newCACmd() *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "Inspect the control plane's certificate authority"}
	var dataDir string
	var asPEM bool
	show := &cobra.Command{
		Use:   "show",
		Short: "Print the CA fingerprint (SHA-256 of the root certificate)",
		Long: `Print the CA fingerprint that join tokens carry and edges pin. It reads the
root certificate from the data directory, so it works with the server stopped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			path := filepath.Join(dataDir, "ca", "root.crt")
			data, err := os.ReadFile(path)
			if errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("no CA in %s: `control serve --data %s` creates one on first start", dataDir, dataDir)
			}
			if err != nil {
				return err
			}
			roots, err := certs.ParseCertsPEM(data)
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if asPEM {
				_, err := cmd.OutOrStdout().Write(certs.EncodeCertsPEM(roots[:1]))
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), certs.Fingerprint(roots[0]))
			return nil
		},
	}
	show.Flags().StringVar(&dataDir, "data", envOr("LLORCH_DATA", defaultDataDir()), "data directory [LLORCH_DATA]")
	show.Flags().BoolVar(&asPEM, "pem", false, "print the root certificate as PEM instead")
	cmd.AddCommand(show)
	return cmd
}
