package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/control/server/servertest"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// testAPIToken is a token the server accepts (random hex, 128 bits).
const testAPIToken = "3f9c2a7be1d04c58a6e2b9f17d3c08e4"

// wantPolicy is who may call each procedure, written down here on its own:
// the test checks the server's behaviour against it, so changing a policy
// in server.Routes, or serving a procedure this list does not know, fails.
var wantPolicy = map[string]string{
	"/llorch.v1.EnrollService/Enroll":                                "public",
	"/llorch.v1.InfoService/GetInfo":                                 "public",
	"/llorch.v1.NodeService/WhoAmI":                                  "node",
	"/llorch.v1.NodeService/RenewCertificate":                        "node",
	"/llorch.v1.SessionService/Connect":                              "node",
	"/llorch.v1.AdminService/CreateJoinToken":                        "admin",
	"/llorch.v1.AdminService/ListJoinTokens":                         "admin",
	"/llorch.v1.AdminService/RevokeJoinToken":                        "admin",
	"/llorch.v1.AdminService/ListNodes":                              "admin",
	"/llorch.v1.AdminService/GetNode":                                "admin",
	"/llorch.v1.AdminService/RemoveNode":                             "admin",
	"/llorch.v1.AdminService/ListEvents":                             "admin",
	"/llorch.v1.AdminService/DrainNode":                              "admin",
	"/llorch.v1.AdminService/UndrainNode":                            "admin",
	"/llorch.v1.AdminService/RenewNodeCertificate":                   "admin",
	"/llorch.v1.AdminService/WatchEvents":                            "admin",
	"/grpc.health.v1.Health/Check":                                   "public",
	"/grpc.health.v1.Health/Watch":                                   "public",
	"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      "public",
	"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "public",
	server.MetricsPath:                                               "admin",
}

// Paths that must not be served on the public port at all.
var unserved = []string{"/", "/debug/pprof/", "/debug/pprof/heap", "/llorch.v1.AdminService/Nope", "/llorch.v1.Secret/Get", "/v1/models", "/metrics/x"}

// The credentials a caller can come with.
type credential struct {
	name  string
	cert  *state.Identity // presented as the client certificate
	token string          // sent as a bearer token
}

// The outcomes: the gate let the call through to its handler (whatever the
// handler then made of an empty request), or refused it with a code.
const allowed = "allowed"

// expected is what each policy gives each credential.
var expected = map[string]map[string]string{
	"public": {"none": allowed, "node": allowed, "removed node": allowed, "wrong token": allowed, "right token": allowed},
	"node": {"none": "unauthenticated", "node": allowed, "removed node": "permission_denied",
		"wrong token": "unauthenticated", "right token": "unauthenticated"},
	"admin": {"none": "unauthenticated", "node": "unauthenticated", "removed node": "unauthenticated",
		"wrong token": "unauthenticated", "right token": allowed},
}

// The gate is one table in front of everything: every procedure in
// schema/ (and health, reflection, metrics) is called with no credential,
// a node's certificate, a removed node's certificate, a wrong API token and
// the right one, and each answer is the one its policy gives. Paths that
// are not mounted are refused whatever the credential.
func TestEveryRouteAndCredential(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) {
		c.APIToken = testAPIToken
		c.Limits.AuthFailures.Rate = 0 // this test refuses many tokens on purpose
	})
	res, _, err := enrollEdge(t, srv, srv.Token(t, &llorchv1.CreateJoinTokenRequest{Name: "good"}))
	if err != nil {
		t.Fatal(err)
	}
	removed, _, err := enrollEdge(t, srv, srv.Token(t, &llorchv1.CreateJoinTokenRequest{Name: "gone"}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Admin.RemoveNode(context.Background(), connect.NewRequest(&llorchv1.RemoveNodeRequest{Id: removed.Identity.NodeID})); err != nil {
		t.Fatal(err)
	}
	creds := []credential{
		{name: "none"},
		{name: "node", cert: &res.Identity},
		{name: "removed node", cert: &removed.Identity},
		{name: "wrong token", token: testAPIToken[:31] + "0"},
		{name: "right token", token: testAPIToken},
	}

	procs := servedProcedures(t)
	for path := range wantPolicy {
		if _, ok := procs[path]; !ok && path != server.MetricsPath {
			t.Errorf("%s has a policy here but is not a procedure of a served service", path)
		}
	}
	for _, c := range creds {
		caller := newCaller(t, srv, c)
		for path, kind := range procs {
			policy, ok := wantPolicy[path]
			if !ok {
				t.Errorf("%s is served but this test does not know its policy: add it to wantPolicy", path)
				continue
			}
			if got, want := outcome(caller.call(t, path, kind)), expected[policy][c.name]; got != want {
				t.Errorf("%s (%s) with %s: %s, want %s", path, policy, c.name, got, want)
			}
		}
		if got, want := caller.metrics(t), expected[wantPolicy[server.MetricsPath]][c.name]; got != want {
			t.Errorf("%s with %s: %s, want %s", server.MetricsPath, c.name, got, want)
		}
		for _, path := range unserved {
			if got := caller.call(t, path, rpcUnary); got != "not_found" {
				t.Errorf("unmounted %s with %s: %s, want not_found", path, c.name, got)
			}
		}
	}
}

// The kinds of call, which decide how a procedure is called.
type rpcKind int

const (
	rpcUnary rpcKind = iota
	rpcStream
)

// servedProcedures lists every procedure of the services the control plane
// serves, from the descriptors compiled into the binary. Connect's health
// and reflection register theirs under "connectext.", and serve them under
// the standard names (reflection also as v1alpha).
func servedProcedures(t *testing.T) map[string]rpcKind {
	t.Helper()
	out := map[string]rpcKind{}
	for _, pkg := range []protoreflect.FullName{"llorch.v1", "connectext.grpc.health.v1", "connectext.grpc.reflection.v1"} {
		n := 0
		protoregistry.GlobalFiles.RangeFilesByPackage(pkg, func(f protoreflect.FileDescriptor) bool {
			for i := 0; i < f.Services().Len(); i++ {
				svc := f.Services().Get(i)
				for j := 0; j < svc.Methods().Len(); j++ {
					m := svc.Methods().Get(j)
					kind := rpcUnary
					if m.IsStreamingClient() || m.IsStreamingServer() {
						kind = rpcStream
					}
					name := strings.TrimPrefix(string(svc.FullName()), "connectext.")
					out["/"+name+"/"+string(m.Name())] = kind
					if strings.HasPrefix(name, "grpc.reflection.v1.") {
						out["/"+strings.Replace(name, ".v1.", ".v1alpha.", 1)+"/"+string(m.Name())] = kind
					}
					n++
				}
			}
			return true
		})
		if n == 0 {
			t.Fatalf("no procedures of package %s are registered", pkg)
		}
	}
	return out
}

// caller makes raw Connect-protocol calls with one credential, so that
// every procedure can be called alike, with an empty message.
type caller struct {
	url   string
	token string
	hc    *http.Client
}

func newCaller(t *testing.T, srv *servertest.Server, c credential) *caller {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	cfg := &tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS13}
	if c.cert != nil {
		cfg = certs.NodeClientTLSConfig(c.cert.RootPool(), func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			tc := c.cert.TLSCertificate(cri.AcceptableCAs)
			return &tc, nil
		})
	}
	tr := &http2.Transport{TLSClientConfig: cfg}
	t.Cleanup(tr.CloseIdleConnections)
	return &caller{url: srv.URL(), token: c.token, hc: &http.Client{Transport: tr}}
}

// call calls path with an empty message and returns the Connect code of the
// answer, or allowed when it succeeded or a stream went on.
func (c *caller) call(t *testing.T, path string, kind rpcKind) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	body, ctype := []byte{}, "application/proto"
	if kind == rpcStream {
		body, ctype = make([]byte, 5), "application/connect+proto" // one envelope: an empty message
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, c.url+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", ctype)
	req.Header.Set("Connect-Protocol-Version", "1")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	defer resp.Body.Close()
	if kind == rpcUnary {
		if resp.StatusCode == http.StatusOK {
			return allowed
		}
		return wireCode(t, resp.Body)
	}
	// A stream: an end-of-stream envelope with an error is a refusal (or
	// the handler's answer to an empty request); data, or nothing before
	// the deadline (a session waiting for Register), is a call let through.
	var head [5]byte
	if _, err := io.ReadFull(resp.Body, head[:]); err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return allowed
		}
		t.Fatalf("%s: %v", path, err)
	}
	if head[0]&2 == 0 {
		return allowed
	}
	var end struct {
		Error *struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	msg := make([]byte, binary.BigEndian.Uint32(head[1:]))
	if _, err := io.ReadFull(resp.Body, msg); err != nil || json.Unmarshal(msg, &end) != nil {
		t.Fatalf("%s: bad end of stream %q: %v", path, msg, err)
	}
	if end.Error == nil {
		return allowed
	}
	return end.Error.Code
}

// outcome tells, for a served procedure, the gate's refusals (and rate
// limits, which this test must not hit) from a call let through: the codes
// a handler gives an empty request (not_found, invalid_argument,
// unimplemented for health's Watch) mean its handler was reached.
func outcome(code string) string {
	switch code {
	case "unauthenticated", "permission_denied", "resource_exhausted":
		return code
	}
	return allowed
}

func wireCode(t *testing.T, r io.Reader) string {
	t.Helper()
	var e struct {
		Code string `json:"code"`
	}
	b, _ := io.ReadAll(r)
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("not a Connect error: %q", b)
	}
	return e.Code
}

func (c *caller) metrics(t *testing.T) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, c.url+server.MetricsPath, nil)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		if b, _ := io.ReadAll(resp.Body); !strings.Contains(string(b), "llorch_nodes") {
			t.Errorf("/metrics answered 200 without the metrics: %.200s", b)
		}
		return allowed
	case http.StatusUnauthorized:
		return "unauthenticated"
	case http.StatusForbidden:
		return "permission_denied"
	}
	return resp.Status
}
