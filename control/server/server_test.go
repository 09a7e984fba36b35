package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/adminclient"
	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/control/server/servertest"
	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/agent"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/enroll"
	"github.com/llorch/llorch/edge/state"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

func enrollEdge(tb testing.TB, srv *servertest.Server, token string) (enroll.Result, string, error) {
	tb.Helper()
	dir := tb.TempDir()
	res, err := enroll.Enroll(context.Background(), enroll.Config{StateDir: dir, ControlURL: srv.URL(), Token: token, Hostname: "gpu-host"})
	return res, dir, err
}

func whoAmI(id state.Identity) (*llorchv1.WhoAmIResponse, error) {
	resp, err := client.NodeClient(client.NewIdentity(id)).WhoAmI(context.Background(), connect.NewRequest(&llorchv1.WhoAmIRequest{}))
	if err != nil {
		return nil, client.Explain(err)
	}
	return resp.Msg, nil
}

func TestEnrollWhoAmIRemove(t *testing.T) {
	srv := servertest.Start(t, nil)
	token := srv.Token(t, &llorchv1.CreateJoinTokenRequest{Name: "gpu-1", Labels: map[string]string{"zone": "lab"}})
	res, dir, err := enrollEdge(t, srv, token)
	if err != nil {
		t.Fatalf("enroll: %v", err)
	}
	id := res.Identity
	if id.NodeName != "gpu-1" || id.Labels["zone"] != "lab" {
		t.Errorf("identity name %q labels %v, want gpu-1 and zone=lab", id.NodeName, id.Labels)
	}
	leaf := id.Leaf()
	if got, want := leaf.URIs[0].String(), certs.NodeSPIFFEID("llorch.local", id.NodeID); got != want {
		t.Errorf("SPIFFE ID %s, want %s", got, want)
	}
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	inter := x509.NewCertPool()
	for _, c := range id.Chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("node certificate does not verify against the CA: %v", err)
	}
	if lifetime := leaf.NotAfter.Sub(leaf.NotBefore); lifetime < 24*time.Hour || lifetime > 24*time.Hour+10*time.Minute {
		t.Errorf("lifetime %s, want about 24h", lifetime)
	}

	// Idempotent: a second enroll with the identity on disk spends nothing.
	again, err := enroll.Enroll(context.Background(), enroll.Config{StateDir: dir, ControlURL: srv.URL(), Token: "not even a token"})
	if err != nil || !again.AlreadyEnrolled || again.Identity.NodeID != id.NodeID {
		t.Fatalf("second enroll = %+v, %v; want already enrolled as %s", again.AlreadyEnrolled, err, id.NodeID)
	}

	who, err := whoAmI(id)
	if err != nil {
		t.Fatalf("WhoAmI: %v", err)
	}
	if who.GetNode().GetId() != id.NodeID || who.GetNode().GetStatus() != llorchv1.NodeStatus_NODE_STATUS_ENROLLED {
		t.Errorf("WhoAmI = %v", who.GetNode())
	}

	list, err := srv.Admin.ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{}))
	if err != nil || len(list.Msg.GetNodes()) != 1 || list.Msg.GetNodes()[0].GetId() != id.NodeID {
		t.Fatalf("ListNodes = %v, %v", list, err)
	}

	if _, err := srv.Admin.RemoveNode(context.Background(), connect.NewRequest(&llorchv1.RemoveNodeRequest{Id: id.NodeID})); err != nil {
		t.Fatalf("RemoveNode: %v", err)
	}
	if _, err := whoAmI(id); !errors.Is(err, edge.ErrRevoked) {
		t.Fatalf("WhoAmI after removal: %v, want ErrRevoked", err)
	}
}

func TestEnrollRefusals(t *testing.T) {
	clk := clock.NewFake(time.Now())
	srv := servertest.Start(t, func(c *server.Config) { c.Clock = clk })
	ctx := context.Background()
	used := srv.Token(t, nil)
	if _, _, err := enrollEdge(t, srv, used); err != nil {
		t.Fatalf("first enroll: %v", err)
	}
	revoked := srv.Token(t, nil)
	jt, _ := certs.ParseJoinToken(revoked)
	if _, err := srv.Admin.RevokeJoinToken(ctx, connect.NewRequest(&llorchv1.RevokeJoinTokenRequest{Id: jt.ID})); err != nil {
		t.Fatal(err)
	}
	expired := srv.Token(t, &llorchv1.CreateJoinTokenRequest{Ttl: durationProto(time.Second)})
	wrongSecret := srv.Token(t, nil)
	wrongSecret = wrongSecret[:len(wrongSecret)-1] + flip(wrongSecret[len(wrongSecret)-1])
	clk.Advance(time.Second) // the token's TTL, on the server's clock

	tests := []struct {
		name, token, want string
	}{
		{"reused", used, "already been used"},
		{"revoked", revoked, "has been revoked"},
		{"expired", expired, "has expired"},
		{"wrong secret", wrongSecret, "unknown or its secret does not match"},
		{"malformed", "llorch1.nope", "malformed"},
		{"truncated", used[:len(used)-5], "malformed or truncated"},
		{"empty", "", "malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, dir, err := enrollEdge(t, srv, tt.token)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("enroll = %v, want an error containing %q", err, tt.want)
			}
			if _, err := state.Load(dir); !errors.Is(err, state.ErrNotEnrolled) {
				t.Errorf("state after a refusal: %v, want nothing written", err)
			}
		})
	}
	nodes, err := srv.Admin.ListNodes(ctx, connect.NewRequest(&llorchv1.ListNodesRequest{}))
	if err != nil || len(nodes.Msg.GetNodes()) != 1 {
		t.Fatalf("nodes after refusals: %d, %v; want only the first", len(nodes.Msg.GetNodes()), err)
	}
}

func flip(c byte) string {
	if c == 'a' {
		return "b"
	}
	return "a"
}

// A token pins its CA: against another control plane the edge stops in the
// TLS handshake, so the token never leaves the machine.
func TestEnrollFingerprintMismatchSendsNothing(t *testing.T) {
	a := servertest.Start(t, nil)
	b := servertest.Start(t, nil)
	token := a.Token(t, nil)
	_, err := enroll.Enroll(context.Background(), enroll.Config{StateDir: t.TempDir(), ControlURL: b.URL(), Token: token})
	var mismatch *certs.FingerprintMismatchError
	if !errors.As(err, &mismatch) {
		t.Fatalf("enroll against another CA = %v, want a FingerprintMismatchError", err)
	}
	events, err := b.Admin.ListEvents(context.Background(), connect.NewRequest(&llorchv1.ListEventsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range events.Msg.GetEvents() {
		if e.GetKind() != "token_created" {
			t.Errorf("server B recorded %v", e)
		}
	}
	// And the token still works where it belongs.
	if _, _, err := enrollEdge(t, a, token); err != nil {
		t.Fatalf("enroll with the right control plane: %v", err)
	}
}

func TestConcurrentEnrollSingleUse(t *testing.T) {
	srv := servertest.Start(t, nil)
	token := srv.Token(t, nil)
	const n = 16
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, errs[i] = enrollEdge(t, srv, token)
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case !strings.Contains(err.Error(), "already been used"):
			t.Errorf("unexpected error: %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d enrollments succeeded with a single-use token, want 1", ok)
	}
}

func TestRenewal(t *testing.T) {
	srv := servertest.Start(t, nil)
	res, dir, err := enrollEdge(t, srv, srv.Token(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	old := res.Identity
	a := agent.New(agent.Config{StateDir: dir}, old)
	if err := a.Renew(context.Background(), client.NodeClient(client.NewIdentity(old))); err != nil {
		t.Fatalf("renew: %v", err)
	}
	renewed, err := state.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.NodeID != old.NodeID || certs.SerialHex(renewed.Leaf()) == certs.SerialHex(old.Leaf()) {
		t.Fatalf("renewed identity: node %s serial %s (old %s)", renewed.NodeID, certs.SerialHex(renewed.Leaf()), certs.SerialHex(old.Leaf()))
	}
	if renewed.Key.PublicKey.Equal(&old.Key.PublicKey) {
		t.Error("renewal kept the old key")
	}
	// Until the new certificate is used, the old one still works (a lost
	// answer must not strand the node) ...
	if _, err := whoAmI(old); err != nil {
		t.Fatalf("old certificate before first use of the new one: %v", err)
	}
	// ... the new one's first use makes it current ...
	who, err := whoAmI(renewed)
	if err != nil {
		t.Fatalf("renewed certificate: %v", err)
	}
	if who.GetNode().GetCertificateSerial() != certs.SerialHex(renewed.Leaf()) {
		t.Errorf("current serial %s, want the renewed %s", who.GetNode().GetCertificateSerial(), certs.SerialHex(renewed.Leaf()))
	}
	// ... and from then on the old one is refused.
	if _, err := whoAmI(old); !errors.Is(err, edge.ErrSuperseded) {
		t.Fatalf("old certificate after promotion: %v, want ErrSuperseded", err)
	}
	// Only the current certificate may renew.
	if err := a.Renew(context.Background(), client.NodeClient(client.NewIdentity(old))); !errors.Is(err, edge.ErrSuperseded) {
		t.Fatalf("renew with the old certificate: %v, want ErrSuperseded", err)
	}
}

func TestProtocolsOnOnePort(t *testing.T) {
	srv := servertest.Start(t, nil)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	tlsCfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}
	h2 := &http.Client{Transport: &http2.Transport{TLSClientConfig: tlsCfg}}
	h1 := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg}}
	tests := []struct {
		name   string
		client *http.Client
		opts   []connect.ClientOption
	}{
		{"connect", h2, nil},
		{"connect over HTTP/1.1", h1, nil},
		{"grpc", h2, []connect.ClientOption{connect.WithGRPC()}},
		{"grpc-web", h2, []connect.ClientOption{connect.WithGRPCWeb()}},
		{"grpc-web over HTTP/1.1", h1, []connect.ClientOption{connect.WithGRPCWeb()}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			info := llorchv1connect.NewInfoServiceClient(tt.client, srv.URL(), tt.opts...)
			resp, err := info.GetInfo(context.Background(), connect.NewRequest(&llorchv1.GetInfoRequest{}))
			if err != nil {
				t.Fatalf("GetInfo: %v", err)
			}
			if resp.Msg.GetCaFingerprint() != srv.Fingerprint() {
				t.Errorf("fingerprint %s, want %s", resp.Msg.GetCaFingerprint(), srv.Fingerprint())
			}
			node := llorchv1connect.NewNodeServiceClient(tt.client, srv.URL(), tt.opts...)
			_, err = node.WhoAmI(context.Background(), connect.NewRequest(&llorchv1.WhoAmIRequest{}))
			if connect.CodeOf(err) != connect.CodeUnauthenticated {
				t.Errorf("WhoAmI without a client certificate: %v, want unauthenticated", err)
			}
			admin := llorchv1connect.NewAdminServiceClient(tt.client, srv.URL(), tt.opts...)
			_, err = admin.ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{}))
			if connect.CodeOf(err) != connect.CodeUnauthenticated {
				t.Errorf("ListNodes without an API token: %v, want unauthenticated", err)
			}
		})
	}
}

// Small messages (heartbeat acks, commands, most answers) go out
// uncompressed even when the client accepts gzip: compressing a few dozen
// bytes makes them larger and costs more than the rest of the call.
func TestSmallResponsesNotCompressed(t *testing.T) {
	srv := servertest.Start(t, nil)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	client := &http.Client{Transport: &http2.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}}}
	req, _ := http.NewRequest(http.MethodPost, srv.URL()+llorchv1connect.InfoServiceGetInfoProcedure, strings.NewReader(""))
	req.Header.Set("Content-Type", "application/proto")
	req.Header.Set("Accept-Encoding", "gzip")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GetInfo: HTTP %d", resp.StatusCode)
	}
	if enc := resp.Header.Get("Content-Encoding"); enc != "" {
		t.Fatalf("a small answer went out with Content-Encoding %q, want none", enc)
	}
}

// The profiler answers on the admin socket only, never on the public port.
func TestProfilerOnlyOnTheSocket(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) { c.APIToken = testAPIToken })
	local := adminclient.SocketHTTP(srv.Config.DataDir)
	resp, err := local.Get(adminclient.SocketURL + "/debug/pprof/heap")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("heap profile over the socket: HTTP %d, want 200", resp.StatusCode)
	}
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	public := &http.Client{Transport: &http2.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}}}
	req, _ := http.NewRequest(http.MethodGet, srv.URL()+"/debug/pprof/heap", nil)
	req.Header.Set("Authorization", "Bearer profile-test-token")
	resp, err = public.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("heap profile on the public port: HTTP %d, want 404", resp.StatusCode)
	}
}

func TestAPIToken(t *testing.T) {
	const token = testAPIToken
	srv := servertest.Start(t, func(c *server.Config) { c.APIToken = token })
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	hc := &http.Client{Transport: &http2.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	withToken := func(tok string) connect.ClientOption { return adminclient.BearerToken(tok) }
	tests := []struct {
		name  string
		token string
		want  connect.Code
	}{
		{"right token", token, 0},
		{"wrong token", token[:len(token)-1] + "x", connect.CodeUnauthenticated},
		{"empty token", "", connect.CodeUnauthenticated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			admin := llorchv1connect.NewAdminServiceClient(hc, srv.URL(), withToken(tt.token))
			_, err := admin.ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{}))
			if got := connect.CodeOf(err); err != nil && got != tt.want || err == nil && tt.want != 0 {
				t.Fatalf("ListNodes: %v, want code %v", err, tt.want)
			}
		})
	}
}

func TestCORS(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) { c.CORSOrigins = []string{"https://console.example"} })
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	preflight := func(origin string) string {
		req, _ := http.NewRequest(http.MethodOptions, srv.URL()+llorchv1connect.InfoServiceGetInfoProcedure, nil)
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "connect-protocol-version,content-type")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.Header.Get("Access-Control-Allow-Origin")
	}
	if got := preflight("https://console.example"); got != "https://console.example" {
		t.Errorf("allowed origin: Access-Control-Allow-Origin %q", got)
	}
	if got := preflight("https://evil.example"); got != "" {
		t.Errorf("other origin: Access-Control-Allow-Origin %q, want none", got)
	}
}

func TestConfigValidate(t *testing.T) {
	base := server.DefaultConfig()
	base.DataDir = "/tmp/x"
	tests := []struct {
		name string
		edit func(*server.Config)
		want string
	}{
		{"defaults", func(*server.Config) {}, ""},
		{"no data dir", func(c *server.Config) { c.DataDir = "" }, "data directory"},
		{"public without token", func(c *server.Config) { c.Listen = "0.0.0.0:8443" }, "LLORCH_API_TOKEN"},
		{"all interfaces without token", func(c *server.Config) { c.Listen = ":8443" }, "LLORCH_API_TOKEN"},
		{"public with token", func(c *server.Config) { c.Listen = "0.0.0.0:8443"; c.APIToken = testAPIToken }, ""},
		{"short token", func(c *server.Config) { c.APIToken = "9c2a7be1d04c" }, "too weak"},
		{"hex token of 120 bits", func(c *server.Config) { c.APIToken = testAPIToken[:30] }, "too weak"},
		{"one character", func(c *server.Config) { c.APIToken = strings.Repeat("x", 64) }, "not random"},
		{"a repeated pattern", func(c *server.Config) { c.APIToken = strings.Repeat("0123456789abcdef", 4) }, "not random"},
		{"whitespace", func(c *server.Config) { c.APIToken = testAPIToken + "\n" }, "whitespace"},
		{"base64 of 128 bits", func(c *server.Config) { c.APIToken = "q83vEjRWeJq8XvBIk2EpLw" }, ""},
		{"bad trust domain", func(c *server.Config) { c.TrustDomain = "Bad Domain" }, "trust domain"},
		{"lifetime too short", func(c *server.Config) { c.NodeCertLifetime = time.Minute }, "lifetime"},
		{"bad listen", func(c *server.Config) { c.Listen = "nowhere" }, "listen address"},
		{"bad origin", func(c *server.Config) { c.CORSOrigins = []string{"*"} }, "CORS origin"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base
			tt.edit(&c)
			err := c.Validate()
			if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("Validate = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestDataDirLocked(t *testing.T) {
	srv := servertest.Start(t, nil)
	cfg := srv.Config
	cfg.Listen = "127.0.0.1:0"
	_, err := server.New(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "in use by another control plane") {
		t.Fatalf("second server on the same data dir: %v", err)
	}
}

func durationProto(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

// testNode calls WhoAmI as a node over connections that share one TLS
// configuration, as an edge's do. present picks what a handshake presents
// from the identity's chain, given the CAs the control plane named in it. The
// node records how many certificates each handshake sent and whether each
// connection resumed a TLS session.
type testNode struct {
	cfg     *tls.Config
	url     string
	sent    []int
	resumed []bool
}

func newTestNode(id state.Identity, present func(id state.Identity, acceptableCAs [][]byte) tls.Certificate) *testNode {
	n := &testNode{url: id.ControlURL}
	n.cfg = certs.NodeClientTLSConfig(id.RootPool(), func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c := present(id, cri.AcceptableCAs)
		n.sent = append(n.sent, len(c.Certificate))
		return &c, nil
	})
	return n
}

// whoAmI calls WhoAmI over a new connection.
func (n *testNode) whoAmI() error {
	tr := &http2.Transport{
		TLSClientConfig: n.cfg,
		DialTLSContext: func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
			c, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, network, addr)
			if err == nil {
				n.resumed = append(n.resumed, c.(*tls.Conn).ConnectionState().DidResume)
			}
			return c, err
		},
	}
	defer tr.CloseIdleConnections()
	nodes := llorchv1connect.NewNodeServiceClient(&http.Client{Transport: tr}, n.url)
	_, err := nodes.WhoAmI(context.Background(), connect.NewRequest(&llorchv1.WhoAmIRequest{}))
	return client.Explain(err)
}

// whoAmIPresenting calls WhoAmI as id over a connection of its own that
// presents what present picks; it returns how many certificates went out.
func whoAmIPresenting(id state.Identity, present func(id state.Identity, acceptableCAs [][]byte) tls.Certificate) (int, error) {
	n := newTestNode(id, present)
	err := n.whoAmI()
	if len(n.sent) == 0 {
		return 0, err
	}
	return n.sent[len(n.sent)-1], err
}

func edgePresents(id state.Identity, acceptableCAs [][]byte) tls.Certificate {
	return id.TLSCertificate(acceptableCAs)
}

func leafOnly(id state.Identity, _ [][]byte) tls.Certificate {
	c := id.TLSCertificate(nil)
	c.Certificate = c.Certificate[:1]
	return c
}

// The control plane names its intermediate in the handshake, so an edge
// presents its leaf alone; after the intermediate is replaced, an edge
// whose certificate the old one issued presents its chain and still gets in.
// A certificate from another CA gets in neither way.
func TestClientCertificateChains(t *testing.T) {
	srv := servertest.Start(t, nil)
	res, _, err := enrollEdge(t, srv, srv.Token(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	id := res.Identity
	if sent, err := whoAmIPresenting(id, edgePresents); err != nil || sent != 1 {
		t.Fatalf("edge under the current intermediate: sent %d certificates, WhoAmI %v; want the leaf alone, accepted", sent, err)
	}

	// The intermediate is lost: the next start makes a new one.
	cfg := srv.Config
	cfg.Listen = srv.Addr().String()
	srv.Stop()
	for _, f := range []string{"intermediate.crt", "intermediate.key"} {
		if err := os.Remove(filepath.Join(cfg.DataDir, "ca", f)); err != nil {
			t.Fatal(err)
		}
	}
	srv = servertest.StartConfig(t, cfg)
	if sent, err := whoAmIPresenting(id, edgePresents); err != nil || sent != 2 {
		t.Fatalf("edge under the replaced intermediate: sent %d certificates, WhoAmI %v; want the chain, accepted", sent, err)
	}
	if _, err := whoAmIPresenting(id, leafOnly); err == nil {
		t.Fatal("the leaf of a replaced intermediate was accepted without its chain")
	}
	renewed, _, err := enrollEdge(t, srv, srv.Token(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	if sent, err := whoAmIPresenting(renewed.Identity, edgePresents); err != nil || sent != 1 {
		t.Fatalf("edge enrolled under the new intermediate: sent %d certificates, WhoAmI %v; want the leaf alone, accepted", sent, err)
	}

	// Another control plane's node, pointed at this one.
	other := servertest.Start(t, nil)
	foreign, _, err := enrollEdge(t, other, other.Token(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	stranger := foreign.Identity
	stranger.ControlURL = srv.URL()
	stranger.Roots = renewed.Identity.Roots // it trusts this control plane's server certificate
	for name, present := range map[string]func(state.Identity, [][]byte) tls.Certificate{"chain": edgePresents, "leaf alone": leafOnly} {
		if _, err := whoAmIPresenting(stranger, present); err == nil {
			t.Errorf("a node certificate from another CA (%s) was accepted", name)
		}
	}
}

// After a restart an edge resumes its TLS session with the ticket the control
// plane gave it before (the ticket keys are kept in the data directory), and
// a resumed session is still authorized per request: removal applies.
func TestSessionResumptionAcrossRestart(t *testing.T) {
	srv := servertest.Start(t, nil)
	res, _, err := enrollEdge(t, srv, srv.Token(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	node := newTestNode(res.Identity, edgePresents)
	if err := node.whoAmI(); err != nil {
		t.Fatalf("first call: %v", err)
	}

	cfg := srv.Config
	cfg.Listen = srv.Addr().String()
	srv.Stop()
	srv = servertest.StartConfig(t, cfg)
	if err := node.whoAmI(); err != nil {
		t.Fatalf("after the restart: %v", err)
	}
	if len(node.resumed) != 2 || node.resumed[0] || !node.resumed[1] {
		t.Fatalf("resumed per connection %v, want [false true]: a full handshake, then a resumed one after the restart", node.resumed)
	}

	if _, err := srv.Admin.RemoveNode(context.Background(), connect.NewRequest(&llorchv1.RemoveNodeRequest{Id: res.Identity.NodeID})); err != nil {
		t.Fatal(err)
	}
	if err := node.whoAmI(); !errors.Is(err, edge.ErrRevoked) {
		t.Fatalf("removed node over a resumed session: %v, want ErrRevoked", err)
	}
	if !node.resumed[len(node.resumed)-1] {
		t.Fatal("the call after removal did not resume; the test did not test a resumed session")
	}
}
