// Package client builds the edge's connections to the control plane: an
// HTTP/2 transport over mutual TLS that presents the node's current
// certificate, and the translation of the control plane's refusals into
// edge.RefusalError.
package client

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/state"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/refusal"
)

// Identity holds the identity in use and lets a renewal swap it while
// connections are open; new handshakes present the new certificate.
type Identity struct {
	mu sync.RWMutex
	id state.Identity
}

// NewIdentity returns a holder for id.
func NewIdentity(id state.Identity) *Identity { return &Identity{id: id} }

// Get returns the identity in use.
func (h *Identity) Get() state.Identity {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.id
}

// Set replaces the identity in use.
func (h *Identity) Set(id state.Identity) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.id = id
}

// HTTPClient is an HTTP/2 client over mTLS as the node. HTTP/2 pings detect
// a dead path long before TCP would.
func HTTPClient(h *Identity) *http.Client {
	id := h.Get()
	tlsCfg := certs.NodeClientTLSConfig(id.RootPool(), func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c := h.Get().TLSCertificate(cri.AcceptableCAs)
		return &c, nil
	})
	return &http.Client{Transport: transport(tlsCfg)}
}

// Fresh returns a client like c, which HTTPClient made, on connections of
// its own: the same TLS configuration (and so the same session tickets), a
// new pool of connections. The caller closes c's connections once idle.
func Fresh(c *http.Client) *http.Client {
	return &http.Client{Transport: transport(c.Transport.(*http2.Transport).TLSClientConfig)}
}

func transport(tlsCfg *tls.Config) *http2.Transport {
	return &http2.Transport{
		TLSClientConfig: tlsCfg,
		DialTLSContext:  dialTLS,
		ReadIdleTimeout: 15 * time.Second,
		PingTimeout:     5 * time.Second,
		// An edge's connection carries its session and the odd renewal:
		// header compression tables would save a few bytes per request and
		// cost the control plane about a kilobyte per connected node, for
		// as long as the node stays connected. Both sides' dynamic tables
		// are turned off (1 byte holds no entry): this side's encoder says
		// so in its first header block, the control plane's encoder reads
		// it from this side's SETTINGS, which come before any request.
		MaxEncoderHeaderTableSize: noHeaderTable,
		MaxDecoderHeaderTableSize: noHeaderTable,
	}
}

// noHeaderTable is an HPACK dynamic table size too small for any entry
// (x/net/http2 reads 0 as "the default, 4096").
const noHeaderTable = 1

// DialTimeout bounds connecting and the TLS handshake, so a path that
// swallows packets fails fast and the session's backoff takes over.
const DialTimeout = 10 * time.Second

func dialTLS(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, DialTimeout)
	defer cancel()
	d := tls.Dialer{NetDialer: &net.Dialer{KeepAlive: 30 * time.Second}, Config: cfg}
	return d.DialContext(ctx, network, addr)
}

// NodeClient returns a NodeService client for the identity's control plane.
func NodeClient(h *Identity) llorchv1connect.NodeServiceClient {
	return llorchv1connect.NewNodeServiceClient(HTTPClient(h), h.Get().ControlURL)
}

// Explain returns a Connect error from a call to the control plane as an
// *edge.RefusalError, with the refusal's reason and retry hint read from
// its headers and the original error wrapped; other errors (and one already
// explained) come back unchanged.
func Explain(err error) error {
	if _, ok := errors.AsType[*edge.RefusalError](err); ok {
		return err
	}
	cerr, ok := errors.AsType[*connect.Error](err)
	if !ok {
		return err
	}
	return &edge.RefusalError{
		Code:       cerr.Code(),
		Reason:     cerr.Meta().Get(refusal.ReasonHeader),
		RetryAfter: retryAfter(cerr),
		Err:        err,
	}
}

// maxRetryAfter bounds a retry hint, so a bad one cannot stop an edge for long.
const maxRetryAfter = time.Minute

// retryAfter reads the hint in milliseconds; 0 when there is none.
func retryAfter(cerr *connect.Error) time.Duration {
	ms, err := strconv.ParseInt(cerr.Meta().Get(refusal.RetryAfterHeader), 10, 64)
	if err != nil || ms <= 0 {
		return 0
	}
	return time.Duration(min(ms, maxRetryAfter.Milliseconds())) * time.Millisecond
}
