package cli

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

func newNodeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "List, inspect, drain, renew and remove nodes; follow their events"}
	cmd.AddCommand(newNodeListCmd(), newNodeShowCmd(), newNodeDrainCmd(true), newNodeDrainCmd(false), newNodeRenewCmd(), newNodeRemoveCmd(), newNodeEventsCmd())
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
	StatusReason        string            `json:"status_reason"`
	System              *systemJSON       `json:"system"`
	GPUs                []gpuJSON         `json:"gpus"`
	GPUDriverVersion    string            `json:"gpu_driver_version"`
	CUDAVersion         string            `json:"cuda_version"`
	GPUUnavailable      string            `json:"gpu_unavailable"`
	Pools               []poolJSON        `json:"pools"`
	HandoffErrors       []handoffErrJSON  `json:"handoff_errors"`
	// DroppedReplicas and DroppedHandoffErrors are what the edge found but
	// left out of its report (it reports a bounded number of each).
	DroppedReplicas      int `json:"dropped_replicas"`
	DroppedHandoffErrors int `json:"dropped_handoff_errors"`
}

type systemJSON struct {
	Hostname     string `json:"hostname"`
	OS           string `json:"os"`
	Arch         string `json:"arch"`
	AgentVersion string `json:"agent_version"`
}

type gpuJSON struct {
	Index              int32  `json:"index"`
	UUID               string `json:"uuid"`
	Name               string `json:"name"`
	MemoryTotalBytes   uint64 `json:"memory_total_bytes"`
	MemoryUsedBytes    uint64 `json:"memory_used_bytes"`
	UtilizationPercent uint32 `json:"utilization_percent"`
	TemperatureC       uint32 `json:"temperature_c"`
}

type poolJSON struct {
	ID            string        `json:"id"`
	Engine        string        `json:"engine"`
	EngineVersion string        `json:"engine_version"`
	Model         string        `json:"model"`
	Ready         bool          `json:"ready"`
	Draining      bool          `json:"draining"`
	SlotsTotal    int32         `json:"slots_total"`
	SlotsFree     int32         `json:"slots_free"`
	Replicas      []replicaJSON `json:"replicas"`
}

type replicaJSON struct {
	ID         string `json:"id"`
	URL        string `json:"url"`
	Ready      bool   `json:"ready"`
	ProbeError string `json:"probe_error,omitempty"`
	DeviceMask string `json:"device_mask,omitempty"`
	Slots      int32  `json:"slots"`
	PID        int32  `json:"pid,omitempty"`
	File       string `json:"file"`
}

type handoffErrJSON struct {
	File   string `json:"file"`
	Reason string `json:"reason"`
}

func toNodeJSON(n *llorchv1.Node) nodeJSON {
	labels := n.GetLabels()
	if labels == nil {
		labels = map[string]string{}
	}
	out := nodeJSON{
		ID: n.GetId(), Name: n.GetName(), Status: statusText(n.GetStatus()), Labels: labels,
		SPIFFEID: n.GetSpiffeId(), CertificateSerial: n.GetCertificateSerial(),
		CertificateNotAfter: optTime(n.GetCertificateNotAfter()), EnrolledAt: optTime(n.GetEnrolledAt()),
		LastSeen: optTime(n.GetLastSeen()), Draining: n.GetDraining(), TokenID: n.GetTokenId(),
		StatusReason: n.GetStatusReason(),
		GPUs:         []gpuJSON{}, Pools: []poolJSON{}, HandoffErrors: []handoffErrJSON{},
		DroppedReplicas: int(n.GetDroppedReplicas()), DroppedHandoffErrors: int(n.GetDroppedHandoffErrors()),
	}
	if sys := n.GetSystem(); sys != nil {
		out.System = &systemJSON{sys.GetHostname(), sys.GetOs(), sys.GetArch(), sys.GetAgentVersion()}
	}
	inv := n.GetGpuInventory()
	out.GPUDriverVersion, out.CUDAVersion, out.GPUUnavailable = inv.GetDriverVersion(), inv.GetCudaVersion(), inv.GetUnavailable()
	for _, g := range inv.GetGpus() {
		out.GPUs = append(out.GPUs, gpuJSON{g.GetIndex(), g.GetUuid(), g.GetName(), g.GetMemoryTotalBytes(), g.GetMemoryUsedBytes(), g.GetUtilizationPercent(), g.GetTemperatureC()})
	}
	for _, p := range n.GetPools() {
		pj := poolJSON{ID: p.GetId(), Engine: p.GetEngine(), EngineVersion: p.GetEngineVersion(), Model: p.GetModel(),
			Ready: p.GetReady(), Draining: p.GetDraining(), SlotsTotal: p.GetSlotsTotal(), SlotsFree: p.GetSlotsFree(), Replicas: []replicaJSON{}}
		for _, r := range p.GetReplicas() {
			pj.Replicas = append(pj.Replicas, replicaJSON{r.GetId(), r.GetUrl(), r.GetReady(), r.GetProbeError(), r.GetDeviceMask(), r.GetSlots(), r.GetPid(), r.GetFile()})
		}
		out.Pools = append(out.Pools, pj)
	}
	for _, e := range n.GetHandoffErrors() {
		out.HandoffErrors = append(out.HandoffErrors, handoffErrJSON{e.GetFile(), e.GetReason()})
	}
	return out
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
			fmt.Fprintln(w, "ID\tNAME\tSTATUS\tGPUS\tPOOLS\tLAST SEEN\tLABELS")
			for _, n := range out {
				status := n.Status
				if n.Draining {
					status += ",draining"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", n.ID, n.Name, status, len(n.GPUs), len(n.Pools), timeText(n.LastSeen), labelsText(n.Labels))
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
			return printNode(cmd, n)
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
	var asJSON, follow bool
	cmd := &cobra.Command{
		Use:   "events [ID]",
		Short: "List recorded events (enrollments, status changes, drains, renewals, removals), newest first; --follow streams new ones",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			nodeID := ""
			if len(args) == 1 {
				nodeID = args[0]
			}
			if follow {
				return followEvents(cmd, client, nodeID, limit, asJSON)
			}
			req := &llorchv1.ListEventsRequest{Limit: int32(limit), NodeId: nodeID}
			resp, err := client.ListEvents(cmd.Context(), connect.NewRequest(req))
			if err != nil {
				return err
			}
			out := []eventJSON{}
			for _, e := range resp.Msg.GetEvents() {
				out = append(out, toEventJSON(e))
			}
			if asJSON {
				return writeJSON(cmd, out)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "TIME\tNODE\tKIND\tREASON")
			for _, e := range out {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", e.Time.Local().Format(time.RFC3339), dash(e.NodeID), e.Kind, e.what())
			}
			return w.Flush()
		},
	}
	t.addFlags(cmd)
	cmd.Flags().IntVar(&limit, "limit", 100, "how many events (with --follow: how many recorded ones first)")
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep streaming new events (one per line; Ctrl-C stops)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}

func printNode(cmd *cobra.Command, n nodeJSON) error {
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "id:\t%s\nname:\t%s\nstatus:\t%s (%s)\ndraining:\t%t\nlabels:\t%s\nspiffe id:\t%s\ncertificate:\tserial %s, expires %s\nenrolled:\t%s (token %s)\nlast seen:\t%s\n",
		n.ID, n.Name, n.Status, dash(n.StatusReason), n.Draining, labelsText(n.Labels), n.SPIFFEID, n.CertificateSerial, timeText(n.CertificateNotAfter), timeText(n.EnrolledAt), n.TokenID, timeText(n.LastSeen))
	if s := n.System; s != nil {
		fmt.Fprintf(w, "system:\t%s, %s/%s, agent %s\n", s.Hostname, s.OS, s.Arch, s.AgentVersion)
	}
	switch {
	case n.GPUUnavailable != "":
		fmt.Fprintf(w, "gpus:\tnone (%s)\n", n.GPUUnavailable)
	case len(n.GPUs) > 0:
		fmt.Fprintf(w, "gpus:\t%d, driver %s, CUDA %s\n", len(n.GPUs), n.GPUDriverVersion, n.CUDAVersion)
	default:
		fmt.Fprintf(w, "gpus:\tnone\n")
	}
	if err := w.Flush(); err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if len(n.GPUs) > 0 {
		w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "  GPU\tNAME\tUUID\tMEMORY\tUTIL\tTEMP")
		for _, g := range n.GPUs {
			fmt.Fprintf(w, "  %d\t%s\t%s\t%d/%d MiB\t%d%%\t%dC\n", g.Index, g.Name, g.UUID, g.MemoryUsedBytes>>20, g.MemoryTotalBytes>>20, g.UtilizationPercent, g.TemperatureC)
		}
		w.Flush()
	}
	if len(n.Pools) == 0 {
		fmt.Fprintln(out, "pools:        none")
	} else {
		fmt.Fprintln(out, "pools:")
		w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "  POOL\tREPLICA\tENGINE\tMODEL\tREADY\tSLOTS\tURL")
		for _, p := range n.Pools {
			for _, r := range p.Replicas {
				ready := fmt.Sprint(r.Ready)
				if r.ProbeError != "" {
					ready += " (" + r.ProbeError + ")"
				}
				fmt.Fprintf(w, "  %s\t%s\t%s %s\t%s\t%s\t%d\t%s\n", p.ID, r.ID, p.Engine, p.EngineVersion, dash(p.Model), ready, r.Slots, r.URL)
			}
		}
		w.Flush()
	}
	if n.DroppedReplicas > 0 {
		fmt.Fprintf(out, "dropped:      %d more replicas the edge found but did not report (it reports a bounded number)\n", n.DroppedReplicas)
	}
	for _, e := range n.HandoffErrors {
		fmt.Fprintf(out, "handoff error: %s: %s\n", e.File, e.Reason)
	}
	if n.DroppedHandoffErrors > 0 {
		fmt.Fprintf(out, "handoff errors: %d more not reported\n", n.DroppedHandoffErrors)
	}
	return nil
}

func newNodeDrainCmd(drain bool) *cobra.Command {
	var t target
	var reason string
	use, short := "undrain ID", "Take a node out of draining"
	if drain {
		use, short = "drain ID", "Mark a node draining: it takes no new work (kept across restarts)"
	}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			if drain {
				_, err = client.DrainNode(cmd.Context(), connect.NewRequest(&llorchv1.DrainNodeRequest{Id: args[0], Reason: reason}))
			} else {
				_, err = client.UndrainNode(cmd.Context(), connect.NewRequest(&llorchv1.UndrainNodeRequest{Id: args[0]}))
			}
			if err != nil {
				return err
			}
			verb := "undrained"
			if drain {
				verb = "drained"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s %s\n", args[0], verb)
			return nil
		},
	}
	t.addFlags(cmd)
	if drain {
		cmd.Flags().StringVar(&reason, "reason", "", "why, recorded in the node's events")
	}
	return cmd
}

type eventJSON struct {
	ID     int64     `json:"id"`
	Time   time.Time `json:"time"`
	NodeID string    `json:"node_id"`
	Kind   string    `json:"kind"`
	// From and To are a status event's move; empty for other kinds.
	From      string `json:"from,omitempty"`
	To        string `json:"to,omitempty"`
	Reason    string `json:"reason"`
	Coalesced int    `json:"coalesced,omitempty"`
}

func toEventJSON(e *llorchv1.Event) eventJSON {
	out := eventJSON{ID: e.GetId(), Time: e.GetTime().AsTime(), NodeID: e.GetNodeId(), Kind: e.GetKind(), Reason: e.GetReason(), Coalesced: int(e.GetCoalesced())}
	if e.GetTo() != llorchv1.NodeStatus_NODE_STATUS_UNSPECIFIED {
		out.From, out.To = statusText(e.GetFrom()), statusText(e.GetTo())
	}
	return out
}

// what is an event's reason as a line shows it: a status event's move first.
func (e eventJSON) what() string {
	if e.To == "" {
		return e.Reason
	}
	s := e.From + " -> " + e.To
	if e.Coalesced > 0 {
		s += fmt.Sprintf(" (%d moves coalesced)", e.Coalesced)
	}
	if e.Reason != "" {
		s += ": " + e.Reason
	}
	return s
}

// followEvents prints events as they are recorded, one per line (JSON lines with --json).
func followEvents(cmd *cobra.Command, client llorchv1connect.AdminServiceClient, nodeID string, backlog int, asJSON bool) error {
	stream, err := client.WatchEvents(cmd.Context(), connect.NewRequest(&llorchv1.WatchEventsRequest{NodeId: nodeID, Backlog: int32(backlog)}))
	if err != nil {
		return err
	}
	defer stream.Close()
	out := cmd.OutOrStdout()
	enc := json.NewEncoder(out)
	for stream.Receive() {
		e := toEventJSON(stream.Msg().GetEvent())
		if asJSON {
			if err := enc.Encode(e); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(out, "%s  %-12s  %-20s  %s\n", e.Time.Local().Format(time.RFC3339), dash(e.NodeID), e.Kind, e.what())
	}
	if cmd.Context().Err() != nil {
		return nil
	}
	return stream.Err()
}

func newNodeRenewCmd() *cobra.Command {
	var t target
	cmd := &cobra.Command{
		Use:   "renew ID",
		Short: "Ask a connected node to renew its certificate now",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			if _, err := client.RenewNodeCertificate(cmd.Context(), connect.NewRequest(&llorchv1.RenewNodeCertificateRequest{Id: args[0]})); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "asked node %s to renew its certificate\n", args[0])
			return nil
		},
	}
	t.addFlags(cmd)
	return cmd
}
