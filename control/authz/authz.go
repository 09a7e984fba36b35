// Package authz decides, per procedure, who may call what on the control
// plane's one port, and puts the caller's identity in the context. It is the
// only code that reads a connection's TLS state or an API token.
//
// Three kinds of procedure:
//   - public: enrollment (the join token in the request is the credential),
//     server info, health and reflection;
//   - node: a verified client certificate whose SPIFFE ID names a node that
//     is not removed and whose serial is the node's current (or next) one;
//   - admin: the local Unix socket, or an API token as a bearer token.
//
// A procedure that is not listed is refused.
package authz

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/internal/clock"
	"github.com/llorch/llorch/internal/refusal"
)

// Policy says who may call a procedure.
type Policy int

// The policies.
const (
	Deny Policy = iota
	Public
	Node
	Admin
)

// Nodes is what authorization needs to know about nodes.
type Nodes interface {
	GetNode(ctx context.Context, id string) (control.Node, error)
	// PromoteSerial makes serial the node's current certificate if it is its
	// next one; ErrNotCurrentCert otherwise, ErrNodeRemoved if removed.
	PromoteSerial(ctx context.Context, nodeID, serial string) (control.Node, error)
}

// Config configures the interceptor.
type Config struct {
	Policies    map[string]Policy // by procedure, e.g. "/llorch.v1.NodeService/WhoAmI"
	TrustDomain string
	Nodes       Nodes
	// APIToken is the admin bearer token; empty: admin calls only over the
	// local socket.
	APIToken string
	Clock    clock.Clock  // nil: the wall clock
	Logger   *slog.Logger // nil: discard
}

// Caller is who is calling, as established by the interceptor.
type Caller struct {
	Policy Policy
	// NodeID and CertSerial are set for node procedures.
	NodeID     string
	CertSerial string
	// Local is true for calls over the local Unix socket.
	Local bool
}

type callerKey struct{}

// WithCaller returns ctx carrying c. Only this package and tests call it.
func WithCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// CallerFrom returns the caller the interceptor established.
func CallerFrom(ctx context.Context) (Caller, bool) {
	c, ok := ctx.Value(callerKey{}).(Caller)
	return c, ok
}

type connKey struct{}

type connInfo struct {
	tls   *tls.ConnectionState
	local bool
}

// Middleware records how the request arrived (its TLS state, or the local
// socket) for the interceptor. Every listener's handler goes through it.
func Middleware(next http.Handler, local bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := context.WithValue(r.Context(), connKey{}, connInfo{tls: r.TLS, local: local})
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

type interceptor struct {
	cfg   Config
	token apiToken
	clock clock.Clock
	log   *slog.Logger
}

// NewInterceptor returns the authorization interceptor.
func NewInterceptor(cfg Config) connect.Interceptor {
	i := &interceptor{cfg: cfg, token: newAPIToken(cfg.APIToken), clock: cfg.Clock, log: cfg.Logger}
	if i.clock == nil {
		i.clock = clock.Real{}
	}
	if i.log == nil {
		i.log = slog.New(slog.DiscardHandler)
	}
	return i
}

func (i *interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		ctx, err := i.authorize(ctx, req.Spec().Procedure, req.Header())
		if err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (i *interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i *interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		ctx, err := i.authorize(ctx, conn.Spec().Procedure, conn.RequestHeader())
		if err != nil {
			return err
		}
		return next(ctx, conn)
	}
}

func (i *interceptor) authorize(ctx context.Context, procedure string, header http.Header) (context.Context, error) {
	info, _ := ctx.Value(connKey{}).(connInfo)
	policy := i.cfg.Policies[procedure]
	switch policy {
	case Public:
		return WithCaller(ctx, Caller{Policy: Public, Local: info.local}), nil
	case Admin:
		if info.local {
			return WithCaller(ctx, Caller{Policy: Admin, Local: true}), nil
		}
		if err := i.token.check(header); err != nil {
			return nil, err
		}
		return WithCaller(ctx, Caller{Policy: Admin}), nil
	case Node:
		c, err := i.checkNode(ctx, info.tls)
		if err != nil {
			return nil, err
		}
		return WithCaller(ctx, c), nil
	default:
		return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("procedure %s is not allowed", procedure))
	}
}

// apiToken checks bearer tokens against the admin token; it keeps only its hash.
type apiToken struct {
	set  bool
	hash [32]byte
}

func newAPIToken(token string) apiToken {
	return apiToken{set: token != "", hash: sha256.Sum256([]byte(token))}
}

func (t apiToken) check(header http.Header) error {
	if !t.set {
		return connect.NewError(connect.CodeUnauthenticated, errors.New("admin procedures need the local socket (--data DIR): this server has no API token configured (LLORCH_API_TOKEN)"))
	}
	token, ok := strings.CutPrefix(header.Get("Authorization"), "Bearer ")
	if !ok || token == "" {
		return connect.NewError(connect.CodeUnauthenticated, errors.New("missing API token: send Authorization: Bearer <token> (LLORCH_API_TOKEN)"))
	}
	got := sha256.Sum256([]byte(token))
	if subtle.ConstantTimeCompare(got[:], t.hash[:]) != 1 {
		return connect.NewError(connect.CodeUnauthenticated, errors.New("invalid API token"))
	}
	return nil
}

func (i *interceptor) checkNode(ctx context.Context, state *tls.ConnectionState) (Caller, error) {
	if state == nil || len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return Caller{}, refuse(connect.CodeUnauthenticated, refusal.NoCert, errors.New("node procedures need the node's client certificate (mutual TLS)"))
	}
	leaf := state.VerifiedChains[0][0]
	nodeID, err := certs.NodeIDFromCert(i.cfg.TrustDomain, leaf)
	if err != nil {
		return Caller{}, refuse(connect.CodePermissionDenied, refusal.Unknown, err)
	}
	if now := i.clock.Now(); now.After(leaf.NotAfter) {
		return Caller{}, refuse(connect.CodeUnauthenticated, refusal.Expired, fmt.Errorf("node %s: certificate expired at %s", nodeID, leaf.NotAfter.UTC().Format(time.RFC3339)))
	}
	serial := certs.SerialHex(leaf)
	node, err := i.cfg.Nodes.GetNode(ctx, nodeID)
	switch {
	case errors.Is(err, control.ErrNotFound):
		return Caller{}, refuse(connect.CodePermissionDenied, refusal.Unknown, fmt.Errorf("node %s is not known to this control plane", nodeID))
	case err != nil:
		i.log.ErrorContext(ctx, "authorize node", "node_id", nodeID, "err", err)
		return Caller{}, connect.NewError(connect.CodeInternal, errors.New("internal error"))
	}
	if node.Status == control.StatusRemoved {
		return Caller{}, revoked(nodeID)
	}
	if serial != node.CertSerial {
		if serial != node.NextCertSerial {
			return Caller{}, refuse(connect.CodePermissionDenied, refusal.Superseded, fmt.Errorf("node %s: certificate %s has been superseded by a renewal", nodeID, serial))
		}
		if _, err := i.cfg.Nodes.PromoteSerial(ctx, nodeID, serial); err != nil {
			switch {
			case errors.Is(err, control.ErrNodeRemoved):
				return Caller{}, revoked(nodeID)
			case errors.Is(err, control.ErrNotCurrentCert):
				return Caller{}, refuse(connect.CodePermissionDenied, refusal.Superseded, fmt.Errorf("node %s: certificate %s has been superseded", nodeID, serial))
			}
			i.log.ErrorContext(ctx, "promote certificate", "node_id", nodeID, "serial", serial, "err", err)
			return Caller{}, connect.NewError(connect.CodeInternal, errors.New("internal error"))
		}
		i.log.InfoContext(ctx, "renewed certificate in use", "node_id", nodeID, "serial", serial)
	}
	return Caller{Policy: Node, NodeID: nodeID, CertSerial: serial}, nil
}

func revoked(nodeID string) error {
	return refuse(connect.CodePermissionDenied, refusal.Revoked, fmt.Errorf("node %s has been removed and its certificate revoked", nodeID))
}

func refuse(code connect.Code, reason string, err error) error {
	cerr := connect.NewError(code, err)
	cerr.Meta().Set(refusal.ReasonHeader, reason)
	return cerr
}

// AdminHTTP guards a plain HTTP handler (such as /metrics) with the admin
// policy: the local socket, or the API token as a bearer token.
func AdminHTTP(next http.Handler, apiToken string) http.Handler {
	token := newAPIToken(apiToken)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		info, _ := r.Context().Value(connKey{}).(connInfo)
		if !info.local {
			if err := token.check(r.Header); err != nil {
				http.Error(w, err.Error(), http.StatusUnauthorized)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}
