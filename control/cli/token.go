package cli

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/control/enroll"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Create, list and revoke join tokens"}
	cmd.AddCommand(newTokenCreateCmd(), newTokenListCmd(), newTokenRevokeCmd())
	return cmd
}

func newTokenCreateCmd() *cobra.Command {
	var t target
	var name string
	var ttl time.Duration
	var labels []string
	var uses int
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a join token and print it (the only line on stdout)",
		Long: `Create a join token for one machine. The token is printed once on stdout; the
control plane keeps only a hash of its secret. It carries the CA fingerprint, so
` + "`edge enroll`" + ` can check it reached this control plane before sending it.`,
		Example: `  TOKEN=$(control token create --name gpu-1 --label zone=lab)
  edge enroll --control https://cp.example:8443 --token-file token.txt`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lbls, err := parseLabels(labels)
			if err != nil {
				return err
			}
			if ttl <= 0 || ttl > enroll.MaxTokenTTL {
				return fmt.Errorf("--ttl %s: must be more than 0 and at most %s", ttl, enroll.MaxTokenTTL)
			}
			if uses < 1 || uses > enroll.MaxTokenUses {
				return fmt.Errorf("--uses %d: must be between 1 and %d", uses, enroll.MaxTokenUses)
			}
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			resp, err := client.CreateJoinToken(cmd.Context(), connect.NewRequest(&llorchv1.CreateJoinTokenRequest{
				Name: name, Ttl: durationpb.New(ttl), Labels: lbls, MaxUses: int32(uses),
			}))
			if err != nil {
				return err
			}
			jt := resp.Msg.GetJoinToken()
			fmt.Fprintln(cmd.OutOrStdout(), resp.Msg.GetToken())
			fmt.Fprintf(cmd.ErrOrStderr(), "join token %s: %s, expires %s\n", jt.GetId(), usesText(int(jt.GetMaxUses())), jt.GetExpiresAt().AsTime().Local().Format(time.RFC3339))
			return nil
		},
	}
	t.addFlags(cmd)
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "name of the node that enrolls with it (default: the machine's hostname)")
	f.DurationVar(&ttl, "ttl", enroll.DefaultTokenTTL, fmt.Sprintf("how long the token can be used (at most %s)", enroll.MaxTokenTTL))
	f.StringArrayVar(&labels, "label", nil, "label k=v given to the node (repeatable)")
	f.IntVar(&uses, "uses", 1, "how many machines may enroll with it")
	return cmd
}

func usesText(n int) string {
	if n == 1 {
		return "single use"
	}
	return fmt.Sprintf("%d uses", n)
}

func parseLabels(in []string) (map[string]string, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make(map[string]string, len(in))
	for _, kv := range in {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--label %q: want key=value", kv)
		}
		if _, dup := out[k]; dup {
			return nil, fmt.Errorf("--label %q: key %q given twice", kv, k)
		}
		out[k] = v
	}
	if err := enroll.ValidateLabels(out); err != nil {
		return nil, err
	}
	return out, nil
}

type tokenJSON struct {
	ID        string            `json:"id"`
	Name      string            `json:"name"`
	Labels    map[string]string `json:"labels"`
	CreatedAt time.Time         `json:"created_at"`
	ExpiresAt time.Time         `json:"expires_at"`
	MaxUses   int32             `json:"max_uses"`
	Uses      int32             `json:"uses"`
	Revoked   bool              `json:"revoked"`
	State     string            `json:"state"`
}

func tokenState(t *llorchv1.JoinToken, now time.Time) string {
	switch {
	case t.GetRevoked():
		return "revoked"
	case t.GetUses() >= t.GetMaxUses():
		return "used"
	case !now.Before(t.GetExpiresAt().AsTime()):
		return "expired"
	}
	return "valid"
}

func newTokenListCmd() *cobra.Command {
	var t target
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List join tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			resp, err := client.ListJoinTokens(cmd.Context(), connect.NewRequest(&llorchv1.ListJoinTokensRequest{}))
			if err != nil {
				return err
			}
			now := time.Now()
			out := []tokenJSON{}
			for _, jt := range resp.Msg.GetJoinTokens() {
				out = append(out, tokenJSON{
					ID: jt.GetId(), Name: jt.GetName(), Labels: jt.GetLabels(),
					CreatedAt: jt.GetCreatedAt().AsTime(), ExpiresAt: jt.GetExpiresAt().AsTime(),
					MaxUses: jt.GetMaxUses(), Uses: jt.GetUses(), Revoked: jt.GetRevoked(), State: tokenState(jt, now),
				})
			}
			if asJSON {
				return writeJSON(cmd, out)
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tNAME\tSTATE\tUSES\tEXPIRES\tLABELS")
			for _, jt := range out {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d/%d\t%s\t%s\n", jt.ID, dash(jt.Name), jt.State, jt.Uses, jt.MaxUses, jt.ExpiresAt.Local().Format(time.RFC3339), labelsText(jt.Labels))
			}
			return w.Flush()
		},
	}
	t.addFlags(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}

func newTokenRevokeCmd() *cobra.Command {
	var t target
	cmd := &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke a join token so no machine can enroll with it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := t.adminClient()
			if err != nil {
				return err
			}
			if _, err := client.RevokeJoinToken(cmd.Context(), connect.NewRequest(&llorchv1.RevokeJoinTokenRequest{Id: args[0]})); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "join token %s revoked\n", args[0])
			return nil
		},
	}
	t.addFlags(cmd)
	return cmd
}

func writeJSON(cmd *cobra.Command, v any) error {
	enc := json.NewEncoder(cmd.OutOrStdout())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
