// Package server wires the control plane together: the store, the CA, the
// enrollment service, authorization and the API handlers, on one TLS port and
// the local admin socket. It is the only package that imports all of them.
package server

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	connectcors "connectrpc.com/cors"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/cors"
	"golang.org/x/net/http2"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/api"
	"github.com/llorch/llorch/control/authz"
	"github.com/llorch/llorch/control/enroll"
	"github.com/llorch/llorch/control/metrics"
	"github.com/llorch/llorch/control/pki"
	"github.com/llorch/llorch/control/ratelimit"
	"github.com/llorch/llorch/control/registry"
	"github.com/llorch/llorch/control/store"
	"github.com/llorch/llorch/internal/clock"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/private"
	"github.com/llorch/llorch/internal/refusal"
)

// MaxMessageBytes bounds every request message, decompressed; for the
// public services (enrollment, info, health, reflection), which anyone may
// call, PublicMaxMessageBytes does (an enrollment is under 2 KiB).
const (
	MaxMessageBytes       = 1 << 20
	PublicMaxMessageBytes = 16 << 10
)

// MaxHeaderBytes bounds a request's headers.
const MaxHeaderBytes = 64 << 10

// CompressMinBytes is the smallest response message worth compressing when
// the client accepts gzip. Heartbeat acks and commands are a few dozen bytes:
// gzipping them made them larger and cost more CPU than the rest of the
// heartbeat together (a flate writer's reset clears its hash tables).
const CompressMinBytes = 1 << 10

// Server is a running control plane.
type Server struct {
	cfg      Config
	log      *slog.Logger
	lock     *os.File
	store    *store.Store
	ca       *pki.Authority
	registry *registry.Registry
	metrics  *metrics.Metrics
	public   net.Listener
	local    net.Listener
	port     *publicPort
	localSrv *http.Server
	limits   Limits // the configured limits with their defaults filled in
	// limitsNote says why the limits differ from those configured (the file
	// limit), for the start's log.
	limitsNote string
	failures   *ratelimit.Keyed   // refused credentials per source address
	limiters   []*ratelimit.Keyed // every rate limit's buckets, pruned every minute
	refusals   *ratelimit.Log     // refused credentials and connections, logged without flooding
}

// New opens the data directory (creating the store and the CA on first
// start) and binds the public port and the admin socket. Run serves them.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.NodeCertLifetime == 0 {
		cfg.NodeCertLifetime = DefaultNodeCertLifetime
	}
	s := &Server{cfg: cfg, log: cfg.Logger}
	heartbeat := cfg.HeartbeatInterval
	if heartbeat == 0 {
		heartbeat = registry.DefaultHeartbeatInterval
	}
	s.limits, s.limitsNote = cfg.Limits.withDefaults(heartbeat)
	s.failures = s.limiter(s.limits.AuthFailures)
	s.refusals = ratelimit.NewLog(cfg.Logger.With("component", "security"), ratelimit.Limit{}, cfg.Clock)
	if err := s.open(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Server) open(ctx context.Context) (err error) {
	cfg := s.cfg
	was, err := private.Dir(cfg.DataDir, true)
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	if was != 0 {
		s.log.Warn("made the data directory private", "dir", cfg.DataDir, "mode_was", fmt.Sprintf("%04o", was))
	}
	if s.lock, err = lockDataDir(cfg.DataDir); err != nil {
		return err
	}
	// Listen before the slow part of the start (the store, the CA, loading
	// and marking every node unknown: seconds for a large fleet). Edges that
	// come back meanwhile wait in the kernel's accept queue for their
	// handshake instead of being refused and backing off.
	if s.public, err = net.Listen("tcp", cfg.Listen); err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	if s.store, err = store.Open(ctx, filepath.Join(cfg.DataDir, "llorch.db")); err != nil {
		return err
	}
	if err := s.openCA(ctx); err != nil {
		return err
	}
	if err := s.openRegistry(ctx); err != nil {
		return err
	}
	if s.local, err = listenSocket(SocketPath(cfg.DataDir)); err != nil {
		return err
	}
	return s.openPorts(ctx)
}

func (s *Server) openCA(ctx context.Context) (err error) {
	cfg := s.cfg
	s.ca, err = pki.Open(ctx, pki.Config{
		Dir:              filepath.Join(cfg.DataDir, "ca"),
		TrustDomain:      cfg.TrustDomain,
		SANs:             cfg.SANs,
		NodeCertLifetime: cfg.NodeCertLifetime,
		Clock:            cfg.Clock,
		Logger:           cfg.Logger.With("component", "pki"),
	})
	return err
}

// openRegistry loads the fleet, marking the nodes that were connected
// unknown.
func (s *Server) openRegistry(ctx context.Context) error {
	cfg := s.cfg
	s.metrics = metrics.New()
	s.registry = registry.New(registry.Config{
		Store:             s.store,
		HeartbeatInterval: cfg.HeartbeatInterval,
		OfflineAfter:      cfg.OfflineAfter,
		Admission:         registry.Admission{Rate: cfg.RegistrationRate, Burst: cfg.RegistrationBurst},
		Clock:             cfg.Clock,
		Logger:            cfg.Logger.With("component", "registry"),
		Metrics:           s.metrics,
	})
	return s.registry.Load(ctx)
}

// openPorts builds what the public port and the admin socket serve: the
// handlers, each behind its gate, and the port's HTTP/2 settings for edges
// and for everyone else.
func (s *Server) openPorts(ctx context.Context) (err error) {
	cfg := s.cfg
	handler := s.handler()
	gate := func(local bool, routes authz.Routes) *authz.Gate {
		return authz.New(authz.Config{
			Routes:      routes,
			TrustDomain: s.ca.TrustDomain(),
			Nodes:       s.store,
			APIToken:    cfg.APIToken,
			Local:       local,
			Failures:    s.failures,
			Refusals:    s.refusals,
			Metrics:     s.metrics,
			Clock:       cfg.Clock,
			Logger:      cfg.Logger.With("component", "authz"),
		})
	}
	publicSrv := &http.Server{
		Handler:   gate(false, Routes()).Handler(boundRequests(handler, s.limits.BodyTimeout)),
		TLSConfig: certs.ServerTLSConfig(s.ca.GetCertificate, s.ca.ClientCAs()),
		// HTTP/1.1 connections (browsers, curl; never edges): the first
		// request's headers are held to the handshake's bound.
		ReadHeaderTimeout: s.limits.HandshakeTimeout,
		IdleTimeout:       s.limits.IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
	}
	edges := &http2.Server{
		MaxConcurrentStreams: 250,
		IdleTimeout:          5 * time.Minute,
		// Pings find a dead path to an edge well before the offline threshold.
		ReadIdleTimeout: cfg.HeartbeatInterval + 5*time.Second,
		PingTimeout:     5 * time.Second,
	}
	anonymous := &http2.Server{
		MaxConcurrentStreams:         UnauthenticatedMaxStreams,
		IdleTimeout:                  s.limits.IdleTimeout,
		MaxReadFrameSize:             unauthenticatedFrameSize,
		MaxUploadBufferPerConnection: unauthenticatedWindow,
		MaxUploadBufferPerStream:     unauthenticatedWindow,
		ReadIdleTimeout:              s.limits.IdleTimeout,
		PingTimeout:                  5 * time.Second,
		WriteByteTimeout:             s.limits.BodyTimeout,
	}
	s.port, err = newPublicPort(s.public, publicSrv, edges, anonymous, s.limits, cfg.Logger.With("component", "server"), s.refusals, s.metrics)
	if err != nil {
		return fmt.Errorf("configure HTTP/2: %w", err)
	}
	s.metrics.CountConns(s.port.connCounts)
	s.port.tls.SetSessionTicketKeys(s.ca.TicketKeys(ctx))
	s.localSrv = &http.Server{
		Handler:           gate(true, socketRoutes()).Handler(localHandler(handler)),
		ReadHeaderTimeout: 10 * time.Second,
		Protocols:         unencryptedProtocols(),
	}
	return nil
}

// localHandler adds Go's profiler under /debug/pprof/ to what the admin
// socket serves. Only the socket has it (socketRoutes): its file mode is the
// credential, and profiles are for whoever operates the process (memory per
// session is measured this way, see docs/BENCHMARKS.md).
func localHandler(api http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/", api)
	return mux
}

func unencryptedProtocols() *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &p
}

// handler returns the mux of everything the control plane serves (the
// socket adds the profiler to it), and the gate's table of routes, built
// side by side.
func (s *Server) handler() http.Handler {
	cfg := s.cfg
	enrollSvc := enroll.New(enroll.Config{Store: s.store, Signer: s.ca, Clock: cfg.Clock, Logger: cfg.Logger.With("component", "enroll")})
	handlers := api.New(api.Config{
		Enroll:          enrollSvc,
		Store:           s.store,
		Registry:        s.registry,
		Metrics:         s.metrics,
		Roots:           []*x509.Certificate{s.ca.Root()},
		TrustDomain:     s.ca.TrustDomain(),
		Fingerprint:     s.ca.Fingerprint(),
		ControlURL:      cfg.advertiseURL(s.public.Addr()),
		Version:         cfg.Version,
		RegisterTimeout: cfg.RegisterTimeout,
		EnrollPerAddr:   s.limiter(s.limits.Enroll),
		Failures:        s.failures,
		NodeSessions:    s.limiter(s.limits.NodeSessions),
		NodeRenewals:    s.limiter(s.limits.NodeRenewals),
		Refusals:        s.refusals,
		Clock:           cfg.Clock,
		Logger:          cfg.Logger.With("component", "api"),
	})
	// Callers with a credential (nodes, admins) may send messages of up to
	// MaxMessageBytes, compressed or not.
	opts := []connect.HandlerOption{
		connect.WithReadMaxBytes(MaxMessageBytes),
		cappedGzip(),
		connect.WithSendMaxBytes(4 * MaxMessageBytes),
		connect.WithCompressMinBytes(CompressMinBytes),
	}
	// Anyone may call the public services, so what one request can make
	// the control plane hold is small: a message of PublicMaxMessageBytes,
	// uncompressed (no inflater's state, no decompression to do). With 16
	// streams per connection and 64 connections per address, one address
	// can make the control plane hold a few megabytes this way.
	public := []connect.HandlerOption{
		connect.WithReadMaxBytes(PublicMaxMessageBytes),
		connect.WithCompression("gzip", nil, nil),
		connect.WithSendMaxBytes(4 * MaxMessageBytes),
	}
	mux := http.NewServeMux()
	mux.Handle(llorchv1connect.NewEnrollServiceHandler(handlers, public...))
	mux.Handle(llorchv1connect.NewInfoServiceHandler(handlers, public...))
	mux.Handle(grpchealth.NewHandler(grpchealth.NewStaticChecker(llorchServices...), public...))
	reflector := grpcreflect.NewStaticReflector(llorchServices...)
	mux.Handle(grpcreflect.NewHandlerV1(reflector, public...))
	mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector, public...))
	mux.Handle(llorchv1connect.NewNodeServiceHandler(handlers, opts...))
	mux.Handle(llorchv1connect.NewAdminServiceHandler(handlers, opts...))
	sessionPath, sessionHandler := llorchv1connect.NewSessionServiceHandler(handlers, opts...)
	mux.Handle(sessionPath, api.SessionHTTP(sessionHandler))
	mux.Handle(MetricsPath, promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{}))
	if len(cfg.CORSOrigins) == 0 {
		return mux
	}
	return cors.New(cors.Options{
		AllowedOrigins: cfg.CORSOrigins,
		AllowedMethods: connectcors.AllowedMethods(),
		AllowedHeaders: append(connectcors.AllowedHeaders(), "Authorization"),
		ExposedHeaders: append(connectcors.ExposedHeaders(), refusal.ReasonHeader),
		MaxAge:         7200,
	}).Handler(mux)
}

// llorchServices are the services of schema/, as health and reflection name them.
var llorchServices = []string{
	llorchv1connect.SessionServiceName,
	llorchv1connect.EnrollServiceName,
	llorchv1connect.NodeServiceName,
	llorchv1connect.AdminServiceName,
	llorchv1connect.InfoServiceName,
}

// MetricsPath is where Prometheus metrics are served.
const MetricsPath = "/metrics"

// Routes is the gate's table for the public port: every procedure and path
// that is served, with who may call it. A path not listed is refused.
func Routes() authz.Routes {
	rpc := func(p authz.Policy) authz.Route { return authz.Route{Policy: p} }
	return authz.Routes{
		llorchv1connect.EnrollServiceEnrollProcedure:                     rpc(authz.Public),
		llorchv1connect.InfoServiceGetInfoProcedure:                      rpc(authz.Public),
		llorchv1connect.NodeServiceWhoAmIProcedure:                       rpc(authz.Node),
		llorchv1connect.NodeServiceRenewCertificateProcedure:             rpc(authz.Node),
		llorchv1connect.SessionServiceConnectProcedure:                   rpc(authz.Node),
		llorchv1connect.AdminServiceCreateJoinTokenProcedure:             rpc(authz.Admin),
		llorchv1connect.AdminServiceListJoinTokensProcedure:              rpc(authz.Admin),
		llorchv1connect.AdminServiceRevokeJoinTokenProcedure:             rpc(authz.Admin),
		llorchv1connect.AdminServiceListNodesProcedure:                   rpc(authz.Admin),
		llorchv1connect.AdminServiceGetNodeProcedure:                     rpc(authz.Admin),
		llorchv1connect.AdminServiceRemoveNodeProcedure:                  rpc(authz.Admin),
		llorchv1connect.AdminServiceListEventsProcedure:                  rpc(authz.Admin),
		llorchv1connect.AdminServiceDrainNodeProcedure:                   rpc(authz.Admin),
		llorchv1connect.AdminServiceUndrainNodeProcedure:                 rpc(authz.Admin),
		llorchv1connect.AdminServiceRenewNodeCertificateProcedure:        rpc(authz.Admin),
		llorchv1connect.AdminServiceWatchEventsProcedure:                 rpc(authz.Admin),
		"/grpc.health.v1.Health/Check":                                   rpc(authz.Public),
		"/grpc.health.v1.Health/Watch":                                   rpc(authz.Public),
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      rpc(authz.Public),
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": rpc(authz.Public),
		MetricsPath: {Policy: authz.Admin, HTTP: true},
	}
}

// socketRoutes is the admin socket's table: the public port's, and Go's
// profiler (for whoever operates the process; never on the public port).
func socketRoutes() authz.Routes {
	rs := Routes()
	rs["/debug/pprof/"] = authz.Route{Policy: authz.Admin, HTTP: true}
	return rs
}

// Addr is the public port's bound address.
func (s *Server) Addr() net.Addr { return s.public.Addr() }

// URL is https://<bound address>.
func (s *Server) URL() string { return "https://" + s.public.Addr().String() }

// Fingerprint is the CA fingerprint.
func (s *Server) Fingerprint() string { return s.ca.Fingerprint() }

// CACreated reports whether this start created the CA.
func (s *Server) CACreated() bool { return s.ca.Created() }

// Root is the CA's root certificate.
func (s *Server) Root() *x509.Certificate { return s.ca.Root() }

// Store is the server's store, for tests and tools in the same process.
func (s *Server) Store() *store.Store { return s.store }

// Run serves until ctx ends, then shuts down gracefully.
func (s *Server) Run(ctx context.Context) error {
	regCtx, stopRegistry := context.WithCancel(context.Background())
	regDone := make(chan error, 1)
	go func() { regDone <- s.registry.Run(regCtx) }()
	errc := make(chan error, 2)
	go func() { errc <- s.port.serve() }()
	go func() { errc <- s.localSrv.Serve(s.local) }()
	helpersCtx, stopHelpers := context.WithCancel(context.Background())
	var helpers sync.WaitGroup
	defer func() { stopHelpers(); helpers.Wait() }()
	helpers.Go(func() { s.rotateTicketKeys(helpersCtx) })
	helpers.Go(func() { s.pruneEvents(helpersCtx) })
	helpers.Go(func() { s.pruneLimits(helpersCtx) })
	if s.cfg.TuneGC {
		helpers.Go(func() { newGCTuner(s.port.handshakes.Load, s.log).run(helpersCtx) })
	}
	s.log.Info("control plane serving", "listen", s.public.Addr().String(), "socket", SocketPath(s.cfg.DataDir), "ca_fingerprint", s.ca.Fingerprint(), "trust_domain", s.ca.TrustDomain(),
		"max_conns", s.limits.MaxConns, "max_unauthenticated_conns", s.limits.MaxUnauthenticatedConns, "per_addr", s.limits.MaxUnauthenticatedConnsPerAddr)
	if s.limitsNote != "" {
		s.log.Info(s.limitsNote)
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		err = fmt.Errorf("serve: %w", err)
	}
	// Tell every edge to reconnect later, spread out, so the restart is no
	// stampede; then wait for the sessions to end.
	s.registry.DisconnectAll("control plane shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Sessions that ignore their DISCONNECT are cut when the grace ends.
	s.port.shutdown(shutdownCtx)
	if s.localSrv.Shutdown(shutdownCtx) != nil {
		s.localSrv.Close()
	}
	stopRegistry()
	<-regDone
	return err
}

// rotateTicketKeys gives the public port the CA's session ticket keys every
// hour; the CA makes a new one each day (pki.Authority.TicketKeys).
func (s *Server) rotateTicketKeys(ctx context.Context) {
	tick := time.NewTicker(time.Hour)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			s.port.tls.SetSessionTicketKeys(s.ca.TicketKeys(ctx))
		}
	}
}

// limiter makes a rate limit's buckets, pruned with the others.
func (s *Server) limiter(l ratelimit.Limit) *ratelimit.Keyed {
	k := ratelimit.NewKeyed(l, 0, s.cfg.Clock)
	s.limiters = append(s.limiters, k)
	return k
}

// Conns reports the public port's open connections and, of them, those in
// their handshake or without a client certificate.
func (s *Server) Conns() (all, unauthenticated int) { return s.port.connCounts() }

// pruneLimits forgets refilled rate-limit buckets every minute, so that a
// steady fleet holds none (one per node would cost 100 bytes a session).
func (s *Server) pruneLimits(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.cfg.Clock.After(time.Minute):
		}
		for _, k := range s.limiters {
			k.Prune()
		}
	}
}

// PruneInterval is how often the event log is held to its retention.
const PruneInterval = 10 * time.Minute

// pruneEvents holds the event log to its retention (age and count) at the
// start and every PruneInterval.
func (s *Server) pruneEvents(ctx context.Context) {
	retention, keep := s.cfg.EventRetention, s.cfg.MaxEvents
	if retention == 0 {
		retention = DefaultEventRetention
	}
	if keep == 0 {
		keep = DefaultMaxEvents
	}
	for {
		n, err := s.store.PruneEvents(ctx, s.cfg.Clock.Now().Add(-retention), keep)
		switch {
		case err != nil && ctx.Err() == nil:
			s.log.Error("cannot prune the event log; will retry", "err", err)
		case n > 0:
			s.log.Info("pruned the event log", "deleted", n, "retention", retention, "max_events", keep)
		}
		select {
		case <-ctx.Done():
			return
		case <-s.cfg.Clock.After(PruneInterval):
		}
	}
}

// Registry is the live fleet, for tests in the same process.
func (s *Server) Registry() *registry.Registry { return s.registry }

// Close releases everything New opened. Run's shutdown does not close the store; Close does.
func (s *Server) Close() error {
	var errs []error
	if s.public != nil {
		s.public.Close()
	}
	if s.local != nil {
		s.local.Close()
		os.Remove(SocketPath(s.cfg.DataDir))
	}
	if s.ca != nil {
		errs = append(errs, s.ca.Close())
	}
	if s.store != nil {
		errs = append(errs, s.store.Close())
	}
	if s.lock != nil {
		errs = append(errs, s.lock.Close())
	}
	return errors.Join(errs...)
}

// lockDataDir takes an exclusive lock so two control planes never share a
// data directory. The lock dies with the process, kill -9 included.
func lockDataDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "control.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock data directory: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("data directory %s is in use by another control plane", dir)
		}
		return nil, fmt.Errorf("lock data directory: %w", err)
	}
	return f, nil
}

// listenSocket binds the admin socket, mode 0600. A socket file left by a
// crashed process is replaced (the data directory lock is already held).
func listenSocket(path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	return l, nil
}
