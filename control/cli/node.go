package cli

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

func newNodeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "List, inspect and remove nodes"}
	cmd.AddCommand(newNodeListCmd(), newNodeShowCmd(), newNodeRemoveCmd(), newNodeEventsCmd())
	return cmd
}

// nodeJSON is the stable JSON shape of a node for scripts.
type nodeJSON struct {
	ID                  string            `json:"id"`
	Name                string            `json:"name"`
	Status              string            `json:"status"`
	Labels              map[string]string `json:"labels"`
	SPIFFEID            string            `json:"spiffe_id"`
	CertificateSerial   string            `json:"certificate_serial"`
	CertificateNotAfter *time.Time        `json:"certificate_not_after"`
	EnrolledAt          *time.Time        `json:"enrolled_at"`
	LastSeen            *time.Time        `json:"last_seen"`
	Draining            bool              `json:"draining"`
	TokenID             string            `json:"token_id"`
}

func toNodeJSON(n *llorchv1.Node) nodeJSON {
	labels := n.GetLabels()
	if labels == nil {
		labels = map[string]string{}
	}
	return nodeJSON{
		ID: n.GetId(), Name: n.GetName(), Status: statusText(n.GetStatus()), Labels: labels,
		SPIFFEID: n.GetSpiffeId(), CertificateSerial: n.GetCertificateSerial(),
		CertificateNotAfter: optTime(n.GetCertificateNotAfter()), EnrolledAt: optTime(n.GetEnrolledAt()),
		LastSeen: optTime(n.GetLastSeen()), Draining: n.GetDraining(), TokenID: n.GetTokenId(),
	}
}

func statusText(s llorchv1.NodeStatus) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "NODE_STATUS_"))
}

func optTime(ts interface {
	IsValid() bool
	AsTime() time.Time
}) *time.Time {
	if ts == nil || !ts.IsValid() {
		return nil
	}
	t := ts.AsTime()
	return &t
}

func timeText(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Local().Format(time.RFC3339)
}

func labelsText(l map[string]string) string {
	if len(l) == 0 {
		return "-"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(l)) {
		parts = append(parts, k+"="+l[k])
	}
	return strings.Join(parts, ",")
}

func newNodeListCmd() *cobra.Command {
	var t target
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List nodes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			resp, err := client.ListNodes(cmd.Context(), connect.NewRequest(&llorchv1.ListNodesRequest{}))
			if err != nil {
				return err
			}
			out := []nodeJSON{}
			for _, n := range resp.Msg.GetNodes() {
				out = append(out, toNodeJSON(n))
			}
			if asJSON {
				return writeJSON(cmd, out)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tNAME\tSTATUS\tLAST SEEN\tLABELS")
			for _, n := range out {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", n.ID, n.Name, n.Status, timeText(n.LastSeen), labelsText(n.Labels))
			}
			return w.Flush()
		},
	}
	t.addFlags(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}

func newNodeShowCmd() *cobra.Command {
	var t target
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Show one node",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			resp, err := client.GetNode(cmd.Context(), connect.NewRequest(&llorchv1.GetNodeRequest{Id: args[0]}))
			if err != nil {
				return err
			}
			n := toNodeJSON(resp.Msg.GetNode())
			if asJSON {
				return writeJSON(cmd, n)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintf(w, "id:\t%s\nname:\t%s\nstatus:\t%s\ndraining:\t%t\nlabels:\t%s\nspiffe id:\t%s\ncertificate:\tserial %s, expires %s\nenrolled:\t%s (token %s)\nlast seen:\t%s\n",
				n.ID, n.Name, n.Status, n.Draining, labelsText(n.Labels), n.SPIFFEID, n.CertificateSerial, timeText(n.CertificateNotAfter), timeText(n.EnrolledAt), n.TokenID, timeText(n.LastSeen))
			return w.Flush()
		},
	}
	t.addFlags(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newNodeRemoveCmd() *cobra.Command {
	var t target
	var reason string
	cmd := &cobra.Command{
		Use:   "remove ID",
		Short: "Remove a node and revoke its certificate at once",
		Long: `Remove a node. Its certificate is refused from its next call on, not at expiry.
Removal is final: to bring the machine back, enroll it again with a new token.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			resp, err := client.RemoveNode(cmd.Context(), connect.NewRequest(&llorchv1.RemoveNodeRequest{Id: args[0], Reason: reason}))
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s (%s) removed; its certificate is revoked\n", resp.Msg.GetNode().GetId(), resp.Msg.GetNode().GetName())
			return nil
		},
	}
	t.addFlags(cmd)
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded in the node's events")
	return cmd
}

func newNodeEventsCmd() *cobra.Command {
	var t target
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "events [ID]",
		Short: "List recorded events (enrollments, renewals, removals), newest first",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			req := &llorchv1.ListEventsRequest{Limit: int32(limit)}
			if len(args) == 1 {
				req.NodeId = args[0]
			}
			resp, err := client.ListEvents(cmd.Context(), connect.NewRequest(req))
			if err != nil {
				return err
			}
			type eventJSON struct {
				ID     int64     `json:"id"`
				Time   time.Time `json:"time"`
				NodeID string    `json:"node_id"`
				Kind   string    `json:"kind"`
				Reason string    `json:"reason"`
			}
			out := []eventJSON{}
			for _, e := range resp.Msg.GetEvents() {
				out = append(out, eventJSON{e.GetId(), e.GetTime().AsTime(), e.GetNodeId(), e.GetKind(), e.GetReason()})
			}
			if asJSON {
				return writeJSON(cmd, out)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "TIME\tNODE\tKIND\tREASON")
			for _, e := range out {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", e.Time.Local().Format(time.RFC3339), dash(e.NodeID), e.Kind, e.Reason)
			}
			return w.Flush()
		},
	}
	t.addFlags(cmd)
	cmd.Flags().IntVar(&limit, "limit", 100, "how many events")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}
