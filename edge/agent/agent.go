// Package agent runs an enrolled edge: the session with the control plane
// (registration, heartbeats with GPUs and engine pools, commands), the GPU
// inventory, the engine handoff watcher, and certificate renewal.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/gpu"
	"github.com/llorch/llorch/edge/handoff"
	"github.com/llorch/llorch/edge/renew"
	"github.com/llorch/llorch/edge/session"
	"github.com/llorch/llorch/edge/state"
	"github.com/llorch/llorch/internal/clock"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/version"
)

// Config configures an agent.
type Config struct {
	// StateDir holds the identity; Run holds its lock (state.Lock).
	StateDir   string
	EnginesDir string     // "": handoff.DefaultDir
	GPUs       gpu.Source // nil: NVML
	// BackoffMax bounds the reconnect backoff; 0: 10s.
	BackoffMax time.Duration
	Clock      clock.Clock  // nil: the wall clock
	Logger     *slog.Logger // nil: discard
}

// Agent is an enrolled edge at work.
type Agent struct {
	cfg      Config
	id       *client.Identity
	log      *slog.Logger
	draining atomic.Bool
	renewNow chan struct{}
	renewed  chan struct{}

	mu   sync.Mutex
	http *http.Client // replaced after each renewal, so new connections present the new certificate
}

// New returns an agent acting as id, a loaded and unexpired identity.
func New(cfg Config, id state.Identity) *Agent {
	if cfg.Clock == nil {
		cfg.Clock = clock.Real{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	a := &Agent{cfg: cfg, id: client.NewIdentity(id), log: cfg.Logger.With("node_id", id.NodeID),
		renewNow: make(chan struct{}, 1), renewed: make(chan struct{}, 1)}
	a.http = client.HTTPClient(a.id)
	return a
}

// httpClient is the client for new calls and sessions.
func (a *Agent) httpClient() *http.Client {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.http
}

// useNewCertificate moves new connections to the renewed certificate and
// has the session reconnect over one; the old connections are closed once idle.
func (a *Agent) useNewCertificate() {
	a.replaceClient(client.HTTPClient(a.id))
	select {
	case a.renewed <- struct{}{}:
	default:
	}
}

// freshConnections is called when the session is lost: the connection it
// was on may be dead without TCP knowing (a partition), and reusing it
// would hold the next session until the path heals and TCP gives up,
// seconds later. New calls and sessions get new connections; the TLS
// configuration, and the session tickets it keeps, stay.
func (a *Agent) freshConnections() {
	a.replaceClient(client.Fresh(a.httpClient()))
}

// replaceClient makes c the client for new calls and sessions, and closes
// the old one's connections once they are idle.
func (a *Agent) replaceClient(c *http.Client) {
	a.mu.Lock()
	old := a.http
	a.http = c
	a.mu.Unlock()
	go func() {
		<-a.cfg.Clock.After(5 * time.Second)
		old.CloseIdleConnections()
	}()
}

func (a *Agent) nodeClient() llorchv1connect.NodeServiceClient {
	return llorchv1connect.NewNodeServiceClient(a.httpClient(), a.id.Get().ControlURL)
}

// Identity is the identity in use.
func (a *Agent) Identity() state.Identity { return a.id.Get() }

// Run holds the session, watches GPUs and engines and renews the certificate
// until ctx ends (then it says goodbye) or the node can no longer act
// (revoked, expired, superseded). It holds the state directory's lock
// throughout, so a second agent on the same directory is refused with an
// error wrapping state.ErrLocked.
func (a *Agent) Run(ctx context.Context) error {
	release, err := state.Lock(a.cfg.StateDir)
	if err != nil {
		return err
	}
	defer release()
	gpus := a.cfg.GPUs
	if gpus == nil {
		gpus = gpu.NewNVML(a.log)
	}
	defer gpus.Close()
	if inv := gpus.Inventory(ctx); inv.Unavailable != "" {
		a.log.Warn("no GPUs reported", "reason", inv.Unavailable)
	}
	watcher := handoff.New(handoff.Config{Dir: a.cfg.EnginesDir, Clock: a.cfg.Clock, Logger: a.log.With("component", "handoff")})
	hostname, _ := os.Hostname()
	sessionCfg := session.Config{
		Dial: func() session.Dialer {
			return llorchv1connect.NewSessionServiceClient(a.httpClient(), a.id.Get().ControlURL)
		},
		System: &llorchv1.NodeSystem{Hostname: hostname, Os: runtime.GOOS, Arch: runtime.GOARCH, AgentVersion: version.Version},
		Report: func(ctx context.Context) *llorchv1.NodeStatusReport {
			return statusReport(gpus.Inventory(ctx), watcher.Snapshot(), a.draining.Load())
		},
		Changed:      watcher.Changed(),
		Reconnect:    a.renewed,
		OnRegistered: func(r *llorchv1.Registered) { a.draining.Store(r.GetDraining()) },
		OnCommand:    a.command,
		Lost:         a.freshConnections,
		BackoffMax:   a.cfg.BackoffMax,
		Clock:        a.cfg.Clock,
		Logger:       a.log.With("component", "session"),
	}

	// The first of the three to return ends the others; its error is Run's.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	run := func(f func(context.Context) error) {
		wg.Go(func() {
			err := f(ctx)
			once.Do(func() { first = err })
			cancel()
		})
	}
	run(watcher.Run)
	run(a.renewLoop)
	run(func(ctx context.Context) error { return session.Run(ctx, sessionCfg) })
	wg.Wait()
	if errors.Is(first, context.Canceled) {
		return nil
	}
	return first
}

func (a *Agent) command(c *llorchv1.Command) {
	switch c.GetKind() {
	case llorchv1.CommandKind_COMMAND_KIND_DRAIN:
		a.draining.Store(true)
	case llorchv1.CommandKind_COMMAND_KIND_UNDRAIN:
		a.draining.Store(false)
	case llorchv1.CommandKind_COMMAND_KIND_RENEW_NOW:
		select {
		case a.renewNow <- struct{}{}:
		default:
		}
	}
}

// renewLoop renews when due, or at once when the control plane asks.
func (a *Agent) renewLoop(ctx context.Context) error {
	for {
		loopCtx, stop := context.WithCancel(ctx)
		errc := make(chan error, 1)
		go func() {
			errc <- renew.Run(loopCtx, renew.Config{
				Clock:  a.cfg.Clock,
				Logger: a.log.With("component", "renew"),
				Current: func() (time.Time, time.Time) {
					leaf := a.id.Get().Leaf()
					return leaf.NotBefore, leaf.NotAfter
				},
				Renew: func(ctx context.Context) error { return a.Renew(ctx, a.nodeClient()) },
			})
		}()
		select {
		case err := <-errc:
			stop()
			return err // renew.ErrExpired is edge.ErrCertExpired
		case <-a.renewNow:
			stop()
			<-errc
			if err := a.Renew(ctx, a.nodeClient()); err != nil {
				a.log.Warn("renewal asked by the control plane failed; the usual schedule goes on", "err", err)
			}
		}
	}
}

// Renew makes a fresh key, has the control plane sign it, saves the new
// identity and starts presenting it.
func (a *Agent) Renew(ctx context.Context, nodes interface {
	RenewCertificate(context.Context, *connect.Request[llorchv1.RenewCertificateRequest]) (*connect.Response[llorchv1.RenewCertificateResponse], error)
}) error {
	cur := a.id.Get()
	key, err := certs.NewKey()
	if err != nil {
		return err
	}
	csr, err := certs.NewCSR(key)
	if err != nil {
		return err
	}
	resp, err := nodes.RenewCertificate(ctx, connect.NewRequest(&llorchv1.RenewCertificateRequest{Csr: csr}))
	if err != nil {
		return fmt.Errorf("renew: %w", client.Explain(err))
	}
	chain, err := certs.ParseCertsDER(resp.Msg.GetCertificateChain())
	if err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	if err := certs.CheckNodeCertificate(chain, &key.PublicKey, cur.RootPool(), cur.TrustDomain, cur.NodeID); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	leaf := chain[0]
	next := cur
	next.Key, next.Chain = key, chain
	if err := state.Save(a.cfg.StateDir, next); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	a.id.Set(next)
	a.useNewCertificate()
	a.log.InfoContext(ctx, "certificate renewed", "serial", certs.SerialHex(leaf), "not_after", leaf.NotAfter)
	return nil
}
