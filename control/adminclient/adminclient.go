// Package adminclient is the one way to reach a control plane as its
// operator: through the Unix socket in a local data directory (its file
// mode is the credential), or a remote URL with the CA fingerprint pinned
// and an API token. The CLI, the test harness and edgesim all use it.
package adminclient

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/private"
)

// SocketPath is where the admin socket of a data directory lives.
func SocketPath(dataDir string) string { return filepath.Join(dataDir, "control.sock") }

// SocketURL is the base URL requests over the socket are made to (the host
// is ignored: the connection is the socket).
const SocketURL = "http://control.sock"

// SocketHTTP is an HTTP client whose every connection is the admin socket of
// dataDir, spoken as HTTP/2 without TLS (the socket also speaks HTTP/1.1,
// for curl). It does not check the socket: Local does.
func SocketHTTP(dataDir string) *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	sock := SocketPath(dataDir)
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		Protocols: &p,
	}}
}

// Local returns an AdminService client on the socket of dataDir, once it
// has checked that a control plane is there and that the socket belongs to
// this user (its answers, such as new join tokens, are believed; a socket
// planted by someone else must get nothing).
func Local(dataDir string) (llorchv1connect.AdminServiceClient, error) {
	sock := SocketPath(dataDir)
	if _, err := os.Stat(sock); err != nil {
		return nil, fmt.Errorf("no control plane is running with data directory %s (no socket %s): start one with `control serve --data %s`, or use --server", dataDir, sock, dataDir)
	}
	if err := private.Socket(sock); err != nil {
		return nil, err
	}
	return llorchv1connect.NewAdminServiceClient(SocketHTTP(dataDir), SocketURL, connect.WithGRPC()), nil
}

// Remote returns an AdminService client for the control plane at rawURL
// (https://host:port), trusting only the CA with fingerprint and sending
// token as a bearer token.
func Remote(rawURL, fingerprint, token string) (llorchv1connect.AdminServiceClient, error) {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("--server %q: must be https://host:port", rawURL)
	}
	if !certs.ValidFingerprint(fingerprint) {
		return nil, errors.New("--server needs --ca-fingerprint sha256:<64 hex> (LLORCH_CA_FINGERPRINT), as `control ca show` prints it on the server")
	}
	if token == "" {
		return nil, errors.New("--server needs an API token in LLORCH_API_TOKEN")
	}
	// No deadline on the whole call: `node events --follow` streams for as
	// long as it runs. A control plane that does not answer is caught by
	// the dial, handshake and response-header timeouts.
	hc := &http.Client{Transport: &http.Transport{
		TLSClientConfig:       certs.PinnedTLSConfig(fingerprint, u.Hostname()),
		ForceAttemptHTTP2:     true,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
	}}
	return llorchv1connect.NewAdminServiceClient(hc, rawURL, BearerToken(token)), nil
}

// BearerToken sends "Authorization: Bearer <token>" on every call a Connect
// client makes, unary and streaming.
func BearerToken(token string) connect.ClientOption {
	return connect.WithInterceptors(bearer(token))
}

type bearer string

func (t bearer) set(h http.Header) { h.Set("Authorization", "Bearer "+string(t)) }

func (t bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		t.set(req.Header())
		return next(ctx, req)
	}
}

func (t bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		t.set(conn.RequestHeader())
		return conn
	}
}

func (t bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
