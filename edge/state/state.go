// Package state owns the edge's identity on disk: its private key, its
// certificate chain, the trusted roots and what enrollment said about the
// node. Everything that reads or replaces the identity goes through Load and
// Save, which keep it consistent across crashes.
//
// The layout of a state directory:
//
//	STATE/
//	  edge.lock      flock held by the agent or enrollment using the directory (see Lock)
//	  current -> identity-<serial>   symlink, replaced atomically
//	  identity-<serial>/
//	    node.key       PKCS#8 PEM ECDSA key, mode 0600
//	    node.crt       PEM: node certificate, then intermediates
//	    ca.crt         PEM: trusted root(s)
//	    identity.json  node ID, name, SPIFFE ID, trust domain, control URL,
//	                   CA fingerprint, enrollment time, labels
//
// Save writes a whole new generation directory, makes it durable, then points
// current at it with a rename, so a crash at any moment leaves either the old
// or the new identity complete under current. Anything else in the directory
// (a partial generation, a temporary symlink) is ignored by Load and removed
// by the next Save. Saves must not run concurrently on one directory: whoever
// saves holds Lock.
package state

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/internal/atomicfile"
)

// ErrNotEnrolled says the state directory holds no identity: the edge must
// enroll first.
var ErrNotEnrolled = errors.New("not enrolled: no identity in the state directory")

// Names inside the state directory.
const (
	currentLink   = "current"
	genPrefix     = "identity-"
	tmpLinkPrefix = ".current.tmp-"
	keyFile       = "node.key"
	certFile      = "node.crt"
	caFile        = "ca.crt"
	infoFile      = "identity.json"
)

// Identity is an enrolled edge's identity.
type Identity struct {
	NodeID, NodeName, SPIFFEID, TrustDomain, ControlURL, CAFingerprint string
	// Labels is nil when the node has none.
	Labels     map[string]string
	EnrolledAt time.Time
	Key        *ecdsa.PrivateKey
	Chain      []*x509.Certificate // leaf first, then intermediates
	Roots      []*x509.Certificate
}

// info is identity.json.
type info struct {
	NodeID        string            `json:"node_id"`
	NodeName      string            `json:"node_name"`
	SPIFFEID      string            `json:"spiffe_id"`
	TrustDomain   string            `json:"trust_domain"`
	ControlURL    string            `json:"control_url"`
	CAFingerprint string            `json:"ca_fingerprint"`
	EnrolledAt    time.Time         `json:"enrolled_at"`
	Labels        map[string]string `json:"labels"`
}

// Leaf returns the node certificate, or nil when the chain is empty.
func (id Identity) Leaf() *x509.Certificate {
	if len(id.Chain) == 0 {
		return nil
	}
	return id.Chain[0]
}

// NotAfter returns when the node certificate expires; the zero time when
// there is none.
func (id Identity) NotAfter() time.Time {
	if l := id.Leaf(); l != nil {
		return l.NotAfter
	}
	return time.Time{}
}

// Expired reports whether the certificate is past NotAfter at now. An
// identity without a certificate is expired.
func (id Identity) Expired(now time.Time) bool {
	return now.After(id.NotAfter())
}

// TLSCertificate returns the tls.Certificate (chain + key) to present to a
// server that asked for a certificate issued by one of acceptableCAs (the
// DER subjects of a TLS 1.3 CertificateRequest's certificate_authorities).
// When the leaf's issuer is among them the server holds that issuer, so the
// leaf alone is sent: the server parses and keeps one certificate per
// connection instead of two, and verifies one signature. Otherwise the whole
// chain is sent, which verifies against the root: this is what keeps a node
// working after the control plane replaced its intermediate.
func (id Identity) TLSCertificate(acceptableCAs [][]byte) tls.Certificate {
	chain := id.Chain
	if leaf := id.Leaf(); leaf != nil && len(chain) > 1 {
		for _, ca := range acceptableCAs {
			if bytes.Equal(ca, leaf.RawIssuer) {
				chain = chain[:1]
				break
			}
		}
	}
	return tls.Certificate{
		Certificate: certs.DER(chain),
		PrivateKey:  id.Key,
		Leaf:        id.Leaf(),
	}
}

// RootPool returns the roots as a pool.
func (id Identity) RootPool() *x509.CertPool {
	pool := x509.NewCertPool()
	for _, r := range id.Roots {
		pool.AddCert(r)
	}
	return pool
}

// CurrentPaths returns the paths of the current key, certificate chain and
// roots, through the current symlink, for users and docs (e.g.
// openssl verify -CAfile <ca> -untrusted <cert> <cert>).
func CurrentPaths(dir string) (key, cert, ca string) {
	cur := filepath.Join(dir, currentLink)
	return filepath.Join(cur, keyFile), filepath.Join(cur, certFile), filepath.Join(cur, caFile)
}

// Load reads the identity current points at. It returns ErrNotEnrolled when
// there is no current; any other error means the state directory is damaged
// and names the path at fault. It checks that the key matches the node
// certificate and that the certificate's SPIFFE ID is the recorded node's.
// An expired identity loads; callers check Expired.
func Load(dir string) (Identity, error) {
	for tries := 0; ; tries++ {
		name, err := readCurrent(dir)
		if err != nil {
			return Identity{}, err
		}
		id, err := loadGeneration(filepath.Join(dir, name))
		if err == nil {
			return id, nil
		}
		// A Save may have replaced current and removed the generation
		// while it was being read; read the new one.
		if tries < 2 && errors.Is(err, fs.ErrNotExist) {
			if again, aerr := readCurrent(dir); aerr == nil && again != name {
				continue
			}
		}
		return Identity{}, err
	}
}

// readCurrent returns the generation directory's name current points at.
func readCurrent(dir string) (string, error) {
	link := filepath.Join(dir, currentLink)
	target, err := os.Readlink(link)
	if errors.Is(err, fs.ErrNotExist) {
		return "", ErrNotEnrolled
	}
	if err != nil {
		return "", fmt.Errorf("load identity: %s should be a symlink to an %s* directory: %w", link, genPrefix, err)
	}
	if filepath.Base(target) != target || !strings.HasPrefix(target, genPrefix) {
		return "", fmt.Errorf("load identity: %s points at %q, want an %s* directory beside it", link, target, genPrefix)
	}
	return target, nil
}

func loadGeneration(gen string) (Identity, error) {
	read := func(name string) ([]byte, string, error) {
		p := filepath.Join(gen, name)
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, p, fmt.Errorf("load identity: %w", err)
		}
		return b, p, nil
	}

	b, p, err := read(infoFile)
	if err != nil {
		return Identity{}, err
	}
	var in info
	if err := json.Unmarshal(b, &in); err != nil {
		return Identity{}, fmt.Errorf("load identity: %s: %w", p, err)
	}
	id := Identity{
		NodeID:        in.NodeID,
		NodeName:      in.NodeName,
		SPIFFEID:      in.SPIFFEID,
		TrustDomain:   in.TrustDomain,
		ControlURL:    in.ControlURL,
		CAFingerprint: in.CAFingerprint,
		Labels:        in.Labels,
		EnrolledAt:    in.EnrolledAt,
	}

	if b, p, err = read(keyFile); err != nil {
		return Identity{}, err
	}
	if id.Key, err = certs.ParseKeyPEM(b); err != nil {
		return Identity{}, fmt.Errorf("load identity: %s: %w", p, err)
	}
	if b, p, err = read(certFile); err != nil {
		return Identity{}, err
	}
	if id.Chain, err = certs.ParseCertsPEM(b); err != nil {
		return Identity{}, fmt.Errorf("load identity: %s: %w", p, err)
	}
	if b, p, err = read(caFile); err != nil {
		return Identity{}, err
	}
	if id.Roots, err = certs.ParseCertsPEM(b); err != nil {
		return Identity{}, fmt.Errorf("load identity: %s: %w", p, err)
	}

	if err := id.check(); err != nil {
		return Identity{}, fmt.Errorf("load identity from %s: %w", gen, err)
	}
	return id, nil
}

// check is what makes an identity usable; Save and Load both apply it, so
// Save never writes what Load would refuse.
func (id Identity) check() error {
	if id.Key == nil {
		return errors.New("no private key")
	}
	leaf := id.Leaf()
	if leaf == nil {
		return errors.New("no node certificate")
	}
	if len(id.Roots) == 0 {
		return errors.New("no trusted roots")
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(&id.Key.PublicKey) {
		return fmt.Errorf("%s does not match the public key of the node certificate (serial %s) in %s", keyFile, certs.SerialHex(leaf), certFile)
	}
	if !certs.ValidTrustDomain(id.TrustDomain) {
		return fmt.Errorf("trust domain %q in %s is malformed", id.TrustDomain, infoFile)
	}
	nodeID, err := certs.NodeIDFromCert(id.TrustDomain, leaf)
	if err != nil {
		return fmt.Errorf("node certificate (serial %s): %w", certs.SerialHex(leaf), err)
	}
	if nodeID != id.NodeID {
		return fmt.Errorf("node certificate (serial %s) is for node %q, but %s says %q", certs.SerialHex(leaf), nodeID, infoFile, id.NodeID)
	}
	if want := certs.NodeSPIFFEID(id.TrustDomain, id.NodeID); id.SPIFFEID != want {
		return fmt.Errorf("SPIFFE ID %q in %s does not match the node certificate's %q", id.SPIFFEID, infoFile, want)
	}
	return nil
}

// Save makes id the current identity in dir, creating dir (mode 0700) if
// missing. It refuses an identity that Load would refuse. When Save returns
// nil the new identity is durable; when it fails, current still holds the old
// one (or nothing). Older generations are removed afterwards, best effort: a
// failure to remove one is retried by the next Save.
func Save(dir string, id Identity) error {
	if err := id.check(); err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	name, err := writeGeneration(dir, id)
	if err != nil {
		return err
	}
	if err := swapCurrent(dir, name); err != nil {
		return err
	}
	removeStale(dir, name)
	return nil
}

// writeGeneration writes id into a new generation directory in dir, durably,
// and returns its name. It does not touch current.
func writeGeneration(dir string, id Identity) (string, error) {
	name := genPrefix + certs.SerialHex(id.Leaf())
	if cur, err := os.Readlink(filepath.Join(dir, currentLink)); err == nil && cur == name {
		// Saving the certificate that is already current (new labels, say):
		// never write into the live generation.
		name += "-1"
	}
	gen := filepath.Join(dir, name)
	// A leftover from a Save that crashed before its swap.
	if err := os.RemoveAll(gen); err != nil {
		return "", fmt.Errorf("save identity: %w", err)
	}
	if err := os.Mkdir(gen, 0o700); err != nil {
		return "", fmt.Errorf("save identity: %w", err)
	}
	if err := os.Chmod(gen, 0o700); err != nil { // whatever the umask
		return "", fmt.Errorf("save identity: %w", err)
	}

	keyPEM, err := certs.EncodeKeyPEM(id.Key)
	if err != nil {
		return "", fmt.Errorf("save identity: %w", err)
	}
	infoJSON, err := json.MarshalIndent(info{
		NodeID:        id.NodeID,
		NodeName:      id.NodeName,
		SPIFFEID:      id.SPIFFEID,
		TrustDomain:   id.TrustDomain,
		ControlURL:    id.ControlURL,
		CAFingerprint: id.CAFingerprint,
		EnrolledAt:    id.EnrolledAt.UTC(),
		Labels:        id.Labels,
	}, "", "  ")
	if err != nil {
		return "", fmt.Errorf("save identity: %w", err)
	}
	files := []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{keyFile, keyPEM, 0o600},
		{certFile, certs.EncodeCertsPEM(id.Chain), 0o644},
		{caFile, certs.EncodeCertsPEM(id.Roots), 0o644},
		{infoFile, append(infoJSON, '\n'), 0o644},
	}
	for _, f := range files {
		if err := writeNew(filepath.Join(gen, f.name), f.data, f.perm); err != nil {
			return "", fmt.Errorf("save identity: %w", err)
		}
	}
	if err := atomicfile.SyncDir(gen); err != nil {
		return "", fmt.Errorf("save identity: %w", err)
	}
	// The new directory's entry in dir must be durable before current can
	// point at it.
	if err := atomicfile.SyncDir(dir); err != nil {
		return "", fmt.Errorf("save identity: %w", err)
	}
	return name, nil
}

// writeNew creates path, which must not exist, and fsyncs it.
func writeNew(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil { // whatever the umask
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// swapCurrent points current at the generation name: a temporary symlink
// renamed over current, then an fsync of dir.
func swapCurrent(dir, name string) error {
	tmp := filepath.Join(dir, tmpLinkPrefix+rand.Text())
	if err := os.Symlink(name, tmp); err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, currentLink)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save identity: %w", err)
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return fmt.Errorf("save identity: %w", err)
	}
	return nil
}

// removeStale removes every generation but keep, and leftover temporary
// symlinks. Errors are ignored: the next Save tries again, and Load never
// looks at these.
func removeStale(dir, keep string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		n := e.Name()
		switch {
		case n == keep:
		case strings.HasPrefix(n, genPrefix), strings.HasPrefix(n, tmpLinkPrefix):
			os.RemoveAll(filepath.Join(dir, n))
		}
	}
	atomicfile.SyncDir(dir)
}
