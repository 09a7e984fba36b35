package cli_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge/cli"
	"github.com/llorch/llorch/edge/internal/edgetest"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/refusal"
)

type result struct {
	code           int
	stdout, stderr string
}

// edgeCmd runs the edge command line in process, with an environment that
// names nothing of the machine's.
func edgeCmd(t *testing.T, args ...string) result {
	t.Helper()
	for _, k := range []string{"LLORCH_ENROLL_TOKEN", "LLORCH_CONTROL_URL", "LLORCH_ENGINES_DIR"} {
		t.Setenv(k, "")
	}
	t.Setenv("LLORCH_EDGE_STATE", filepath.Join(t.TempDir(), "default-state"))
	ctx, cancel := context.WithTimeout(context.Background(), edgetest.WaitLimit)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code := cli.Main(ctx, args, &stdout, &stderr)
	return result{code, stdout.String(), stderr.String()}
}

// oneLine returns the one line of stderr, failing the test if there are more.
func oneLine(t *testing.T, r result) string {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(r.stderr, "\n"), "\n")
	if len(lines) != 1 || !strings.HasSuffix(r.stderr, "\n") || !strings.HasPrefix(lines[0], "edge: ") {
		t.Fatalf("stderr = %q, want one line starting \"edge: \"", r.stderr)
	}
	return lines[0]
}

func TestHelpEverywhere(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"enroll", "--help"}, {"status", "--help"}, {"run", "--help"}, {"help", "run"}, {"--version"}} {
		r := edgeCmd(t, args...)
		if r.code != 0 || r.stderr != "" {
			t.Errorf("edge %v: exit %d, stderr %q; want 0 and nothing", args, r.code, r.stderr)
		}
		if args[0] != "--version" && !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("edge %v: stdout %q, want a usage", args, r.stdout)
		}
	}
}

func TestBadInputIsOneLine(t *testing.T) {
	empty := t.TempDir()
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"rn"}, `unknown command "rn"`},
		{[]string{"run", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"run", "extra"}, `unknown command "extra" for "edge run"`},
		{[]string{"status", "extra"}, `unknown command "extra" for "edge status"`},
		{[]string{"enroll", "--state", empty, "--control", "https://127.0.0.1:1"}, "no join token"},
		{[]string{"enroll", "--state", empty, "--control", "https://127.0.0.1:1", "--token", "nope"}, "malformed"},
		{[]string{"enroll", "--state", empty, "--token-file", filepath.Join(empty, "missing")}, "--token-file"},
		{[]string{"status", "--state", empty}, "not enrolled"},
		{[]string{"run", "--state", empty, "--log-format", "xml"}, "xml"},
	}
	for _, tt := range tests {
		r := edgeCmd(t, tt.args...)
		if r.code == 0 || r.stdout != "" {
			t.Errorf("edge %v: exit %d, stdout %q; want a failure and nothing on stdout", tt.args, r.code, r.stdout)
			continue
		}
		if line := oneLine(t, r); !strings.Contains(line, tt.want) {
			t.Errorf("edge %v: %q, want it to mention %q", tt.args, line, tt.want)
		}
	}
}

func TestRunNotEnrolled(t *testing.T) {
	dir := t.TempDir()
	r := edgeCmd(t, "run", "--state", dir)
	want := fmt.Sprintf("edge: not enrolled: no identity in %s; run `edge enroll --token-file FILE --control URL --state %s` first", dir, dir)
	if r.code == 0 || oneLine(t, r) != want {
		t.Errorf("edge run, not enrolled: exit %d, stderr %q\nwant %q", r.code, r.stderr, want)
	}
}

func TestRunExpired(t *testing.T) {
	ca := edgetest.NewCA(t)
	id := ca.Identity(t, "node-1", "https://127.0.0.1:1")
	chain, err := ca.IssueNode(&id.Key.PublicKey, "node-1", -30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	id.Chain = chain
	dir := t.TempDir()
	if err := state.Save(dir, id); err != nil {
		t.Fatal(err)
	}
	line := oneLine(t, edgeCmd(t, "run", "--state", dir))
	for _, part := range []string{"node node-1: certificate expired at ", "; the machine was probably offline past its renewal; enroll again with a new token (edge enroll --token-file FILE --control URL)"} {
		if !strings.Contains(line, part) {
			t.Errorf("%q, want it to say %q", line, part)
		}
	}
}

func TestRunRefusedWhileAnotherAgentRuns(t *testing.T) {
	ca := edgetest.NewCA(t)
	dir, _ := ca.Enrolled(t, "node-1", "https://127.0.0.1:1")
	release, err := state.Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	want := fmt.Sprintf("edge: state directory %s is in use by another edge agent (pid %d); stop it first", dir, os.Getpid())
	if line := oneLine(t, edgeCmd(t, "run", "--state", dir, "--engines-dir", t.TempDir())); line != want {
		t.Errorf("%q\nwant %q", line, want)
	}
}

// nodeService is a fake NodeService whose WhoAmI answers with err, or
// with the node.
type nodeService struct {
	llorchv1connect.UnimplementedNodeServiceHandler
	err error
}

func (s *nodeService) WhoAmI(context.Context, *connect.Request[llorchv1.WhoAmIRequest]) (*connect.Response[llorchv1.WhoAmIResponse], error) {
	if s.err != nil {
		return nil, s.err
	}
	return connect.NewResponse(&llorchv1.WhoAmIResponse{Node: &llorchv1.Node{
		Id: "node-1", Name: "gpu-1", Status: llorchv1.NodeStatus_NODE_STATUS_ONLINE, SpiffeId: certs.NodeSPIFFEID(edgetest.TrustDomain, "node-1"),
	}}), nil
}

func TestStatus(t *testing.T) {
	ca := edgetest.NewCA(t)
	svc := &nodeService{}
	mux := http.NewServeMux()
	mux.Handle(llorchv1connect.NewNodeServiceHandler(svc))
	srv := edgetest.NewServer(t, ca, mux)
	dir, _ := ca.Enrolled(t, "node-1", srv.URL)

	r := edgeCmd(t, "status", "--state", dir)
	if r.code != 0 || !strings.Contains(r.stdout, "node-1 (gpu-1)") || !strings.Contains(r.stdout, "online") {
		t.Errorf("edge status: %+v", r)
	}

	for _, tt := range []struct {
		name string
		err  *connect.Error
		want []string
	}{
		{"revoked", edgetest.Refusal(connect.CodePermissionDenied, refusal.Revoked, 0, "node node-1 has been removed and its certificate revoked"),
			[]string{"revoked: this node was removed from the control plane; move this node's state directory away, then enroll again with a new token"}},
		{"superseded", edgetest.Refusal(connect.CodePermissionDenied, refusal.Superseded, 0, "certificate 1f has been superseded"),
			[]string{"certificate superseded", "move this node's state directory away, then enroll again with a new token"}},
		{"rate limited", edgetest.Refusal(connect.CodeResourceExhausted, refusal.RateLimited, time.Second, "too many calls"),
			[]string{"rate-limited by the control plane: too many calls"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			svc.err = tt.err
			line := oneLine(t, edgeCmd(t, "status", "--state", dir))
			if !strings.HasPrefix(line, "edge: node node-1 at "+srv.URL+": ") {
				t.Errorf("%q, want it to name the node and the control plane", line)
			}
			for _, w := range tt.want {
				if !strings.Contains(line, w) {
					t.Errorf("%q, want it to say %q", line, w)
				}
			}
		})
	}
}

// enrollService enrolls node-1, after refusing the first call as rate-limited.
type enrollService struct {
	llorchv1connect.UnimplementedEnrollServiceHandler
	ca    *edgetest.CA
	calls int
}

func (s *enrollService) Enroll(_ context.Context, req *connect.Request[llorchv1.EnrollRequest]) (*connect.Response[llorchv1.EnrollResponse], error) {
	s.calls++
	if s.calls == 1 {
		return nil, edgetest.Refusal(connect.CodeResourceExhausted, refusal.RateLimited, 200*time.Millisecond, "too many enrollments")
	}
	chain, err := s.ca.IssueCSR(req.Msg.GetCsr(), "node-1", time.Hour)
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	return connect.NewResponse(&llorchv1.EnrollResponse{
		NodeId: "node-1", NodeName: "gpu-1", SpiffeId: certs.NodeSPIFFEID(edgetest.TrustDomain, "node-1"),
		CertificateChain: chain, CaCertificates: [][]byte{s.ca.Root.Raw},
	}), nil
}

func TestEnrollRateLimitedThenEnrolled(t *testing.T) {
	ca := edgetest.NewCA(t)
	svc := &enrollService{ca: ca}
	mux := http.NewServeMux()
	mux.Handle(llorchv1connect.NewEnrollServiceHandler(svc))
	srv := edgetest.NewServer(t, ca, mux)
	tok, err := certs.NewJoinToken(ca.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(tok.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "state")
	r := edgeCmd(t, "enroll", "--state", dir, "--control", srv.URL, "--token-file", tokenFile)
	if r.code != 0 || !strings.Contains(r.stdout, "enrolled as node node-1 (gpu-1) with "+srv.URL) {
		t.Fatalf("edge enroll: %+v", r)
	}
	if r.stderr != "enrollment rate-limited by the control plane; retrying in 200ms\n" {
		t.Errorf("stderr = %q, want one progress line", r.stderr)
	}
	id, err := state.Load(dir)
	if err != nil || id.NodeID != "node-1" {
		t.Fatalf("Load: %+v, %v", id, err)
	}
	if !sameRoot(id.Roots, ca.Root) {
		t.Error("the saved roots are not the pinned CA's")
	}

	again := edgeCmd(t, "enroll", "--state", dir, "--control", srv.URL, "--token-file", tokenFile)
	if again.code != 0 || !strings.Contains(again.stdout, "already enrolled") || svc.calls != 2 {
		t.Errorf("second edge enroll: %+v after %d calls, want already enrolled and no call", again, svc.calls)
	}
}

func sameRoot(roots []*x509.Certificate, want *x509.Certificate) bool {
	return len(roots) == 1 && roots[0].Equal(want)
}
