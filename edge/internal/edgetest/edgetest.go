// Package edgetest is what the edge's tests share: a test CA that issues
// node and server certificates, node identities, a fake control plane over
// real TLS on loopback (an httptest server speaking HTTP/2 that asks for
// client certificates, mounting the generated Connect handlers a test
// gives), a fake SessionService a test drives stream by stream, and a fake
// clock that reports the timers asked of it.
//
// It imports no control-plane package: the edge is tested against these
// fakes, and against the real control plane only in control/ and e2e/.
package edgetest

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/edge/state"
)

// WaitLimit bounds every wait for a state in the edge's tests; generous,
// for -race on a busy machine.
const WaitLimit = 20 * time.Second

// TrustDomain is the test CA's trust domain.
const TrustDomain = "edge.test"

// CA is a root and an intermediate that sign node and server certificates.
type CA struct {
	Root, Inter       *x509.Certificate
	rootKey, interKey *ecdsa.PrivateKey
}

// NewCA makes a CA valid from an hour ago for a day.
func NewCA(tb testing.TB) *CA {
	tb.Helper()
	now := time.Now()
	rootKey := newKey(tb)
	root := mustSign(tb, &x509.Certificate{
		Subject:   pkix.Name{CommonName: "edgetest root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, nil, &rootKey.PublicKey, rootKey)
	interKey := newKey(tb)
	inter := mustSign(tb, &x509.Certificate{
		Subject:   pkix.Name{CommonName: "edgetest intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, root, &interKey.PublicKey, rootKey)
	return &CA{Root: root, Inter: inter, rootKey: rootKey, interKey: interKey}
}

// Fingerprint is the root's, as a join token pins it.
func (ca *CA) Fingerprint() string { return certs.Fingerprint(ca.Root) }

// IssueNode signs a node certificate for pub naming nodeID, valid from a
// minute ago for lifetime, and returns it with the intermediate.
func (ca *CA) IssueNode(pub *ecdsa.PublicKey, nodeID string, lifetime time.Duration) ([]*x509.Certificate, error) {
	u, err := url.Parse(certs.NodeSPIFFEID(TrustDomain, nodeID))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	leaf, err := sign(&x509.Certificate{
		Subject:   pkix.Name{CommonName: nodeID},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(lifetime),
		URIs:     []*url.URL{u},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca.Inter, pub, ca.interKey)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf, ca.Inter}, nil
}

// IssueCSR signs a node's certificate request (DER, as enrollment and
// renewal send it) for nodeID and returns the chain as DER.
func (ca *CA) IssueCSR(csrDER []byte, nodeID string, lifetime time.Duration) ([][]byte, error) {
	csr, err := certs.ParseNodeCSR(csrDER)
	if err != nil {
		return nil, err
	}
	chain, err := ca.IssueNode(csr.PublicKey.(*ecdsa.PublicKey), nodeID, lifetime)
	if err != nil {
		return nil, err
	}
	return certs.DER(chain), nil
}

// Identity is a fresh node identity for nodeID of the control plane at
// controlURL, valid for an hour.
func (ca *CA) Identity(tb testing.TB, nodeID, controlURL string) state.Identity {
	tb.Helper()
	key := newKey(tb)
	chain, err := ca.IssueNode(&key.PublicKey, nodeID, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	return state.Identity{
		NodeID: nodeID, NodeName: "gpu-" + nodeID, SPIFFEID: certs.NodeSPIFFEID(TrustDomain, nodeID),
		TrustDomain: TrustDomain, ControlURL: controlURL, CAFingerprint: ca.Fingerprint(),
		EnrolledAt: time.Now().Add(-time.Minute).Truncate(time.Second),
		Key:        key, Chain: chain, Roots: []*x509.Certificate{ca.Root},
	}
}

// Enrolled saves a fresh identity for nodeID into a new state directory and
// returns the directory and the identity.
func (ca *CA) Enrolled(tb testing.TB, nodeID, controlURL string) (string, state.Identity) {
	tb.Helper()
	dir := tb.TempDir()
	id := ca.Identity(tb, nodeID, controlURL)
	if err := state.Save(dir, id); err != nil {
		tb.Fatal(err)
	}
	return dir, id
}

// serverCertificate is the control plane's certificate for loopback, sent
// with the intermediate and the root, as the real one is (an edge holding
// only a fingerprint finds the root in the chain).
func (ca *CA) serverCertificate(tb testing.TB) tls.Certificate {
	tb.Helper()
	key := newKey(tb)
	now := time.Now()
	leaf := mustSign(tb, &x509.Certificate{
		Subject:   pkix.Name{CommonName: "edgetest control plane"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca.Inter, &key.PublicKey, ca.interKey)
	return tls.Certificate{Certificate: certs.DER([]*x509.Certificate{leaf, ca.Inter, ca.Root}), PrivateKey: key, Leaf: leaf}
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := certs.NewKey()
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func mustSign(tb testing.TB, tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, parentKey *ecdsa.PrivateKey) *x509.Certificate {
	tb.Helper()
	c, err := sign(tmpl, parent, pub, parentKey)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// sign signs tmpl with parentKey; a nil parent makes it self-signed.
func sign(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, parentKey *ecdsa.PrivateKey) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	return x509.ParseCertificate(der)
}

// Server is a fake control plane: TLS 1.3 on loopback with HTTP/2, asking
// for (not requiring) a client certificate verified against the test CA,
// as the real public port does.
type Server struct {
	URL   string // https://127.0.0.1:port
	srv   *httptest.Server
	conns atomic.Int64

	mu       sync.Mutex
	requests map[string]int      // by path
	peers    map[string][]string // node IDs seen in client certificates, by path
}

// NewServer starts a fake control plane serving mux until the test ends.
// Mount handlers with mux.Handle(llorchv1connect.NewXServiceHandler(fake)).
func NewServer(tb testing.TB, ca *CA, mux *http.ServeMux) *Server {
	tb.Helper()
	s := &Server{requests: map[string]int{}, peers: map[string][]string{}}
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(ca.Root)
	clientCAs.AddCert(ca.Inter)
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.requests[r.URL.Path]++
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			if id, err := certs.NodeIDFromCert(TrustDomain, r.TLS.PeerCertificates[0]); err == nil {
				s.peers[r.URL.Path] = append(s.peers[r.URL.Path], id)
			}
		}
		s.mu.Unlock()
		mux.ServeHTTP(w, r)
	}))
	s.srv.Listener = &countingListener{Listener: s.srv.Listener, n: &s.conns}
	s.srv.EnableHTTP2 = true
	s.srv.TLS = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{ca.serverCertificate(tb)},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    clientCAs,
		NextProtos:   []string{"h2"},
	}
	s.srv.StartTLS()
	s.URL = s.srv.URL
	tb.Cleanup(s.srv.Close)
	return s
}

// Close stops the server now.
func (s *Server) Close() { s.srv.Close() }

// Conns is how many connections the server accepted.
func (s *Server) Conns() int { return int(s.conns.Load()) }

// Requests is how many requests reached path (e.g.
// llorchv1connect.EnrollServiceEnrollProcedure).
func (s *Server) Requests(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[path]
}

// Peers is the node IDs the client certificates of path's requests named.
func (s *Server) Peers(path string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.peers[path]...)
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}
