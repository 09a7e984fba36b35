package pki

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/internal/atomicfile"
	"github.com/llorch/llorch/internal/private"
)

// The files in Config.Dir. A certificate is written after its key, so a
// certificate file that exists always has its key beside it.
const (
	rootCertFile  = "root.crt"
	rootKeyFile   = "root.key"
	interCertFile = "intermediate.crt"
	interKeyFile  = "intermediate.key"
	serverCrtFile = "server.crt" // leaf + intermediate
	serverKeyFile = "server.key"
)

const (
	rootYears         = 10
	intermediateYears = 2
	serverLifetime    = 90 * 24 * time.Hour
	// backdate is how far NotBefore is set in the past, for clock skew.
	backdate = time.Minute
	// rootCNPrefix starts the root's common name; the trust domain follows.
	rootCNPrefix = "llorch root CA "
)

func rootCN(td string) string         { return rootCNPrefix + td }
func intermediateCN(td string) string { return "llorch intermediate CA " + td }
func serverCN(td string) string       { return "llorch control plane " + td }

// intermediateSubject names an intermediate by its key as well as its trust
// domain. The public port lists the intermediate's subject among the CAs it
// accepts, and an edge whose certificate names that subject as its issuer
// presents its leaf alone (state.Identity.TLSCertificate); so a replaced
// intermediate must never share the subject of the one before it.
func intermediateSubject(td string, pub *ecdsa.PublicKey) pkix.Name {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		panic(err) // a P-256 key always marshals
	}
	sum := sha256.Sum256(der)
	return pkix.Name{CommonName: intermediateCN(td), SerialNumber: hex.EncodeToString(sum[:8])}
}

// loadOrCreate fills in the root, the intermediate and the server
// certificate, creating or replacing what is missing or due.
func (a *Authority) loadOrCreate(ctx context.Context) error {
	dir := a.cfg.Dir
	if _, err := private.Dir(dir, false); err != nil {
		return err
	}
	for _, f := range []string{rootKeyFile, interKeyFile, serverKeyFile, ticketKeysFile} {
		if err := private.File(filepath.Join(dir, f)); err != nil {
			return err
		}
	}
	now := a.cfg.Clock.Now()
	log := a.cfg.Logger

	// Root.
	root, rootKey, err := loadPair(dir, rootCertFile, rootKeyFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		root, rootKey, err = a.createRoot(now)
		if err != nil {
			return err
		}
		a.created = true
		log.InfoContext(ctx, "created root CA", "fingerprint", certs.Fingerprint(root), "not_after", root.NotAfter)
	case err != nil:
		return fmt.Errorf("load root: %w", err)
	default:
		td, ok := strings.CutPrefix(root.Subject.CommonName, rootCNPrefix)
		if !ok {
			return fmt.Errorf("%s is not a llorch root (subject %q)", rootCertFile, root.Subject.CommonName)
		}
		if td != a.cfg.TrustDomain {
			return &TrustDomainMismatchError{Dir: dir, Stored: td, Config: a.cfg.TrustDomain}
		}
		if !now.Before(root.NotAfter) {
			return fmt.Errorf("root certificate expired at %s; move %s aside to create a new CA (every node must then re-enroll)",
				root.NotAfter.Format(time.RFC3339), dir)
		}
	}
	a.root = root

	// Intermediate.
	inter, interKey, err := loadPair(dir, interCertFile, interKeyFile)
	reason := ""
	switch {
	case a.created:
		reason = "new root"
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, errNoKey):
		// Certificates issued under a lost intermediate still verify: they
		// carry it in their chain.
		reason = "missing"
	case errors.Is(err, errKeyMismatch):
		reason = "key does not match certificate"
	case err != nil:
		return fmt.Errorf("load intermediate: %w", err)
	case inter.CheckSignatureFrom(root) != nil:
		return fmt.Errorf("%s is not signed by %s", interCertFile, rootCertFile)
	case dueForRenewal(inter, now):
		reason = "less than a third of its lifetime left"
	case inter.Subject.SerialNumber == "":
		// Made before intermediates were named by their key: one made to
		// replace a lost one would share its subject.
		reason = "subject does not name its key"
	}
	interChanged := reason != ""
	if interChanged {
		inter, interKey, err = a.createIntermediate(now, root, rootKey)
		if err != nil {
			return err
		}
		log.InfoContext(ctx, "issued intermediate CA", "reason", reason,
			"serial", certs.SerialHex(inter), "not_after", inter.NotAfter)
	}
	a.inter, a.interKey = inter, interKey

	// Server certificate.
	leaf, leafKey, err := loadPair(dir, serverCrtFile, serverKeyFile)
	reason = ""
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, errNoKey):
		reason = "missing"
	case errors.Is(err, errKeyMismatch):
		reason = "key does not match certificate"
	case err != nil:
		// The server certificate is ours to replace.
		reason = "unreadable: " + err.Error()
	case interChanged || leaf.CheckSignatureFrom(inter) != nil:
		reason = "intermediate changed"
	case !sameSANs(leaf, a.cfg.SANs):
		reason = "names changed"
	case dueForRenewal(leaf, now):
		reason = "less than a third of its lifetime left"
	}
	if reason != "" {
		return a.renewServer(ctx, now, reason)
	}
	a.server.Store(a.serverTLS(leaf, leafKey))
	return nil
}

var errKeyMismatch = errors.New("key does not match certificate")

// loadPair reads a certificate and its key. It returns an error wrapping
// fs.ErrNotExist when the certificate file is missing (the key alone is a
// leftover of an interrupted write), errKeyMismatch when they do not belong
// together.
func loadPair(dir, certFile, keyFile string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, certFile))
	if err != nil {
		return nil, nil, err
	}
	chain, err := certs.ParseCertsPEM(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", certFile, err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, keyFile))
	if err != nil {
		// A certificate without its key is damage, not a fresh start.
		// (Not wrapping err: its fs.ErrNotExist must not read as "no CA".)
		return nil, nil, fmt.Errorf("%s exists but its key cannot be read: %w: %v", certFile, errNoKey, err)
	}
	key, err := certs.ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", keyFile, err)
	}
	if !key.PublicKey.Equal(chain[0].PublicKey) {
		return nil, nil, fmt.Errorf("%s and %s: %w", certFile, keyFile, errKeyMismatch)
	}
	return chain[0], key, nil
}

// errNoKey marks a missing key so it is not taken for a missing certificate.
var errNoKey = errors.New("key missing")

// dueForRenewal reports whether less than a third of cert's lifetime is left.
func dueForRenewal(cert *x509.Certificate, now time.Time) bool {
	total := cert.NotAfter.Sub(cert.NotBefore)
	return cert.NotAfter.Sub(now) < total/3
}

// sameSANs reports whether cert names exactly sans (in any order).
func sameSANs(cert *x509.Certificate, sans []string) bool {
	var have []string
	for _, d := range cert.DNSNames {
		have = append(have, strings.ToLower(d))
	}
	for _, ip := range cert.IPAddresses {
		have = append(have, ip.String())
	}
	return slices.Equal(normalizeSANs(have), normalizeSANs(sans))
}

func normalizeSANs(sans []string) []string {
	out := make([]string, 0, len(sans))
	for _, s := range sans {
		if ip := net.ParseIP(s); ip != nil {
			out = append(out, ip.String())
		} else {
			out = append(out, strings.ToLower(s))
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (a *Authority) createRoot(now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate root key: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: rootCN(a.cfg.TrustDomain)},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.AddDate(rootYears, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	cert, err := createCert(tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create root: %w", err)
	}
	if err := a.writePair(rootCertFile, rootKeyFile, []*x509.Certificate{cert}, key); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

func (a *Authority) createIntermediate(now time.Time, root *x509.Certificate, rootKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate intermediate key: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:               intermediateSubject(a.cfg.TrustDomain, &key.PublicKey),
		NotBefore:             now.Add(-backdate),
		NotAfter:              minTime(now.AddDate(intermediateYears, 0, 0), root.NotAfter),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	cert, err := createCert(tmpl, root, &key.PublicKey, rootKey)
	if err != nil {
		return nil, nil, fmt.Errorf("create intermediate: %w", err)
	}
	if err := a.writePair(interCertFile, interKeyFile, []*x509.Certificate{cert}, key); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// issueServer makes and stores a new server certificate for the configured
// SANs, signed by the intermediate.
func (a *Authority) issueServer(now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate server key: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: serverCN(a.cfg.TrustDomain)},
		NotBefore:   now.Add(-backdate),
		NotAfter:    minTime(now.Add(serverLifetime), a.inter.NotAfter),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, s := range a.cfg.SANs {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	cert, err := createCert(tmpl, a.inter, &key.PublicKey, a.interKey)
	if err != nil {
		return nil, nil, fmt.Errorf("create server certificate: %w", err)
	}
	if err := a.writePair(serverCrtFile, serverKeyFile, []*x509.Certificate{cert, a.inter}, key); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

func createCert(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, signer *ecdsa.PrivateKey) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// writePair writes the key (0600), then the certificates (0644).
func (a *Authority) writePair(certFile, keyFile string, chain []*x509.Certificate, key *ecdsa.PrivateKey) error {
	keyPEM, err := certs.EncodeKeyPEM(key)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(a.cfg.Dir, keyFile), keyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(a.cfg.Dir, certFile), certs.EncodeCertsPEM(chain), 0o644)
}
