package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"time"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/adminclient"
	"github.com/llorch/llorch/control/pki"
	"github.com/llorch/llorch/control/registry"
	"github.com/llorch/llorch/internal/clock"
)

// Defaults.
const (
	DefaultListen           = "127.0.0.1:8443"
	DefaultTrustDomain      = "llorch.local"
	DefaultNodeCertLifetime = pki.DefaultNodeCertLifetime
)

// Config configures the control plane.
type Config struct {
	// DataDir holds llorch.db, the CA under ca/, and the admin socket.
	DataDir string
	// Listen is the public TLS port's address.
	Listen string
	// SANs are the server certificate's names and IPs; empty: loopback names.
	SANs        []string
	TrustDomain string
	// NodeCertLifetime is how long node certificates last; 0: 24h.
	NodeCertLifetime time.Duration
	// HeartbeatInterval is what edges are told; 0: 10s.
	HeartbeatInterval time.Duration
	// OfflineAfter is how long a node may be silent before it is offline; 0: 30s.
	OfflineAfter time.Duration
	// RegistrationRate and RegistrationBurst pace new sessions (per second,
	// and at once); refused edges get a retry hint. Zero rate: no pacing.
	RegistrationRate  float64
	RegistrationBurst int
	// AdvertiseURL is the URL edges are told to use; empty: https://<Listen>
	// when Listen names a host, else the URL the edge enrolled with.
	AdvertiseURL string
	// APIToken is the admin bearer token; empty: admin only over the socket.
	APIToken string
	// CORSOrigins are the browser origins allowed to call the API; empty: none.
	CORSOrigins []string
	// RegisterTimeout is how long a new edge session may take to send its
	// Register message before it is cut off; 0: 30s.
	RegisterTimeout time.Duration
	// Limits bound what callers can make the control plane hold and do
	// (connections, rate limits, timeouts); DefaultConfig sets DefaultLimits.
	Limits Limits
	// EventRetention and MaxEvents bound the event log: events older than
	// the retention, and the oldest beyond the count, are deleted
	// (DefaultEventRetention, DefaultMaxEvents when zero).
	EventRetention time.Duration
	MaxEvents      int
	// TuneGC lets the control plane set the garbage collector's target: lean
	// while the fleet is steady, Go's default while edges connect in numbers
	// (gc.go). The target is the whole process's, so the commands set this
	// and tests do not; the commands leave it off when GOGC is set.
	TuneGC  bool
	Version string
	Clock   clock.Clock  // nil: the wall clock
	Logger  *slog.Logger // nil: discard
}

// DefaultConfig returns a Config with every default filled in except DataDir.
func DefaultConfig() Config {
	return Config{
		Listen:            DefaultListen,
		TrustDomain:       DefaultTrustDomain,
		NodeCertLifetime:  DefaultNodeCertLifetime,
		HeartbeatInterval: registry.DefaultHeartbeatInterval,
		OfflineAfter:      registry.DefaultOfflineAfter,
		RegistrationRate:  registry.DefaultRegistrationRate,
		RegistrationBurst: registry.DefaultRegistrationBurst,
		Limits:            DefaultLimits(),
		EventRetention:    DefaultEventRetention,
		MaxEvents:         DefaultMaxEvents,
	}
}

// SocketPath is where the admin socket of a data directory lives.
func SocketPath(dataDir string) string { return adminclient.SocketPath(dataDir) }

// Validate checks the configuration and names the bad field.
func (c Config) Validate() error {
	if c.DataDir == "" {
		return errors.New("data directory is required (--data or LLORCH_DATA)")
	}
	host, _, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return fmt.Errorf("listen address %q: %w", c.Listen, err)
	}
	if !isLoopback(host) && c.APIToken == "" {
		return fmt.Errorf("listen address %q is not loopback: set LLORCH_API_TOKEN so API clients must authenticate, or listen on 127.0.0.1", c.Listen)
	}
	if !certs.ValidTrustDomain(c.TrustDomain) {
		return fmt.Errorf("trust domain %q: use lowercase letters, digits, '.', '-' and '_'", c.TrustDomain)
	}
	if l := c.NodeCertLifetime; l != 0 && (l < pki.MinNodeCertLifetime || l > pki.MaxNodeCertLifetime) {
		return fmt.Errorf("node certificate lifetime %s: must be between %s and %s", l, pki.MinNodeCertLifetime, pki.MaxNodeCertLifetime)
	}
	if err := (registry.Config{HeartbeatInterval: c.HeartbeatInterval, OfflineAfter: c.OfflineAfter}).Validate(); err != nil {
		return err
	}
	if c.RegistrationRate < 0 || c.RegistrationBurst < 0 {
		return errors.New("registration rate and burst must not be negative")
	}
	if err := c.Limits.Validate(); err != nil {
		return err
	}
	if c.EventRetention < 0 || c.MaxEvents < 0 {
		return errors.New("event retention and the maximum number of events must not be negative")
	}
	if c.APIToken != "" {
		if err := CheckAPIToken(c.APIToken); err != nil {
			return err
		}
	}
	if c.AdvertiseURL != "" {
		u, err := url.Parse(c.AdvertiseURL)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return fmt.Errorf("advertise URL %q: must be https://host[:port]", c.AdvertiseURL)
		}
	}
	for _, o := range c.CORSOrigins {
		u, err := url.Parse(o)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.Path != "" {
			return fmt.Errorf("CORS origin %q: must be scheme://host[:port], e.g. https://console.example.com", o)
		}
	}
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// advertiseURL is the URL edges are told to dial.
func (c Config) advertiseURL(bound net.Addr) string {
	if c.AdvertiseURL != "" {
		return c.AdvertiseURL
	}
	host, _, _ := net.SplitHostPort(c.Listen)
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return ""
	}
	_, port, _ := net.SplitHostPort(bound.String())
	return "https://" + net.JoinHostPort(host, port)
}
