package cli

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/llorch/llorch/control/adminclient"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

// target says how admin commands reach a control plane: the local socket in
// a data directory, or a remote URL with an API token.
type target struct {
	dataDir       string
	server        string
	caFingerprint string
}

func (t *target) addFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&t.dataDir, "data", envOr("LLORCH_DATA", defaultDataDir()), "data directory of a local control plane (its admin socket) [LLORCH_DATA]")
	cmd.Flags().StringVar(&t.server, "server", os.Getenv("LLORCH_SERVER"), "URL of a remote control plane, used with LLORCH_API_TOKEN instead of the local socket [LLORCH_SERVER]")
	cmd.Flags().StringVar(&t.caFingerprint, "ca-fingerprint", os.Getenv("LLORCH_CA_FINGERPRINT"), "with --server: the CA fingerprint to trust, as `control ca show` prints it [LLORCH_CA_FINGERPRINT]")
}

// adminClient returns an AdminService client for the target.
func (t *target) adminClient() (llorchv1connect.AdminServiceClient, error) {
	if t.server == "" {
		return adminclient.Local(t.dataDir)
	}
	return adminclient.Remote(t.server, t.caFingerprint, os.Getenv("LLORCH_API_TOKEN"))
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
