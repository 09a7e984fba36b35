package cli

import (
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// loadIdentity loads the identity and refuses an expired one with the way back.
func loadIdentity(dir string, now time.Time) (state.Identity, error) {
	id, err := state.Load(dir)
	if errors.Is(err, state.ErrNotEnrolled) {
		return state.Identity{}, fmt.Errorf("not enrolled: no identity in %s; run `edge enroll --token-file FILE --control URL --state %s` first", dir, dir)
	}
	if err != nil {
		return state.Identity{}, err
	}
	if id.Expired(now) {
		return id, fmt.Errorf("node %s: %w at %s", id.NodeID, edge.ErrCertExpired, id.NotAfter().Local().Format(time.RFC3339))
	}
	return id, nil
}

func newStatusCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Ask the control plane, as this node, who this node is",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			id, err := loadIdentity(dir, time.Now())
			if err != nil {
				return err
			}
			resp, err := client.NodeClient(client.NewIdentity(id)).WhoAmI(cmd.Context(), connect.NewRequest(&llorchv1.WhoAmIRequest{}))
			if err != nil {
				return fmt.Errorf("node %s at %s: %w", id.NodeID, id.ControlURL, client.Explain(err))
			}
			n := resp.Msg.GetNode()
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintf(w, "node:\t%s (%s)\nstatus:\t%s\ncontrol plane:\t%s\nidentity:\t%s\ncertificate:\tserial %s, valid until %s\n",
				n.GetId(), n.GetName(), strings.ToLower(strings.TrimPrefix(n.GetStatus().String(), "NODE_STATUS_")),
				id.ControlURL, n.GetSpiffeId(), n.GetCertificateSerial(), id.NotAfter().Local().Format(time.RFC3339))
			return w.Flush()
		},
	}
	addStateFlag(cmd, &dir)
	return cmd
}
