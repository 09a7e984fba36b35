package server_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/adminclient"
	"github.com/llorch/llorch/control/registry"
	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/control/server/servertest"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/refusal"
)

// Each documented limit of the public port, crossed. Attackers dial from
// 127.0.0.2 (Linux routes all of 127/8 to loopback), so that the caps per
// source address they fill are not the test's own.
const attacker = "127.0.0.2"

// dialFrom opens a TCP connection to srv from the loopback address ip.
func dialFrom(tb testing.TB, srv *servertest.Server, ip string) net.Conn {
	tb.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", srv.Addr().String())
	if err != nil {
		tb.Fatalf("dial from %s: %v", ip, err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// tlsFrom does a TLS handshake without a client certificate, offering proto.
func tlsFrom(tb testing.TB, srv *servertest.Server, ip, proto string) *tls.Conn {
	tb.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	tc := tls.Client(dialFrom(tb, srv, ip), &tls.Config{RootCAs: roots, ServerName: "localhost", NextProtos: []string{proto}})
	if err := tc.Handshake(); err != nil {
		tb.Fatalf("handshake: %v", err)
	}
	return tc
}

// closedWithin says whether the server closed c within d (a read ends with
// EOF or a reset rather than a timeout), draining what it sent meanwhile.
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// waitClosed fails unless the server closes c within limit plus slack
// for a loaded machine, and not before min.
func waitClosed(tb testing.TB, c net.Conn, min, limit time.Duration, what string) {
	tb.Helper()
	start := time.Now()
	if !closedWithin(c, limit+5*time.Second) {
		tb.Fatalf("%s: still open %s after the limit of %s", what, time.Since(start).Round(time.Millisecond), limit)
	}
	if took := time.Since(start); took < min {
		tb.Errorf("%s: closed after %s, before the limit of %s", what, took.Round(time.Millisecond), min)
	}
}

func shortTimeouts(c *server.Config) {
	c.Limits.HandshakeTimeout = 300 * time.Millisecond
	c.Limits.IdleTimeout = 300 * time.Millisecond
	c.Limits.BodyTimeout = 500 * time.Millisecond
}

// A connection that never finishes its handshake, one that finishes it and
// sends nothing (HTTP/2 and HTTP/1.1), and a request whose body never
// finishes are all closed once their timeout passes.
func TestTimeoutsClose(t *testing.T) {
	srv := servertest.Start(t, shortTimeouts)
	lim := srv.Config.Limits

	t.Run("handshake never finished", func(t *testing.T) {
		c := dialFrom(t, srv, attacker)
		c.Write([]byte{0x16, 0x03, 0x01}) // the start of a ClientHello, and no more
		waitClosed(t, c, lim.HandshakeTimeout/2, lim.HandshakeTimeout, "half a ClientHello")
	})
	t.Run("TLS done, no HTTP/2 request", func(t *testing.T) {
		tc := tlsFrom(t, srv, attacker, "h2")
		tc.Write([]byte(http2.ClientPreface))
		fr := http2.NewFramer(tc, tc)
		fr.WriteSettings()
		waitClosed(t, tc, lim.IdleTimeout/2, lim.IdleTimeout, "an idle HTTP/2 connection")
	})
	t.Run("TLS done, no HTTP/2 preface", func(t *testing.T) {
		tc := tlsFrom(t, srv, attacker, "h2")
		waitClosed(t, tc, lim.HandshakeTimeout/2, lim.HandshakeTimeout, "an HTTP/2 connection with no preface")
	})
	t.Run("TLS done, no HTTP/1.1 request", func(t *testing.T) {
		tc := tlsFrom(t, srv, attacker, "http/1.1")
		waitClosed(t, tc, lim.HandshakeTimeout/2, lim.HandshakeTimeout, "an HTTP/1.1 connection with no request")
	})
	t.Run("HTTP/1.1 idle after a request", func(t *testing.T) {
		tc := tlsFrom(t, srv, attacker, "http/1.1")
		fmt.Fprintf(tc, "POST /llorch.v1.InfoService/GetInfo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GetInfo over HTTP/1.1: %v %v", resp, err)
		}
		io.Copy(io.Discard, resp.Body)
		waitClosed(t, tc, lim.IdleTimeout/2, lim.IdleTimeout, "an idle HTTP/1.1 connection")
	})
	t.Run("body never finished, HTTP/1.1", func(t *testing.T) {
		tc := tlsFrom(t, srv, attacker, "http/1.1")
		fmt.Fprintf(tc, "POST /llorch.v1.EnrollService/Enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/proto\r\nContent-Length: 1000\r\n\r\nabc")
		start := time.Now()
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err == nil {
			resp.Body.Close()
		}
		if took := time.Since(start); took > lim.BodyTimeout+5*time.Second || took < lim.BodyTimeout/2 {
			t.Errorf("a stalled body was answered after %s, want about %s", took, lim.BodyTimeout)
		}
	})
	t.Run("body never finished, HTTP/2", func(t *testing.T) {
		h := newH2(t, tlsFrom(t, srv, attacker, "h2"))
		h.headers(1, "/llorch.v1.EnrollService/Enroll", "application/proto", false)
		h.fr.WriteData(1, false, []byte("abc"))
		start := time.Now()
		end := h.streamEnd(1, lim.BodyTimeout+5*time.Second)
		if end == "" {
			t.Fatal("a stalled body was never cut off")
		}
		if took := time.Since(start); took < lim.BodyTimeout/2 {
			t.Errorf("a stalled body was cut off after %s, before its limit of %s", took, lim.BodyTimeout)
		}
	})
	t.Run("public stream held open", func(t *testing.T) {
		// Reflection is public and bidirectional: a stream nobody ends is
		// ended when the body timeout passes.
		h := newH2(t, tlsFrom(t, srv, attacker, "h2"))
		h.headers(1, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "application/connect+proto", false)
		start := time.Now()
		if end := h.streamEnd(1, lim.BodyTimeout+5*time.Second); end == "" {
			t.Fatal("a public stream stayed open")
		}
		if took := time.Since(start); took < lim.BodyTimeout/2 {
			t.Errorf("ended after %s, before the limit", took)
		}
	})
}

// A long stream for a caller with a credential (WatchEvents, admin) is not
// cut off by the body timeout once its request has arrived, over HTTP/2 and
// over HTTP/1.1.
func TestAuthenticatedStreamOutlivesBodyTimeout(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) { shortTimeouts(c); c.APIToken = testAPIToken })
	for _, proto := range []string{"h2", "http/1.1"} {
		t.Run(proto, func(t *testing.T) {
			roots := x509.NewCertPool()
			roots.AddCert(srv.Root())
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, NextProtos: []string{proto}}, ForceAttemptHTTP2: proto == "h2"}
			defer tr.CloseIdleConnections()
			admin := newAdmin(&http.Client{Transport: tr}, srv.URL(), testAPIToken)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stream, err := admin.WatchEvents(ctx, connect.NewRequest(&llorchv1.WatchEventsRequest{}))
			if err != nil {
				t.Fatal(err)
			}
			hold := 4 * srv.Config.Limits.BodyTimeout
			time.AfterFunc(hold, func() {
				srv.Admin.CreateJoinToken(context.Background(), connect.NewRequest(&llorchv1.CreateJoinTokenRequest{Name: "late"}))
			})
			for stream.Receive() {
				if stream.Msg().GetEvent().GetKind() == "token_created" {
					return // an event recorded after four body timeouts arrived
				}
			}
			t.Fatalf("the stream ended: %v", stream.Err())
		})
	}
}

// Messages over the limit are refused with resource_exhausted before the
// memory is spent. Callers with a credential may send up to MaxMessageBytes,
// compressed or not: a gzip bomb costs a megabyte of work, not its
// decompressed size. The public services, which anyone may call, take
// PublicMaxMessageBytes and nothing compressed.
func TestMessageSizeLimit(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) { c.APIToken = testAPIToken })
	bomb := gzipOf(t, 64<<20) // 64 MiB of zeros in about 64 KiB
	bearer := "Bearer " + testAPIToken
	for _, path := range []string{
		"/llorch.v1.EnrollService/Enroll",
		"/llorch.v1.InfoService/GetInfo",
		"/grpc.health.v1.Health/Check",
	} {
		t.Run("public, compressed: "+path, func(t *testing.T) {
			before := totalAlloc()
			if code, _ := connectUnary(t, srv, path, bomb, "gzip", ""); code == "" {
				t.Error("a compressed message was taken by a public service")
			}
			if grew := totalAlloc() - before; grew > 8<<20 {
				t.Errorf("refusing it allocated %d MiB", grew>>20)
			}
		})
	}
	t.Run("public, just over", func(t *testing.T) {
		code, _ := connectUnary(t, srv, "/llorch.v1.EnrollService/Enroll", make([]byte, server.PublicMaxMessageBytes+1), "", "")
		if code != "resource_exhausted" {
			t.Errorf("a public message one byte over the limit: %s, want resource_exhausted", code)
		}
	})
	t.Run("public, just under", func(t *testing.T) {
		// A well-formed message under the limit reaches its handler (a bad token, here).
		msg := append([]byte{0x0a, 0x80, 0x60}, make([]byte, 12<<10)...) // field 1 (token), 12 KiB
		if code, _ := connectUnary(t, srv, "/llorch.v1.EnrollService/Enroll", msg, "", ""); code != "invalid_argument" {
			t.Errorf("a message under the limit: %s, want invalid_argument from the handler", code)
		}
	})
	t.Run("admin, compressed", func(t *testing.T) {
		before := totalAlloc()
		code, _ := connectUnary(t, srv, "/llorch.v1.AdminService/ListNodes", bomb, "gzip", bearer)
		if code != "resource_exhausted" {
			t.Errorf("a 64 MiB message in %d KiB of gzip: %s, want resource_exhausted", len(bomb)>>10, code)
		}
		if grew := totalAlloc() - before; grew > 32<<20 {
			t.Errorf("refusing it allocated %d MiB", grew>>20)
		}
	})
	t.Run("admin, just over", func(t *testing.T) {
		code, _ := connectUnary(t, srv, "/llorch.v1.AdminService/ListNodes", make([]byte, server.MaxMessageBytes+1), "", bearer)
		if code != "resource_exhausted" {
			t.Errorf("a message one byte over the limit: %s, want resource_exhausted", code)
		}
	})
	t.Run("edge session", func(t *testing.T) {
		// An edge whose report is over the limit is told so, with a reason
		// it acts on.
		id := rawNode(t, srv)
		stream := openSession(t, id)
		pools := make([]*llorchv1.Pool, 0, 4096)
		for i := range 4096 {
			pools = append(pools, &llorchv1.Pool{Id: fmt.Sprintf("pool-%d", i), Model: strings.Repeat("m", 300)})
		}
		stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: &llorchv1.Register{Status: &llorchv1.NodeStatusReport{Pools: pools}}}})
		err := receiveErr(t, stream)
		var cerr *connect.Error
		if !errors.As(err, &cerr) || cerr.Code() != connect.CodeResourceExhausted || cerr.Meta().Get(refusal.ReasonHeader) != refusal.TooLarge {
			t.Errorf("a 1.3 MiB Register: %v, want resource_exhausted with reason %s", err, refusal.TooLarge)
		}
	})
	t.Run("reflection stream, compressed", func(t *testing.T) {
		h := newH2(t, tlsFrom(t, srv, "127.0.0.1", "h2"))
		h.headers(1, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "application/connect+proto", false, "connect-content-encoding", "gzip")
		small := gzipOf(t, 16<<20)                     // within one flow-control window
		env := append([]byte{1, 0, 0, 0, 0}, small...) // flag 1: compressed
		putLen(env, len(small))
		before := totalAlloc()
		h.data(1, env)
		if end := h.streamEnd(1, 10*time.Second); !strings.Contains(end, "error") {
			t.Errorf("reflection with a gzip bomb ended with %q, want an error", end)
		}
		if grew := totalAlloc() - before; grew > 8<<20 {
			t.Errorf("refusing it allocated %d MiB", grew>>20)
		}
	})
}

// Headers over 64 KiB are refused before any handler runs.
func TestHeaderSizeLimit(t *testing.T) {
	srv := servertest.Start(t, nil)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	for _, proto := range []string{"h2", "http/1.1"} {
		t.Run(proto, func(t *testing.T) {
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, NextProtos: []string{proto}}, ForceAttemptHTTP2: proto == "h2"}
			defer tr.CloseIdleConnections()
			// net/http and x/net allow a little over MaxHeaderBytes for framing.
			for _, size := range []int{server.MaxHeaderBytes / 2, server.MaxHeaderBytes + 8<<10} {
				req, _ := http.NewRequest(http.MethodPost, srv.URL()+"/llorch.v1.InfoService/GetInfo", strings.NewReader("{}"))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("X-Padding", strings.Repeat("a", size))
				resp, err := tr.RoundTrip(req)
				ok := err == nil && resp.StatusCode == http.StatusOK
				if err == nil {
					resp.Body.Close()
				}
				if want := size < server.MaxHeaderBytes; ok != want {
					t.Errorf("%d bytes of headers: answered %v (%v), want %v", size, ok, err, want)
				}
			}
		})
	}
}

// A connection without a client certificate may open UnauthenticatedMaxStreams
// streams at once; one more is refused. An edge's connection is offered more.
func TestStreamsPerConnection(t *testing.T) {
	srv := servertest.Start(t, nil)
	h := newH2(t, tlsFrom(t, srv, attacker, "h2"))
	if got := h.maxStreams; got != server.UnauthenticatedMaxStreams {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS %d for a connection without a certificate, want %d", got, server.UnauthenticatedMaxStreams)
	}
	for i := range server.UnauthenticatedMaxStreams + 1 {
		h.headers(uint32(2*i+1), "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "application/connect+proto", false)
	}
	over := uint32(2*server.UnauthenticatedMaxStreams + 1)
	if end := h.streamEnd(over, 5*time.Second); !strings.Contains(end, "REFUSED_STREAM") && !strings.Contains(end, "PROTOCOL_ERROR") {
		t.Errorf("stream %d over the limit ended with %q, want it refused", over, end)
	}

	id := rawNode(t, srv)
	cfg := nodeTLS(id)
	cfg.NextProtos, cfg.ServerName = []string{"h2"}, "localhost"
	tc := tls.Client(dialFrom(t, srv, "127.0.0.1"), cfg)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if e := newH2(t, tc); e.maxStreams <= server.UnauthenticatedMaxStreams {
		t.Errorf("an edge's connection is offered %d streams", e.maxStreams)
	}
}

// One address holding as many connections without a certificate as it may
// (and trying for thousands more) neither locks out an edge, nor an
// enrollment, nor the admin socket; what it holds over the cap is closed at
// once, and a second address still gets in.
func TestConnectionCapsPerAddress(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) {
		c.Limits.MaxUnauthenticatedConnsPerAddr = 8
		c.Limits.MaxUnauthenticatedConns = 12
		// What is held is held for the whole test.
		c.Limits.HandshakeTimeout, c.Limits.IdleTimeout = 5*time.Minute, 5*time.Minute
	})
	lim := srv.Config.Limits
	held := make([]net.Conn, 0, 8)
	for range lim.MaxUnauthenticatedConnsPerAddr {
		c := dialFrom(t, srv, attacker)
		held = append(held, c)
	}
	waitConns(t, srv, lim.MaxUnauthenticatedConnsPerAddr)
	for i := range 2000 {
		c := dialFrom(t, srv, attacker)
		if !closedWithin(c, 5*time.Second) {
			t.Fatalf("connection %d over the cap of %d per address was kept", i+1, lim.MaxUnauthenticatedConnsPerAddr)
		}
		c.Close()
	}
	// An edge with its certificate, an enrollment and the admin socket
	// still work, all from 127.0.0.1.
	id := rawNode(t, srv)
	if _, err := whoAmI(id); err != nil {
		t.Errorf("an edge is locked out: %v", err)
	}
	if _, err := srv.Admin.ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{})); err != nil {
		t.Errorf("the admin socket is locked out: %v", err)
	}
	// A second address fills the rest of the total cap; then nobody
	// without a certificate gets in (edges are in their handshake, and so
	// unauthenticated, until their certificate verifies) until room is free.
	for range lim.MaxUnauthenticatedConns - lim.MaxUnauthenticatedConnsPerAddr {
		dialFrom(t, srv, "127.0.0.3")
	}
	waitConns(t, srv, lim.MaxUnauthenticatedConns)
	c := dialFrom(t, srv, "127.0.0.4")
	if !closedWithin(c, 5*time.Second) {
		t.Error("a connection over the total cap was kept")
	}
	for _, c := range held {
		c.Close()
	}
	waitConns(t, srv, lim.MaxUnauthenticatedConns-len(held))
	if _, err := whoAmI(id); err != nil {
		t.Errorf("an edge is locked out once room is free: %v", err)
	}
}

// waitConns waits until the public port holds n unauthenticated connections.
func waitConns(tb testing.TB, srv *servertest.Server, n int) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, unauth := srv.Conns()
		if unauth == n {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%d unauthenticated connections, want %d", unauth, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The rate limits, each crossed: enrollment per address, refused
// credentials per address, session opens and renewals per node. Each
// refusal is resource_exhausted with a retry hint.
func TestRateLimits(t *testing.T) {
	t.Run("enrollment per address", func(t *testing.T) {
		srv := servertest.Start(t, func(c *server.Config) { c.Limits.Enroll.Burst = 3; c.Limits.Enroll.Rate = 0.001 })
		token := srv.Token(t, &llorchv1.CreateJoinTokenRequest{MaxUses: 10})
		for i := range 3 {
			if _, _, err := enrollEdge(t, srv, token); err != nil {
				t.Fatalf("enrollment %d: %v", i+1, err)
			}
		}
		code, retry := enrollRaw(t, srv, token)
		if code != connect.CodeResourceExhausted || retry <= 0 {
			t.Errorf("the fourth enrollment: %v, retry in %s; want resource_exhausted with a hint", code, retry)
		}
	})
	t.Run("refused join tokens per address", func(t *testing.T) {
		srv := servertest.Start(t, func(c *server.Config) { c.Limits.AuthFailures.Burst = 3 })
		good := srv.Token(t, &llorchv1.CreateJoinTokenRequest{})
		bad := good[:len(good)-4] + "aaaa"
		for range 3 {
			if code, _ := enrollRaw(t, srv, bad); code != connect.CodeUnauthenticated {
				t.Fatalf("a wrong secret: %v, want unauthenticated", code)
			}
		}
		if code, retry := enrollRaw(t, srv, good); code != connect.CodeResourceExhausted || retry <= 0 {
			t.Errorf("after three guesses the right token got %v (retry %s), want resource_exhausted", code, retry)
		}
	})
	t.Run("refused API tokens per address", func(t *testing.T) {
		srv := servertest.Start(t, func(c *server.Config) { c.APIToken = testAPIToken; c.Limits.AuthFailures.Burst = 3 })
		roots := x509.NewCertPool()
		roots.AddCert(srv.Root())
		hc := &http.Client{Transport: &http2.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
		for range 3 {
			_, err := newAdmin(hc, srv.URL(), "wrong-"+testAPIToken).ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{}))
			if connect.CodeOf(err) != connect.CodeUnauthenticated {
				t.Fatalf("a wrong token: %v", err)
			}
		}
		_, err := newAdmin(hc, srv.URL(), testAPIToken).ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{}))
		if connect.CodeOf(err) != connect.CodeResourceExhausted || retryAfter(err) <= 0 {
			t.Errorf("after three wrong tokens the right one got %v, want resource_exhausted with a hint", err)
		}
		// The admin socket is not an address: it still works.
		if _, err := srv.Admin.ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{})); err != nil {
			t.Errorf("admin socket: %v", err)
		}
	})
	t.Run("sessions per node", func(t *testing.T) {
		srv := servertest.Start(t, func(c *server.Config) { c.Limits.NodeSessions.Rate = 0.001; c.Limits.NodeSessions.Burst = 2 })
		id := rawNode(t, srv)
		for range 2 {
			s := openSession(t, id)
			register(t, s)
			s.CloseRequest()
		}
		err := receiveErr(t, sendRegister(t, openSession(t, id)))
		if connect.CodeOf(err) != connect.CodeResourceExhausted || retryAfter(err) <= 0 {
			t.Errorf("a third session: %v, want resource_exhausted with a hint", err)
		}
		// Another node is not held back by this one.
		other := rawNode(t, srv)
		register(t, openSession(t, other))
	})
	t.Run("renewals per node", func(t *testing.T) {
		srv := servertest.Start(t, func(c *server.Config) { c.Limits.NodeRenewals.Rate = 0.001; c.Limits.NodeRenewals.Burst = 1 })
		id := rawNode(t, srv)
		if err := renewOnce(t, id); err != nil {
			t.Fatalf("first renewal: %v", err)
		}
		if err := renewOnce(t, id); connect.CodeOf(err) != connect.CodeResourceExhausted || retryAfter(err) <= 0 {
			t.Errorf("second renewal: %v, want resource_exhausted with a hint", err)
		}
	})
}

// --- helpers ---

func totalAlloc() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.TotalAlloc
}

func gzipOf(tb testing.TB, zeros int) []byte {
	tb.Helper()
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	buf := make([]byte, 1<<20)
	for n := 0; n < zeros; n += len(buf) {
		w.Write(buf)
	}
	w.Close()
	return b.Bytes()
}

func putLen(env []byte, n int) {
	env[1], env[2], env[3], env[4] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
}

// connectUnary posts body to path in the Connect unary protocol (proto),
// with an Authorization header unless it is "", and returns the error code
// and refusal reason ("" and "" on success).
func connectUnary(tb testing.TB, srv *servertest.Server, path string, body []byte, encoding, authorization string) (code, reason string) {
	tb.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	tr := &http2.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodPost, srv.URL()+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/proto")
	if encoding != "" {
		req.Header.Set("Content-Encoding", encoding)
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		tb.Fatalf("%s: %v", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		return "", ""
	}
	return wireCode(tb.(*testing.T), resp.Body), resp.Header.Get(refusal.ReasonHeader)
}

func retryAfter(err error) time.Duration {
	var cerr *connect.Error
	if !errors.As(err, &cerr) {
		return 0
	}
	ms, _ := strconv.Atoi(cerr.Meta().Get(refusal.RetryAfterHeader))
	return time.Duration(ms) * time.Millisecond
}

// h2 is a hand-driven HTTP/2 client connection.
type h2 struct {
	tb         testing.TB
	conn       *tls.Conn
	fr         *http2.Framer
	enc        *hpack.Encoder
	hbuf       bytes.Buffer
	maxStreams uint32
}

func newH2(tb testing.TB, tc *tls.Conn) *h2 {
	tb.Helper()
	if _, err := tc.Write([]byte(http2.ClientPreface)); err != nil {
		tb.Fatal(err)
	}
	h := &h2{tb: tb, conn: tc, fr: http2.NewFramer(tc, tc)}
	h.enc = hpack.NewEncoder(&h.hbuf)
	h.fr.WriteSettings()
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	f, err := h.fr.ReadFrame()
	if err != nil {
		tb.Fatalf("server SETTINGS: %v", err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok {
		tb.Fatalf("first frame %v, want SETTINGS", f)
	}
	h.maxStreams = ^uint32(0)
	if v, ok := sf.Value(http2.SettingMaxConcurrentStreams); ok {
		h.maxStreams = v
	}
	tc.SetReadDeadline(time.Time{})
	h.fr.WriteSettingsAck()
	return h
}

func (h *h2) headers(stream uint32, path, ctype string, end bool, extra ...string) {
	h.hbuf.Reset()
	fields := append([]string{":method", "POST", ":scheme", "https", ":authority", "localhost", ":path", path,
		"content-type", ctype, "connect-protocol-version", "1"}, extra...)
	for i := 0; i+1 < len(fields); i += 2 {
		h.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: h.hbuf.Bytes(), EndHeaders: true, EndStream: end}); err != nil {
		h.tb.Fatal(err)
	}
}

// data sends b on stream in frames the server accepts (16 KiB), without
// ending it.
func (h *h2) data(stream uint32, b []byte) {
	for len(b) > 0 {
		n := min(len(b), 16<<10)
		if err := h.fr.WriteData(stream, false, b[:n]); err != nil {
			h.tb.Fatal(err)
		}
		b = b[n:]
	}
}

// streamEnd reads frames until stream ends and says how: "RST_STREAM <code>",
// "GOAWAY", "closed", or the trailing data of an ended Connect stream; ""
// if it did not end within d.
func (h *h2) streamEnd(stream uint32, d time.Duration) string {
	deadline := time.Now().Add(d)
	var body []byte
	for time.Now().Before(deadline) {
		f, err := h.readFrame(deadline)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return ""
			}
			return "closed"
		}
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			if f.StreamID == stream {
				return "RST_STREAM " + f.ErrCode.String()
			}
		case *http2.GoAwayFrame:
			return "GOAWAY " + f.ErrCode.String()
		case *http2.DataFrame:
			if f.StreamID == stream {
				body = append(body, f.Data()...)
				if f.StreamEnded() {
					return "ended: " + string(body)
				}
			}
			h.fr.WriteWindowUpdate(0, uint32(len(f.Data())))
		case *http2.HeadersFrame:
			if f.StreamID == stream && f.StreamEnded() {
				return "ended: " + string(body)
			}
		}
	}
	return ""
}

func (h *h2) readFrame(deadline time.Time) (http2.Frame, error) {
	h.conn.SetReadDeadline(deadline)
	return h.fr.ReadFrame()
}

func newAdmin(hc *http.Client, url, token string) llorchv1connect.AdminServiceClient {
	return llorchv1connect.NewAdminServiceClient(hc, url, adminclient.BearerToken(token))
}

// nodeTLS is the TLS configuration an edge dials with as id.
func nodeTLS(id state.Identity) *tls.Config {
	return certs.NodeClientTLSConfig(id.RootPool(), func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c := id.TLSCertificate(cri.AcceptableCAs)
		return &c, nil
	})
}

// enrollRaw makes one enrollment call with token and a fresh key, without
// the edge's retries, and returns its code and retry hint.
func enrollRaw(tb testing.TB, srv *servertest.Server, token string) (connect.Code, time.Duration) {
	tb.Helper()
	key, err := certs.NewKey()
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := certs.NewCSR(key)
	if err != nil {
		tb.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	tr := &http2.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}
	defer tr.CloseIdleConnections()
	_, err = llorchv1connect.NewEnrollServiceClient(&http.Client{Transport: tr}, srv.URL()).
		Enroll(context.Background(), connect.NewRequest(&llorchv1.EnrollRequest{Token: token, Csr: csr}))
	if err == nil {
		return 0, 0
	}
	return connect.CodeOf(err), retryAfter(err)
}

// sendRegister sends Register on stream and returns it.
func sendRegister(tb testing.TB, stream *rawSession) *rawSession {
	tb.Helper()
	stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: &llorchv1.Register{}}})
	return stream
}

// renewOnce asks for a renewal as id with a fresh key and returns the raw error.
func renewOnce(tb testing.TB, id state.Identity) error {
	tb.Helper()
	key, err := certs.NewKey()
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := certs.NewCSR(key)
	if err != nil {
		tb.Fatal(err)
	}
	_, err = client.NodeClient(client.NewIdentity(id)).RenewCertificate(context.Background(), connect.NewRequest(&llorchv1.RenewCertificateRequest{Csr: csr}))
	return err
}

// One node reconnecting as fast as it can is held to its own session rate:
// it does not use up the registration pacing that every other edge shares,
// and costs the event log a bounded number of rows.
func TestReconnectingNodeBounded(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) {
		// A small shared budget, easy to use up, but more than one node's
		// own burst (10), as the defaults are (100 against 10).
		c.RegistrationRate, c.RegistrationBurst = 20, 20
	})
	flapper, other := rawNode(t, srv), rawNode(t, srv)
	stop := make(chan struct{})
	done := make(chan [2]int)
	go func() {
		var registered, limited int
		for {
			select {
			case <-stop:
				done <- [2]int{registered, limited}
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			s := llorchv1connect.NewSessionServiceClient(client.HTTPClient(client.NewIdentity(flapper)), flapper.ControlURL).Connect(ctx)
			s.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: &llorchv1.Register{}}})
			_, err := s.Receive()
			switch {
			case err == nil:
				registered++
			case connect.CodeOf(err) == connect.CodeResourceExhausted:
				limited++
			}
			s.CloseRequest()
			s.CloseResponse()
			cancel()
		}
	}()
	// Meanwhile another node registers, several times, and is never paced.
	for i := range 5 {
		time.Sleep(100 * time.Millisecond)
		s := openSession(t, other)
		if err := s.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: &llorchv1.Register{}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Receive(); err != nil {
			t.Errorf("registration %d of another node while one reconnects in a loop: %v", i+1, err)
		}
		s.CloseRequest()
	}
	close(stop)
	counts := <-done
	if counts[1] == 0 || counts[0] > 10 {
		t.Errorf("the reconnecting node registered %d times and was limited %d times; want at most its burst of 10, then limits", counts[0], counts[1])
	}
	evs := events(t, srv, flapper.NodeID)
	if n := countEvents(evs, "status"); n > registry.FlapBudget+1 {
		t.Errorf("%d status events for the reconnecting node, want at most %d", n, registry.FlapBudget+1)
	}
}

// The event log is held to its count at start (and every PruneInterval).
func TestEventRetention(t *testing.T) {
	srv := servertest.Start(t, nil)
	for range 60 {
		srv.Token(t, &llorchv1.CreateJoinTokenRequest{})
	}
	cfg := srv.Config
	cfg.Listen = srv.Addr().String()
	cfg.MaxEvents = 25
	srv.Stop()
	srv = servertest.StartConfig(t, cfg)
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := srv.Store().CountEvents(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if n == 25 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d events kept, want 25", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
