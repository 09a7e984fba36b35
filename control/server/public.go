package server

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// HandshakeTimeout bounds a new connection's TLS handshake on the public port.
const HandshakeTimeout = 10 * time.Second

// publicPort serves the public TLS port. Connections are accepted here, not
// by http.Server: an HTTP/2 connection (every edge session is one) is served
// by http2.Server.ServeConn on the goroutine that accepted it and did its
// handshake. Under http.Server that goroutine also carries net/http's
// per-connection frame, and parks deep enough to keep a 16 KiB stack for as
// long as the edge stays connected; here it keeps 8 KiB (docs/BENCHMARKS.md).
// Other connections (HTTP/1.1: browsers' gRPC-web, curl) are handed to the
// http.Server.
type publicPort struct {
	ln    net.Listener
	tls   *tls.Config
	h2    *http2.Server
	http1 *http.Server // serves the HTTP/1.1 connections; the HTTP/2 ones' base config
	log   *slog.Logger

	handoff *connListener

	handshakes atomic.Uint64 // TLS handshakes begun, for the collector's tuning

	mu      sync.Mutex
	conns   map[net.Conn]struct{} // handshaking or HTTP/2; closed by closeAll
	closing bool                  // shutting down: no new connection is served
	wg      sync.WaitGroup        // one per connection in conns
}

func newPublicPort(ln net.Listener, srv *http.Server, h2 *http2.Server, log *slog.Logger) (*publicPort, error) {
	if err := http2.ConfigureServer(srv, h2); err != nil {
		return nil, err
	}
	cfg := srv.TLSConfig.Clone()
	if !slices.Contains(cfg.NextProtos, "http/1.1") {
		cfg.NextProtos = append(cfg.NextProtos, "http/1.1")
	}
	return &publicPort{
		ln: ln, tls: cfg, h2: h2, http1: srv, log: log,
		handoff: &connListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})},
		conns:   map[net.Conn]struct{}{},
	}, nil
}

// serve accepts connections until the listener is closed; it returns
// http.ErrServerClosed then.
func (p *publicPort) serve() error {
	http1Done := make(chan error, 1)
	go func() { http1Done <- p.http1.Serve(p.handoff) }()
	delay := 5 * time.Millisecond
	for {
		c, err := p.ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			p.handoff.Close()
			<-http1Done
			return http.ErrServerClosed
		}
		if err != nil {
			// Out of file descriptors, most likely: wait for some to free up.
			p.log.Warn("accept on the public port failed; retrying", "err", err, "in", delay)
			time.Sleep(delay)
			delay = min(2*delay, time.Second)
			continue
		}
		delay = 5 * time.Millisecond
		if !p.track(c) {
			c.Close()
			continue
		}
		go p.serveConn(c)
	}
}

func (p *publicPort) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return false
	}
	p.conns[c] = struct{}{}
	p.wg.Add(1)
	return true
}

func (p *publicPort) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.wg.Done()
}

// serveConn does the handshake, then serves an HTTP/2 connection here until
// it closes, or hands an HTTP/1.1 one to the http.Server. Its frame stays on
// the stack for the whole connection, so the handshake is done in a call of
// its own.
func (p *publicPort) serveConn(c net.Conn) {
	defer p.untrack(c)
	tc := p.handshake(c)
	if tc == nil {
		return
	}
	if tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
		p.handoff.deliver(tc) // the http.Server closes it
		return
	}
	p.h2.ServeConn(tc, &http2.ServeConnOpts{BaseConfig: p.http1, Handler: p.http1.Handler})
}

// handshake does the TLS handshake within HandshakeTimeout; nil if it failed
// (the connection is closed then).
func (p *publicPort) handshake(c net.Conn) *tls.Conn {
	p.handshakes.Add(1)
	tc := tls.Server(c, p.tls)
	c.SetDeadline(time.Now().Add(HandshakeTimeout))
	if err := tc.Handshake(); err != nil {
		p.log.Debug("TLS handshake failed", "remote", c.RemoteAddr().String(), "err", err)
		c.Close()
		return nil
	}
	c.SetDeadline(time.Time{})
	return tc
}

// shutdown stops accepting, asks every connection to finish (HTTP/2
// connections get a GOAWAY), and waits for them until ctx ends; then it
// closes whatever is left and returns ctx's error.
func (p *publicPort) shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	p.ln.Close()
	err := p.http1.Shutdown(ctx) // also sends the GOAWAYs: ConfigureServer hooked the HTTP/2 server to it
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		p.closeAll()
	}
	return err
}

// closeAll closes every connection now.
func (p *publicPort) closeAll() {
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	p.ln.Close()
	p.http1.Close()
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

// connListener hands connections that are already accepted and handshaken
// to an http.Server.
type connListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *connListener) deliver(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.addr }
