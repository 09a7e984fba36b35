// Package client builds the edge's connections to the control plane: an
// HTTP/2 transport over mutual TLS that presents the node's current
// certificate, and the translation of the control plane's refusals into
// edge errors.
package client

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/net/http2"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/authz"
	"github.com/llorch/llorch/edge"
	"github.com/llorch/llorch/edge/state"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
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
	tlsCfg := certs.NodeClientTLSConfig(id.RootPool(), func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c := h.Get().TLSCertificate()
		return &c, nil
	})
	return &http.Client{Transport: &http2.Transport{
		TLSClientConfig: tlsCfg,
		ReadIdleTimeout: 15 * time.Second,
		PingTimeout:     5 * time.Second,
	}}
}

// NodeClient returns a NodeService client for the identity's control plane.
func NodeClient(h *Identity) llorchv1connect.NodeServiceClient {
	return llorchv1connect.NewNodeServiceClient(HTTPClient(h), h.Get().ControlURL)
}

// Explain turns a refusal from the control plane into an edge error that
// says what to do, keeping the original error wrapped.
func Explain(err error) error {
	var cerr *connect.Error
	if !errors.As(err, &cerr) {
		return err
	}
	switch cerr.Meta().Get(authz.ReasonHeader) {
	case authz.ReasonRevoked:
		return edge.ErrRevoked
	case authz.ReasonExpired:
		return edge.ErrCertExpired
	case authz.ReasonSuperseded:
		return edge.ErrSuperseded
	}
	if cerr.Code() == connect.CodeUnavailable {
		return fmt.Errorf("control plane unreachable: %s", cerr.Message())
	}
	return fmt.Errorf("%s", cerr.Message())
}
