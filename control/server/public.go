package server

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/llorch/llorch/control/metrics"
	"github.com/llorch/llorch/control/ratelimit"
)

// What a connection without a client certificate gets of HTTP/2: a few
// streams at once, and buffers no larger than HTTP/2's defaults, so that
// one holds kilobytes, not the megabytes x/net allows by default.
const (
	UnauthenticatedMaxStreams = 16
	unauthenticatedFrameSize  = 16 << 10 // HTTP/2's smallest, and its default
	unauthenticatedWindow     = 65535    // HTTP/2's initial flow-control window
)

// publicPort serves the public TLS port. Connections are accepted here, not
// by http.Server: an HTTP/2 connection (every edge session is one) is served
// by http2.Server.ServeConn on the goroutine that accepted it and did its
// handshake. Under http.Server that goroutine also carries net/http's
// per-connection frame, and parks deep enough to keep a 16 KiB stack for as
// long as the edge stays connected; here it keeps 8 KiB (docs/BENCHMARKS.md).
// Other connections (HTTP/1.1: browsers' gRPC-web, curl) are handed to the
// http.Server.
//
// It also bounds what a caller can hold (Limits): connections in all, and
// connections that are still in their handshake or have no client
// certificate, in all and per source address. A connection over a cap is
// closed as soon as it is accepted. Edges, whose certificates verify in the
// handshake, leave the unauthenticated count then, so a crowd of
// certificate-less connections cannot lock them out.
type publicPort struct {
	ln     net.Listener
	tls    *tls.Config
	h2     *http2.Server // connections with a client certificate: edges
	h2anon *http2.Server // connections without one
	http1  *http.Server  // serves the HTTP/1.1 connections; the HTTP/2 ones' base config
	limits Limits
	log    *slog.Logger
	// refused logs refused connections without flooding the log.
	refused *ratelimit.Log
	metrics *metrics.Metrics

	handoff *connListener

	handshakes atomic.Uint64 // TLS handshakes begun, for the collector's tuning

	mu      sync.Mutex
	conns   map[*countedConn]struct{} // every open connection; closed by closeAll
	unauth  int                       // of them, handshaking or without a client certificate
	perAddr map[string]int            // unauth by source address
	closing bool                      // shutting down: no new connection is served
	wg      sync.WaitGroup            // one per connection in conns
}

func newPublicPort(ln net.Listener, srv *http.Server, h2, h2anon *http2.Server, limits Limits, log *slog.Logger, refused *ratelimit.Log, m *metrics.Metrics) (*publicPort, error) {
	// Both hook into srv's Shutdown, which so sends every connection its GOAWAY.
	if err := http2.ConfigureServer(srv, h2); err != nil {
		return nil, err
	}
	if err := http2.ConfigureServer(srv, h2anon); err != nil {
		return nil, err
	}
	cfg := srv.TLSConfig.Clone()
	if !slices.Contains(cfg.NextProtos, "http/1.1") {
		cfg.NextProtos = append(cfg.NextProtos, "http/1.1")
	}
	return &publicPort{
		ln: ln, tls: cfg, h2: h2, h2anon: h2anon, http1: srv, limits: limits, log: log, refused: refused, metrics: m,
		handoff: &connListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})},
		conns:   map[*countedConn]struct{}{},
		perAddr: map[string]int{},
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
		cc, refusal := p.admit(c)
		if cc == nil {
			c.Close()
			if refusal != "" {
				p.metrics.ConnRefused(refusal)
				p.refused.Refused(context.Background(), "connection refused", "remote", c.RemoteAddr().String(), "reason", refusal)
			}
			continue
		}
		go p.serveConn(cc)
	}
}

// Why admit refuses a connection (the metric's label).
const (
	refusedTotal  = "max_conns"
	refusedUnauth = "max_unauthenticated_conns"
	refusedAddr   = "max_unauthenticated_conns_per_addr"
)

// admit counts a new connection in, or says which cap it is over ("" when
// the port is shutting down).
func (p *publicPort) admit(c net.Conn) (*countedConn, string) {
	addr := ratelimit.AddrKey(c.RemoteAddr().String())
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closing:
		return nil, ""
	case len(p.conns) >= p.limits.MaxConns:
		return nil, refusedTotal
	case p.unauth >= p.limits.MaxUnauthenticatedConns:
		return nil, refusedUnauth
	case p.perAddr[addr] >= p.limits.MaxUnauthenticatedConnsPerAddr:
		return nil, refusedAddr
	}
	cc := &countedConn{Conn: c, p: p, addr: addr, unauth: true}
	p.conns[cc] = struct{}{}
	p.unauth++
	p.perAddr[addr]++
	p.wg.Add(1)
	return cc, ""
}

// authenticated moves a connection whose client certificate verified out
// of the unauthenticated counts.
func (p *publicPort) authenticated(cc *countedConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if cc.unauth && !cc.closed {
		cc.unauth = false
		p.releaseUnauth(cc.addr)
		cc.addr = "" // not needed again; an edge's connection holds no more than it must
	}
}

// releaseUnauth gives back one unauthenticated connection of addr; p.mu is held.
func (p *publicPort) releaseUnauth(addr string) {
	p.unauth--
	if p.perAddr[addr]--; p.perAddr[addr] <= 0 {
		delete(p.perAddr, addr)
	}
}

// countedConn is an accepted connection, counted against the caps until it
// is closed, by whoever closes it (the HTTP/2 server, the http.Server,
// closeAll).
type countedConn struct {
	net.Conn
	p      *publicPort
	addr   string
	unauth bool // counted as unauthenticated; guarded by p.mu
	closed bool // guarded by p.mu
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	p := c.p
	p.mu.Lock()
	if !c.closed {
		c.closed = true
		delete(p.conns, c)
		if c.unauth {
			p.releaseUnauth(c.addr)
		}
		p.wg.Done()
	}
	p.mu.Unlock()
	return err
}

// serveConn does the handshake, then serves an HTTP/2 connection here until
// it closes, or hands an HTTP/1.1 one to the http.Server. Its frame stays on
// the stack for the whole connection, so the handshake is done in a call of
// its own.
func (p *publicPort) serveConn(cc *countedConn) {
	tc := p.handshake(cc)
	if tc == nil {
		return
	}
	h2 := p.h2anon
	if len(tc.ConnectionState().VerifiedChains) > 0 {
		p.authenticated(cc)
		h2 = p.h2
	}
	if tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
		p.handoff.deliver(tc) // the http.Server closes it
		return
	}
	if !p.preface(tc) {
		return
	}
	h2.ServeConn(tc, &http2.ServeConnOpts{BaseConfig: p.http1, Handler: p.http1.Handler, SawClientPreface: true}) // closes tc
}

// preface reads the HTTP/2 client preface within the handshake timeout
// (x/net waits a fixed 10 s for it); false if it did not come (the
// connection is closed then).
func (p *publicPort) preface(tc *tls.Conn) bool {
	var buf [len(http2.ClientPreface)]byte
	tc.SetReadDeadline(time.Now().Add(p.limits.HandshakeTimeout))
	if _, err := io.ReadFull(tc, buf[:]); err != nil || string(buf[:]) != http2.ClientPreface {
		tc.Close()
		return false
	}
	tc.SetReadDeadline(time.Time{})
	return true
}

// handshake does the TLS handshake within the handshake timeout; nil if it failed
// (the connection is closed then).
func (p *publicPort) handshake(c net.Conn) *tls.Conn {
	p.handshakes.Add(1)
	tc := tls.Server(c, p.tls)
	c.SetDeadline(time.Now().Add(p.limits.HandshakeTimeout))
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
	err := p.http1.Shutdown(ctx) // also sends the GOAWAYs: ConfigureServer hooked the HTTP/2 servers to it
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
	conns := make([]*countedConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// connCounts reports the open connections and, of them, the unauthenticated
// ones, for the metrics scrape.
func (p *publicPort) connCounts() (all, unauth int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns), p.unauth
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
