package api

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/authz"
	"github.com/llorch/llorch/control/connecterr"
	"github.com/llorch/llorch/control/enroll"
	"github.com/llorch/llorch/control/metrics"
	"github.com/llorch/llorch/control/ratelimit"
	"github.com/llorch/llorch/control/registry"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
)

// Config wires the handlers.
type Config struct {
	Enroll      *enroll.Service
	Store       Store
	Registry    *registry.Registry
	Metrics     *metrics.Metrics // nil: none
	Roots       []*x509.Certificate
	TrustDomain string
	Fingerprint string
	// ControlURL is returned to enrolling edges; empty: they keep the URL they used.
	ControlURL string
	Version    string
	// RegisterTimeout is how long a new session may take to send Register; 0: 30s.
	RegisterTimeout time.Duration
	// EnrollPerAddr limits enrollment attempts per source address; Failures
	// counts refused join tokens per source address (the gate counts
	// refused API tokens in the same buckets) and refuses an address that
	// is over it; NodeSessions and NodeRenewals limit each node's session
	// opens and renewals. nil: no limit.
	EnrollPerAddr, Failures, NodeSessions, NodeRenewals *ratelimit.Keyed
	// Refusals logs refused join tokens; nil: discard.
	Refusals *ratelimit.Log
	Clock    clock.Clock  // nil: the wall clock
	Logger   *slog.Logger // nil: discard
}

// Server implements every llorch.v1 service.
type Server struct {
	cfg Config
	log *slog.Logger
	clk clock.Clock
}

// New returns the handlers.
func New(cfg Config) *Server {
	s := &Server{cfg: cfg, log: cfg.Logger, clk: cfg.Clock}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.clk == nil {
		s.clk = clock.Real{}
	}
	if s.cfg.RegisterTimeout == 0 {
		s.cfg.RegisterTimeout = DefaultRegisterTimeout
	}
	if s.cfg.Refusals == nil {
		s.cfg.Refusals = ratelimit.NewLog(nil, ratelimit.Limit{}, s.clk)
	}
	return s
}

// fail returns err to the caller with its wire code.
func (s *Server) fail(ctx context.Context, err error) error { return connecterr.Error(ctx, s.log, err) }

// GetInfo is public.
func (s *Server) GetInfo(context.Context, *connect.Request[llorchv1.GetInfoRequest]) (*connect.Response[llorchv1.GetInfoResponse], error) {
	return connect.NewResponse(&llorchv1.GetInfoResponse{
		Version:       s.cfg.Version,
		TrustDomain:   s.cfg.TrustDomain,
		CaFingerprint: s.cfg.Fingerprint,
	}), nil
}

// Enroll is public: the join token is the credential. Attempts are limited
// per source address, and an address whose join tokens were refused too
// often is refused before its token is looked at.
func (s *Server) Enroll(ctx context.Context, req *connect.Request[llorchv1.EnrollRequest]) (*connect.Response[llorchv1.EnrollResponse], error) {
	c, _ := authz.CallerFrom(ctx)
	if blocked, wait := s.cfg.Failures.Blocked(c.Addr); blocked {
		s.cfg.Metrics.Limited("credentials")
		return nil, s.fail(ctx, &control.RetryLater{Err: fmt.Errorf("%w: too many refused credentials from %s", control.ErrRateLimited, c.Addr), After: wait})
	}
	if ok, wait := s.cfg.EnrollPerAddr.Allow(c.Addr); !ok {
		s.cfg.Metrics.Limited("enroll")
		return nil, s.fail(ctx, &control.RetryLater{Err: fmt.Errorf("%w: too many enrollments from %s", control.ErrRateLimited, c.Addr), After: wait})
	}
	e, err := s.cfg.Enroll.Enroll(ctx, req.Msg.GetToken(), req.Msg.GetCsr(), req.Msg.GetHostname())
	s.cfg.Metrics.Enrollment(err == nil)
	if err != nil {
		if guess, refused := tokenRefused(err); refused {
			if guess {
				s.cfg.Failures.Charge(c.Addr)
			}
			s.cfg.Refusals.Refused(ctx, "join token refused", "remote", c.Addr, "token_id", tokenID(req.Msg.GetToken()), "reason", err)
		}
		return nil, s.fail(ctx, err)
	}
	s.cfg.Registry.Enrolled(e.Node)
	return connect.NewResponse(&llorchv1.EnrollResponse{
		NodeId:           e.Node.ID,
		NodeName:         e.Node.Name,
		SpiffeId:         certs.NodeSPIFFEID(s.cfg.TrustDomain, e.Node.ID),
		CertificateChain: certs.DER(e.Chain),
		CaCertificates:   rootsDER(s.cfg.Roots),
		ControlUrl:       s.cfg.ControlURL,
		Labels:           e.Node.Labels,
	}), nil
}

// tokenRefused says whether an enrollment failed on its join token, and
// whether the token was a guess (malformed, another CA's, unknown or with
// the wrong secret), which counts against the caller's address; a used,
// expired or revoked token was a real one, and racing for one is normal.
func tokenRefused(err error) (guess, refused bool) {
	for _, e := range []error{certs.ErrMalformedToken, control.ErrWrongCA, control.ErrTokenUnknown} {
		if errors.Is(err, e) {
			return true, true
		}
	}
	for _, e := range []error{control.ErrTokenUsed, control.ErrTokenExpired, control.ErrTokenRevoked} {
		if errors.Is(err, e) {
			return false, true
		}
	}
	return false, false
}

// tokenID names a join token in logs: its ID, never its secret.
func tokenID(token string) string {
	t, err := certs.ParseJoinToken(token)
	if err != nil {
		return "(malformed)"
	}
	return t.ID
}

func (s *Server) nodeCaller(ctx context.Context) (authz.Caller, error) {
	c, ok := authz.CallerFrom(ctx)
	if !ok || c.Policy != authz.Node || c.NodeID == "" {
		return authz.Caller{}, s.fail(ctx, control.ErrNoClientCert)
	}
	return c, nil
}

// WhoAmI tells a node who it is; it acts only on the calling node.
func (s *Server) WhoAmI(ctx context.Context, _ *connect.Request[llorchv1.WhoAmIRequest]) (*connect.Response[llorchv1.WhoAmIResponse], error) {
	c, err := s.nodeCaller(ctx)
	if err != nil {
		return nil, err
	}
	n, err := s.node(ctx, c.NodeID)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	return connect.NewResponse(&llorchv1.WhoAmIResponse{
		Node:       n,
		ServerTime: timestamppb.New(s.clk.Now()),
	}), nil
}

// RenewCertificate signs a fresh key for the calling node.
func (s *Server) RenewCertificate(ctx context.Context, req *connect.Request[llorchv1.RenewCertificateRequest]) (*connect.Response[llorchv1.RenewCertificateResponse], error) {
	c, err := s.nodeCaller(ctx)
	if err != nil {
		return nil, err
	}
	if ok, wait := s.cfg.NodeRenewals.Allow(c.NodeID); !ok {
		s.cfg.Metrics.Limited("node_renewals")
		return nil, s.fail(ctx, &control.RetryLater{Err: fmt.Errorf("%w: node %s renews too often", control.ErrRateLimited, c.NodeID), After: wait})
	}
	chain, err := s.cfg.Enroll.Renew(ctx, c.NodeID, c.CertSerial, req.Msg.GetCsr())
	s.cfg.Metrics.Renewal(err == nil)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	return connect.NewResponse(&llorchv1.RenewCertificateResponse{
		CertificateChain: certs.DER(chain),
		CaCertificates:   rootsDER(s.cfg.Roots),
	}), nil
}

// CreateJoinToken makes a join token.
func (s *Server) CreateJoinToken(ctx context.Context, req *connect.Request[llorchv1.CreateJoinTokenRequest]) (*connect.Response[llorchv1.CreateJoinTokenResponse], error) {
	t, token, err := s.cfg.Enroll.CreateToken(ctx, enroll.TokenOptions{
		Name:    req.Msg.GetName(),
		TTL:     duration(req.Msg.GetTtl()),
		Labels:  req.Msg.GetLabels(),
		MaxUses: int(req.Msg.GetMaxUses()),
	})
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	return connect.NewResponse(&llorchv1.CreateJoinTokenResponse{JoinToken: tokenToProto(t), Token: token}), nil
}

// ListJoinTokens lists tokens, never their secrets.
func (s *Server) ListJoinTokens(ctx context.Context, _ *connect.Request[llorchv1.ListJoinTokensRequest]) (*connect.Response[llorchv1.ListJoinTokensResponse], error) {
	ts, err := s.cfg.Store.ListTokens(ctx)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	out := &llorchv1.ListJoinTokensResponse{}
	for _, t := range ts {
		out.JoinTokens = append(out.JoinTokens, tokenToProto(t))
	}
	return connect.NewResponse(out), nil
}

// RevokeJoinToken revokes a token.
func (s *Server) RevokeJoinToken(ctx context.Context, req *connect.Request[llorchv1.RevokeJoinTokenRequest]) (*connect.Response[llorchv1.RevokeJoinTokenResponse], error) {
	if !certs.ValidTokenID(req.Msg.GetId()) {
		return nil, s.fail(ctx, errInvalid("token ID %q is malformed (12 characters a-z2-7, as `control token list` shows)", req.Msg.GetId()))
	}
	if err := s.cfg.Store.RevokeToken(ctx, req.Msg.GetId(), s.clk.Now()); err != nil {
		return nil, s.fail(ctx, err)
	}
	s.log.InfoContext(ctx, "join token revoked", "token_id", req.Msg.GetId())
	return connect.NewResponse(&llorchv1.RevokeJoinTokenResponse{}), nil
}

// ListNodes lists every node, removed ones included.
func (s *Server) ListNodes(ctx context.Context, _ *connect.Request[llorchv1.ListNodesRequest]) (*connect.Response[llorchv1.ListNodesResponse], error) {
	ns, err := s.cfg.Store.ListNodes(ctx)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	out := &llorchv1.ListNodesResponse{}
	for _, n := range ns {
		out.Nodes = append(out.Nodes, s.live(n))
	}
	return connect.NewResponse(out), nil
}

// GetNode returns one node.
func (s *Server) GetNode(ctx context.Context, req *connect.Request[llorchv1.GetNodeRequest]) (*connect.Response[llorchv1.GetNodeResponse], error) {
	n, err := s.node(ctx, req.Msg.GetId())
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	return connect.NewResponse(&llorchv1.GetNodeResponse{Node: n}), nil
}

// RemoveNode revokes a node.
func (s *Server) RemoveNode(ctx context.Context, req *connect.Request[llorchv1.RemoveNodeRequest]) (*connect.Response[llorchv1.RemoveNodeResponse], error) {
	reason := req.Msg.GetReason()
	if reason == "" {
		reason = "removed by operator"
	}
	n, err := s.cfg.Registry.Remove(ctx, req.Msg.GetId(), reason)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	s.log.InfoContext(ctx, "node removed", "node_id", n.ID, "serial", n.CertSerial, "reason", reason)
	return connect.NewResponse(&llorchv1.RemoveNodeResponse{Node: nodeToProto(n, s.cfg.TrustDomain)}), nil
}

// ListEvents lists recorded events, newest first.
func (s *Server) ListEvents(ctx context.Context, req *connect.Request[llorchv1.ListEventsRequest]) (*connect.Response[llorchv1.ListEventsResponse], error) {
	limit := int(req.Msg.GetLimit())
	if limit < 0 || limit > 10000 {
		return nil, s.fail(ctx, errInvalid("limit %d: must be between 0 and 10000", limit))
	}
	es, err := s.cfg.Store.ListEvents(ctx, req.Msg.GetNodeId(), limit)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	out := &llorchv1.ListEventsResponse{}
	for _, e := range es {
		out.Events = append(out.Events, eventToProto(e))
	}
	return connect.NewResponse(out), nil
}

// node is one node: the stored record with the registry's live view over it.
func (s *Server) node(ctx context.Context, id string) (*llorchv1.Node, error) {
	n, err := s.cfg.Store.GetNode(ctx, id)
	if err != nil {
		return nil, err
	}
	return s.live(n), nil
}

// live is a stored node with the registry's liveness over it: status, reason
// and last seen from memory, and what the edge reported; everything else
// (certificates, draining, labels) from the store.
func (s *Server) live(n control.Node) *llorchv1.Node {
	v, ok := s.cfg.Registry.Node(n.ID)
	if !ok || n.Status == control.StatusRemoved {
		return nodeToProto(n, s.cfg.TrustDomain)
	}
	n.Status, n.StatusReason, n.LastSeen = v.Status, v.StatusReason, v.LastSeen
	out := nodeToProto(n, s.cfg.TrustDomain)
	out.System = v.System
	if r := v.Report; r != nil {
		out.GpuInventory, out.Pools, out.HandoffErrors = r.GetGpuInventory(), r.GetPools(), r.GetHandoffErrors()
		out.DroppedReplicas, out.DroppedHandoffErrors = r.GetDroppedReplicas(), r.GetDroppedHandoffErrors()
	}
	return out
}

// DrainNode marks a node draining.
func (s *Server) DrainNode(ctx context.Context, req *connect.Request[llorchv1.DrainNodeRequest]) (*connect.Response[llorchv1.DrainNodeResponse], error) {
	reason := req.Msg.GetReason()
	if reason == "" {
		reason = "drained by operator"
	}
	if _, err := s.cfg.Registry.Drain(ctx, req.Msg.GetId(), true, reason); err != nil {
		return nil, s.fail(ctx, err)
	}
	n, err := s.node(ctx, req.Msg.GetId())
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	return connect.NewResponse(&llorchv1.DrainNodeResponse{Node: n}), nil
}

// UndrainNode clears a node's draining mark.
func (s *Server) UndrainNode(ctx context.Context, req *connect.Request[llorchv1.UndrainNodeRequest]) (*connect.Response[llorchv1.UndrainNodeResponse], error) {
	if _, err := s.cfg.Registry.Drain(ctx, req.Msg.GetId(), false, "undrained by operator"); err != nil {
		return nil, s.fail(ctx, err)
	}
	n, err := s.node(ctx, req.Msg.GetId())
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	return connect.NewResponse(&llorchv1.UndrainNodeResponse{Node: n}), nil
}

// WatchPollInterval is how often WatchEvents looks for new events.
const WatchPollInterval = 250 * time.Millisecond

// WatchEvents streams events: first up to backlog recorded ones, then new
// ones as they are recorded, until the caller goes away.
func (s *Server) WatchEvents(ctx context.Context, req *connect.Request[llorchv1.WatchEventsRequest], stream *connect.ServerStream[llorchv1.WatchEventsResponse]) error {
	backlog := int(req.Msg.GetBacklog())
	if backlog < 0 || backlog > 10000 {
		return s.fail(ctx, errInvalid("backlog %d: must be between 0 and 10000", backlog))
	}
	nodeID := req.Msg.GetNodeId()
	var after int64
	recent, err := s.cfg.Store.ListEvents(ctx, nodeID, max(backlog, 1))
	if err != nil {
		return s.fail(ctx, err)
	}
	if len(recent) > 0 {
		after = recent[0].ID
	}
	// Send the headers now: a client (a browser over HTTP/1.1 especially)
	// waits for them before it reads any event.
	if err := stream.Send(nil); err != nil {
		return nil
	}
	if backlog > 0 {
		for i := len(recent) - 1; i >= 0; i-- {
			if err := stream.Send(&llorchv1.WatchEventsResponse{Event: eventToProto(recent[i])}); err != nil {
				return nil
			}
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(WatchPollInterval):
		}
		es, err := s.cfg.Store.ListEventsAfter(ctx, nodeID, after, 1000)
		if err != nil {
			return s.fail(ctx, err)
		}
		for _, e := range es {
			if err := stream.Send(&llorchv1.WatchEventsResponse{Event: eventToProto(e)}); err != nil {
				return nil
			}
			after = e.ID
		}
	}
}

func eventToProto(e control.Event) *llorchv1.Event {
	return &llorchv1.Event{
		Id: e.ID, Time: timestamp(e.Time), NodeId: e.NodeID, Kind: string(e.Kind), Reason: e.Reason,
		From: statusToProto(e.From), To: statusToProto(e.To), Coalesced: int32(e.Coalesced),
	}
}

// RenewNodeCertificate asks a connected node to renew now.
func (s *Server) RenewNodeCertificate(ctx context.Context, req *connect.Request[llorchv1.RenewNodeCertificateRequest]) (*connect.Response[llorchv1.RenewNodeCertificateResponse], error) {
	if err := s.cfg.Registry.RenewNow(req.Msg.GetId()); err != nil {
		return nil, s.fail(ctx, err)
	}
	return connect.NewResponse(&llorchv1.RenewNodeCertificateResponse{}), nil
}
