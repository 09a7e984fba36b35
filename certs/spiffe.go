package certs

import (
	"crypto/x509"
	"errors"
	"fmt"
	"regexp"
	"strings"
)

var (
	trustDomainRE = regexp.MustCompile(`^[a-z0-9._-]{1,255}$`)
	nodeIDRE      = regexp.MustCompile(`^[a-z0-9-]{1,64}$`)
)

// ValidTrustDomain reports whether s can be a SPIFFE trust domain name.
func ValidTrustDomain(s string) bool { return trustDomainRE.MatchString(s) }

// NodeSPIFFEID is the SPIFFE ID a node's certificate carries:
// spiffe://<trust domain>/node/<node ID>.
func NodeSPIFFEID(trustDomain, nodeID string) string {
	return "spiffe://" + trustDomain + "/node/" + nodeID
}

// NodeIDFromCert returns the node ID in cert's one SPIFFE URI SAN, which must
// belong to trustDomain.
func NodeIDFromCert(trustDomain string, cert *x509.Certificate) (string, error) {
	if len(cert.URIs) != 1 {
		return "", fmt.Errorf("certificate has %d URI SANs, want exactly one SPIFFE ID", len(cert.URIs))
	}
	return NodeIDFromSPIFFEID(trustDomain, cert.URIs[0].String())
}

// NodeIDFromSPIFFEID parses spiffe://<trustDomain>/node/<id>.
func NodeIDFromSPIFFEID(trustDomain, id string) (string, error) {
	rest, ok := strings.CutPrefix(id, "spiffe://"+trustDomain+"/node/")
	if !ok {
		return "", fmt.Errorf("SPIFFE ID %q is not a node of trust domain %q", id, trustDomain)
	}
	if !nodeIDRE.MatchString(rest) {
		return "", errors.New("SPIFFE ID has a malformed node ID")
	}
	return rest, nil
}
