// Package authz is the gate in front of everything the control plane
// serves: one HTTP middleware that looks every request's path up in one
// table of routes, decides whether the caller may call it, and puts the
// caller's identity in the request's context. A path with no route is
// refused, never served. It is the only code that reads a connection's TLS
// state or a bearer token.
//
// Policies:
//   - Public: anyone (enrollment, where the join token inside the request
//     is the credential; server info; health; reflection);
//   - Node: a verified client certificate whose SPIFFE ID names a node that
//     is not removed and whose serial is the node's current (or next) one;
//   - Admin: the local Unix socket, or an API token as a bearer token.
//
// Refusals go to the wire through control/connecterr, in the caller's RPC
// protocol (Connect, gRPC, gRPC-web) or, for plain HTTP routes such as
// /metrics, as an HTTP status and a line of text. Every refused credential
// is logged once (rate-limited), with the remote address and the
// credential's ID or fingerprint, never the secret.
package authz

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/connecterr"
	"github.com/llorch/llorch/control/metrics"
	"github.com/llorch/llorch/control/ratelimit"
	"github.com/llorch/llorch/internal/clock"
)

// Policy says who may call a route.
type Policy int

// The policies. The zero value refuses everyone.
const (
	Deny Policy = iota
	Public
	Node
	Admin
)

func (p Policy) String() string {
	switch p {
	case Public:
		return "public"
	case Node:
		return "node"
	case Admin:
		return "admin"
	}
	return "deny"
}

// Route is one mounted path: who may call it, and how a refusal is written.
type Route struct {
	Policy Policy
	// HTTP marks a path that is not an RPC procedure (/metrics): refusals
	// are an HTTP status and a line of text.
	HTTP bool
}

// Routes maps request paths to routes: exact paths
// ("/llorch.v1.NodeService/WhoAmI", "/metrics") and prefixes that end in
// "/" ("/debug/pprof/"), the longest prefix winning. A path that matches
// none is refused.
type Routes map[string]Route

// Lookup returns the route for path.
func (rs Routes) Lookup(path string) (Route, bool) {
	if r, ok := rs[path]; ok {
		return r, true
	}
	best, found := "", false
	for p := range rs {
		if strings.HasSuffix(p, "/") && strings.HasPrefix(path, p) && len(p) > len(best) {
			best, found = p, true
		}
	}
	return rs[best], found
}

// Nodes is what authorization needs to know about nodes.
type Nodes interface {
	GetNode(ctx context.Context, id string) (control.Node, error)
	// PromoteSerial makes serial the node's current certificate if it is its
	// next one; ErrNotCurrentCert otherwise, ErrNodeRemoved if removed.
	PromoteSerial(ctx context.Context, nodeID, serial string) (control.Node, error)
}

// Config configures a Gate.
type Config struct {
	Routes      Routes
	TrustDomain string
	Nodes       Nodes
	// APIToken is the admin bearer token; empty: admin routes only over the
	// local socket.
	APIToken string
	// Local makes this the admin socket's gate: its file permissions are the
	// credential, so every caller is an admin.
	Local bool
	// Failures counts refused credentials per source address: an address
	// whose bucket is empty is refused before its credential is checked.
	// nil: no limit.
	Failures *ratelimit.Keyed
	// Refusals logs refused credentials; nil: a Log on Logger.
	Refusals *ratelimit.Log
	Metrics  *metrics.Metrics // nil: none
	Clock    clock.Clock      // nil: the wall clock
	Logger   *slog.Logger     // nil: discard
}

// Caller is who is calling, as the gate established it.
type Caller struct {
	Policy Policy
	// NodeID and CertSerial are set for node routes.
	NodeID     string
	CertSerial string
	// Local is true for calls over the local Unix socket.
	Local bool
	// Addr is the source address's rate-limit key (ratelimit.AddrKey);
	// empty over the local socket.
	Addr string
	// TLS is the connection's TLS state; nil over the local socket.
	TLS *tls.ConnectionState
}

type callerKey struct{}

func withCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// CallerFrom returns the caller the gate established.
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

// Gate is the authorization middleware.
type Gate struct {
	cfg      Config
	token    apiToken
	clock    clock.Clock
	log      *slog.Logger
	refusals *ratelimit.Log
	errs     *connect.ErrorWriter
}

// New returns the gate for cfg.
func New(cfg Config) *Gate {
	g := &Gate{cfg: cfg, token: newAPIToken(cfg.APIToken), clock: cfg.Clock, log: cfg.Logger, refusals: cfg.Refusals,
		errs: connect.NewErrorWriter()}
	if g.clock == nil {
		g.clock = clock.Real{}
	}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	if g.refusals == nil {
		g.refusals = ratelimit.NewLog(g.log, ratelimit.Limit{}, g.clock)
	}
	return g
}

// Handler puts the gate in front of next.
func (g *Gate) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		route, ok := g.cfg.Routes.Lookup(r.URL.Path)
		if !ok {
			g.refuse(w, r, route, fmt.Errorf("%w: no such route %s", control.ErrNotFound, r.URL.Path))
			return
		}
		c, err := g.authorize(r.Context(), r, route.Policy)
		if err != nil {
			g.refuse(w, r, route, err)
			return
		}
		next.ServeHTTP(w, r.WithContext(withCaller(r.Context(), c)))
	})
}

func (g *Gate) authorize(ctx context.Context, r *http.Request, policy Policy) (Caller, error) {
	c := Caller{Policy: policy, Local: g.cfg.Local, TLS: r.TLS}
	if !g.cfg.Local {
		c.Addr = ratelimit.AddrKey(r.RemoteAddr)
	}
	switch policy {
	case Public:
		return c, nil
	case Admin:
		if g.cfg.Local {
			return c, nil
		}
		return c, g.checkToken(ctx, r, c.Addr)
	case Node:
		nodeID, serial, err := g.checkNode(ctx, r)
		if err != nil {
			g.refusals.Refused(ctx, "node certificate refused", "remote", r.RemoteAddr, "node_id", nodeID, "serial", serial, "err", err)
			return Caller{}, err
		}
		c.NodeID, c.CertSerial = nodeID, serial
		return c, nil
	}
	return Caller{}, fmt.Errorf("%w: %s is not allowed", control.ErrPermissionDenied, r.URL.Path)
}

// refuse writes err, as connecterr maps it, in the route's format.
func (g *Gate) refuse(w http.ResponseWriter, r *http.Request, route Route, err error) {
	cerr := connecterr.Error(r.Context(), g.log, err)
	if route.HTTP || !g.errs.IsSupported(r) {
		for k, vs := range cerr.Meta() {
			w.Header()[k] = vs
		}
		http.Error(w, cerr.Message(), connecterr.HTTPStatus(cerr.Code()))
		return
	}
	g.errs.Write(w, r, cerr)
}

// apiToken checks bearer tokens against the admin token; it keeps only its hash.
type apiToken struct {
	set  bool
	hash [32]byte
}

func newAPIToken(token string) apiToken {
	return apiToken{set: token != "", hash: sha256.Sum256([]byte(token))}
}

// checkToken checks the request's bearer token. An address that failed too
// often is refused before its token is looked at.
func (g *Gate) checkToken(ctx context.Context, r *http.Request, addr string) error {
	if !g.token.set {
		return fmt.Errorf("%w: admin procedures need the local socket (--data DIR): this server has no API token configured (LLORCH_API_TOKEN)", control.ErrUnauthenticated)
	}
	if blocked, wait := g.cfg.Failures.Blocked(addr); blocked {
		g.cfg.Metrics.Limited("credentials")
		return &control.RetryLater{Err: fmt.Errorf("%w: too many refused credentials from %s", control.ErrRateLimited, addr), After: wait}
	}
	token, ok := BearerToken(r.Header)
	if !ok {
		g.cfg.Failures.Charge(addr)
		g.refusals.Refused(ctx, "API token refused", "remote", r.RemoteAddr, "reason", "missing")
		return fmt.Errorf("%w: missing API token: send Authorization: Bearer <token> (LLORCH_API_TOKEN)", control.ErrUnauthenticated)
	}
	got := sha256.Sum256([]byte(token))
	if subtle.ConstantTimeCompare(got[:], g.token.hash[:]) != 1 {
		g.cfg.Failures.Charge(addr)
		g.refusals.Refused(ctx, "API token refused", "remote", r.RemoteAddr, "reason", "invalid", "fingerprint", Fingerprint(token))
		return fmt.Errorf("%w: invalid API token", control.ErrUnauthenticated)
	}
	return nil
}

// BearerToken is the token of an "Authorization: Bearer <token>" header;
// the scheme is matched without regard to case (RFC 9110 11.1).
func BearerToken(h http.Header) (string, bool) {
	scheme, token, ok := strings.Cut(h.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimLeft(token, " ")
	return token, token != ""
}

// Fingerprint names a presented secret in logs without revealing it: the
// first 8 bytes of its SHA-256, in hex.
func Fingerprint(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:8])
}

// checkNode checks the request's client certificate and returns its node
// and serial (also when it refuses them, for the log).
func (g *Gate) checkNode(ctx context.Context, r *http.Request) (nodeID, serial string, err error) {
	state := r.TLS
	if state == nil || len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return "", "", control.ErrNoClientCert
	}
	leaf := state.VerifiedChains[0][0]
	serial = certs.SerialHex(leaf)
	nodeID, err = certs.NodeIDFromCert(g.cfg.TrustDomain, leaf)
	if err != nil {
		return "", serial, fmt.Errorf("%w: %v", control.ErrUnknownNode, err)
	}
	if now := g.clock.Now(); now.After(leaf.NotAfter) {
		return nodeID, serial, fmt.Errorf("node %s: %w at %s", nodeID, control.ErrCertExpired, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	node, err := g.cfg.Nodes.GetNode(ctx, nodeID)
	switch {
	case errors.Is(err, control.ErrNotFound):
		return nodeID, serial, fmt.Errorf("node %s: %w", nodeID, control.ErrUnknownNode)
	case err != nil:
		return nodeID, serial, fmt.Errorf("authorize node %s: %w", nodeID, err)
	case node.Status == control.StatusRemoved:
		return nodeID, serial, fmt.Errorf("node %s: %w", nodeID, control.ErrNodeRemoved)
	case serial == node.CertSerial:
		return nodeID, serial, nil
	case serial != node.NextCertSerial:
		return nodeID, serial, fmt.Errorf("node %s: certificate %s has been superseded by a renewal: %w", nodeID, serial, control.ErrNotCurrentCert)
	}
	if _, err := g.cfg.Nodes.PromoteSerial(ctx, nodeID, serial); err != nil {
		return nodeID, serial, fmt.Errorf("node %s: promote certificate %s: %w", nodeID, serial, err)
	}
	g.log.InfoContext(ctx, "renewed certificate in use", "node_id", nodeID, "serial", serial)
	return nodeID, serial, nil
}
