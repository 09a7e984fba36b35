package authz_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/authz"
	"github.com/llorch/llorch/control/ratelimit"
	"github.com/llorch/llorch/internal/clock"
	"github.com/llorch/llorch/internal/refusal"
)

const (
	trustDomain = "test.local"
	apiToken    = "3f9c2a7be1d04c58a6e2b9f17d3c08e4"
)

var t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

// fakeNodes is the store as the gate sees it.
type fakeNodes struct {
	nodes    map[string]control.Node
	promoted []string
	err      error
}

func (f *fakeNodes) GetNode(_ context.Context, id string) (control.Node, error) {
	if f.err != nil {
		return control.Node{}, f.err
	}
	n, ok := f.nodes[id]
	if !ok {
		return control.Node{}, control.ErrNotFound
	}
	return n, nil
}

func (f *fakeNodes) PromoteSerial(_ context.Context, id, serial string) (control.Node, error) {
	n := f.nodes[id]
	if serial != n.NextCertSerial {
		return control.Node{}, control.ErrNotCurrentCert
	}
	n.CertSerial, n.NextCertSerial = serial, ""
	f.nodes[id] = n
	f.promoted = append(f.promoted, serial)
	return n, nil
}

// leaf makes a certificate for node id with serial, valid until notAfter.
func leaf(t *testing.T, id string, serial int64, notAfter time.Time) *x509.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(certs.NodeSPIFFEID(trustDomain, id))
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: id},
		NotBefore: t0.Add(-time.Hour), NotAfter: notAfter, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

type env struct {
	nodes    *fakeNodes
	clock    *clock.Fake
	failures *ratelimit.Keyed
	handler  http.Handler
	reached  *authz.Caller
}

func newEnv(t *testing.T, local bool) *env {
	t.Helper()
	e := &env{nodes: &fakeNodes{nodes: map[string]control.Node{}}, clock: clock.NewFake(t0)}
	e.failures = ratelimit.NewKeyed(ratelimit.Every(time.Minute, 3), 0, e.clock)
	gate := authz.New(authz.Config{
		Routes: authz.Routes{
			"/svc/Public":  {Policy: authz.Public},
			"/svc/Node":    {Policy: authz.Node},
			"/svc/Admin":   {Policy: authz.Admin},
			"/svc/Denied":  {},
			"/metrics":     {Policy: authz.Admin, HTTP: true},
			"/debug/":      {Policy: authz.Admin, HTTP: true},
			"/debug/open/": {Policy: authz.Public, HTTP: true},
		},
		TrustDomain: trustDomain,
		Nodes:       e.nodes,
		APIToken:    apiToken,
		Local:       local,
		Failures:    e.failures,
		Clock:       e.clock,
	})
	e.handler = gate.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, ok := authz.CallerFrom(r.Context())
		if !ok {
			t.Error("a request reached the handler with no caller")
		}
		e.reached = &c
	}))
	return e
}

type call struct {
	path   string
	cert   *x509.Certificate
	header string // Authorization
	remote string
}

// do runs c through the gate and returns the status and the reason header,
// and whether the handler was reached.
func (e *env) do(c call) (int, string, bool) {
	e.reached = nil
	r := httptest.NewRequest(http.MethodPost, "https://cp"+c.path, nil)
	r.Header.Set("Content-Type", "application/proto") // Connect unary
	r.RemoteAddr = c.remote
	if r.RemoteAddr == "" {
		r.RemoteAddr = "192.0.2.1:1234"
	}
	if c.header != "" {
		r.Header.Set("Authorization", c.header)
	}
	r.TLS = &tls.ConnectionState{}
	if c.cert != nil {
		r.TLS.VerifiedChains = [][]*x509.Certificate{{c.cert}}
	}
	w := httptest.NewRecorder()
	e.handler.ServeHTTP(w, r)
	return w.Code, w.Header().Get(refusal.ReasonHeader), e.reached != nil
}

// A route that is not in the table, or is in it without a policy, is refused:
// mounting a handler is never enough to make it reachable.
func TestUnlistedAndUnpolicedRoutesRefused(t *testing.T) {
	e := newEnv(t, false)
	for _, path := range []string{"/", "/svc/Other", "/svc/PublicX", "/svc", "/metrics/x", "/debugx"} {
		if code, _, reached := e.do(call{path: path, header: "Bearer " + apiToken}); reached || code != http.StatusNotFound {
			t.Errorf("%s: %d (handler reached: %v), want 404 and not reached", path, code, reached)
		}
	}
	if code, _, reached := e.do(call{path: "/svc/Denied", header: "Bearer " + apiToken}); reached || code != http.StatusForbidden {
		t.Errorf("a route with no policy: %d (reached %v), want 403", code, reached)
	}
	// The local socket is no exception.
	local := newEnv(t, true)
	if _, _, reached := local.do(call{path: "/svc/Denied"}); reached {
		t.Error("a route with no policy reached over the socket")
	}
}

func TestPrefixRoutes(t *testing.T) {
	rs := authz.Routes{"/a/": {Policy: authz.Admin}, "/a/b/": {Policy: authz.Public}, "/x": {Policy: authz.Node}}
	for _, tt := range []struct {
		path string
		want authz.Policy
		ok   bool
	}{
		{"/a/1", authz.Admin, true}, {"/a/b/1", authz.Public, true}, {"/a/b/", authz.Public, true},
		{"/x", authz.Node, true}, {"/x/", 0, false}, {"/a", 0, false}, {"/b/a/", 0, false},
	} {
		r, ok := rs.Lookup(tt.path)
		if ok != tt.ok || r.Policy != tt.want {
			t.Errorf("Lookup(%s) = %v, %v; want %v, %v", tt.path, r.Policy, ok, tt.want, tt.ok)
		}
	}
}

func TestAdminToken(t *testing.T) {
	e := newEnv(t, false)
	for _, tt := range []struct {
		name, header string
		want         int
	}{
		{"right", "Bearer " + apiToken, http.StatusOK},
		{"lower-case scheme", "bearer " + apiToken, http.StatusOK},
		{"upper-case scheme", "BEARER " + apiToken, http.StatusOK},
		{"missing", "", http.StatusUnauthorized},
		{"other scheme", "Basic " + apiToken, http.StatusUnauthorized},
		{"no token", "Bearer ", http.StatusUnauthorized},
		{"wrong", "Bearer " + apiToken[:31] + "0", http.StatusUnauthorized},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Each from an address of its own: the wrong ones are counted.
			if code, _, _ := e.do(call{path: "/svc/Admin", header: tt.header, remote: "198.51.100." + strconv.Itoa(len(tt.name)+len(tt.header)) + ":1"}); code != tt.want {
				t.Errorf("%d, want %d", code, tt.want)
			}
		})
	}
	// Over the socket, no token is needed; /metrics answers in plain HTTP.
	local := newEnv(t, true)
	if code, _, reached := local.do(call{path: "/metrics"}); code != http.StatusOK || !reached {
		t.Errorf("metrics over the socket: %d", code)
	}
	if code, _, _ := e.do(call{path: "/metrics"}); code != http.StatusUnauthorized {
		t.Errorf("metrics with no token: %d, want 401", code)
	}
}

// An address that presented too many wrong tokens is refused, the right
// token included, until its bucket refills; other addresses are not.
func TestRefusedTokensPerAddress(t *testing.T) {
	e := newEnv(t, false)
	bad := call{path: "/svc/Admin", header: "Bearer nope", remote: "203.0.113.9:5000"}
	for range 3 {
		if code, _, _ := e.do(bad); code != http.StatusUnauthorized {
			t.Fatalf("wrong token: %d", code)
		}
	}
	good := call{path: "/svc/Admin", header: "Bearer " + apiToken, remote: "203.0.113.9:5001"}
	code, reason, reached := e.do(good)
	if code != http.StatusTooManyRequests || reason != refusal.RateLimited || reached {
		t.Errorf("right token after 3 wrong: %d %q (reached %v), want 429 rate-limited", code, reason, reached)
	}
	if code, _, _ := e.do(call{path: "/svc/Admin", header: "Bearer " + apiToken, remote: "203.0.113.10:1"}); code != http.StatusOK {
		t.Errorf("another address: %d", code)
	}
	e.clock.Advance(time.Minute)
	if code, _, _ := e.do(good); code != http.StatusOK {
		t.Errorf("after a token came back: %d", code)
	}
}

func TestNodeCertificates(t *testing.T) {
	e := newEnv(t, false)
	current := leaf(t, "n1", 0x10, t0.Add(time.Hour))
	next := leaf(t, "n1", 0x11, t0.Add(2*time.Hour))
	old := leaf(t, "n1", 0x0f, t0.Add(time.Hour))
	e.nodes.nodes["n1"] = control.Node{ID: "n1", Status: control.StatusOnline, CertSerial: certs.SerialHex(current), NextCertSerial: certs.SerialHex(next)}
	e.nodes.nodes["gone"] = control.Node{ID: "gone", Status: control.StatusRemoved, CertSerial: "01"}
	gone := leaf(t, "gone", 1, t0.Add(time.Hour))
	stranger := leaf(t, "stranger", 1, t0.Add(time.Hour))
	expired := leaf(t, "n1", 0x10, t0.Add(-time.Minute))

	for _, tt := range []struct {
		name   string
		cert   *x509.Certificate
		code   int
		reason string
	}{
		{"current", current, http.StatusOK, ""},
		{"none", nil, http.StatusUnauthorized, refusal.NoCert},
		{"removed node", gone, http.StatusForbidden, refusal.Revoked},
		{"unknown node", stranger, http.StatusNotFound, refusal.Unknown},
		{"expired", expired, http.StatusUnauthorized, refusal.Expired},
		{"superseded", old, http.StatusForbidden, refusal.Superseded},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, reason, reached := e.do(call{path: "/svc/Node", cert: tt.cert})
			if code != tt.code || reason != tt.reason || reached != (tt.code == http.StatusOK) {
				t.Errorf("%d %q (reached %v), want %d %q", code, reason, reached, tt.code, tt.reason)
			}
		})
	}
	// The node's caller carries its identity.
	e.do(call{path: "/svc/Node", cert: current})
	if c := e.reached; c == nil || c.NodeID != "n1" || c.CertSerial != certs.SerialHex(current) || c.Policy != authz.Node {
		t.Errorf("caller %+v", c)
	}
	// The first use of the renewed certificate makes it current, and the old
	// one is refused from then on.
	if code, _, _ := e.do(call{path: "/svc/Node", cert: next}); code != http.StatusOK || len(e.nodes.promoted) != 1 {
		t.Fatalf("renewed certificate: %d, promoted %v", code, e.nodes.promoted)
	}
	if code, reason, _ := e.do(call{path: "/svc/Node", cert: current}); code != http.StatusForbidden || reason != refusal.Superseded {
		t.Errorf("old certificate after the renewal: %d %q", code, reason)
	}
	// A store that fails is an internal error, never a pass.
	e.nodes.err = errors.New("disk on fire")
	if code, _, reached := e.do(call{path: "/svc/Node", cert: next}); code != http.StatusInternalServerError || reached {
		t.Errorf("failing store: %d (reached %v)", code, reached)
	}
}

// Public routes need nothing and see who called; admin routes do not take a
// node certificate for a credential.
func TestPublicAndAdminWithCertificate(t *testing.T) {
	e := newEnv(t, false)
	cert := leaf(t, "n1", 1, t0.Add(time.Hour))
	e.nodes.nodes["n1"] = control.Node{ID: "n1", CertSerial: certs.SerialHex(cert)}
	if code, _, reached := e.do(call{path: "/svc/Public", remote: "[2001:db8::1]:9"}); code != http.StatusOK || !reached || e.reached.Addr != "2001:db8::/64" {
		t.Errorf("public: %d, caller %+v", code, e.reached)
	}
	if code, _, _ := e.do(call{path: "/svc/Admin", cert: cert}); code != http.StatusUnauthorized {
		t.Errorf("admin with only a node certificate: %d, want 401", code)
	}
	if code, _, _ := e.do(call{path: "/debug/open/x"}); code != http.StatusOK {
		t.Errorf("the longer public prefix under an admin one: %d", code)
	}
	if code, _, _ := e.do(call{path: "/debug/x"}); code != http.StatusUnauthorized {
		t.Errorf("admin prefix: %d", code)
	}
}

func TestBearerToken(t *testing.T) {
	for _, tt := range []struct {
		header, token string
		ok            bool
	}{
		{"Bearer abc", "abc", true}, {"bearer abc", "abc", true}, {"BeArEr  abc", "abc", true},
		{"Bearer", "", false}, {"Bearer ", "", false}, {"Token abc", "", false}, {"", "", false},
	} {
		h := http.Header{}
		if tt.header != "" {
			h.Set("Authorization", tt.header)
		}
		if token, ok := authz.BearerToken(h); token != tt.token || ok != tt.ok {
			t.Errorf("%q: %q %v", tt.header, token, ok)
		}
	}
	if fp := authz.Fingerprint(apiToken); len(fp) != 16 || strings.Contains(apiToken, fp) {
		t.Errorf("fingerprint %q", fp)
	}
}
