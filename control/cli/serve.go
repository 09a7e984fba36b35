package cli

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/internal/logging"
	"github.com/llorch/llorch/internal/version"
)

func newServeCmd() *cobra.Command {
	cfg := server.DefaultConfig()
	var logFormat, logLevel string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the control plane",
		Long: `Run the control plane on one TLS 1.3 port (Connect, gRPC and gRPC-web) and an
admin socket in the data directory. The first start creates the database and a
private CA in the data directory and prints the CA fingerprint that join tokens pin.

A non-loopback --listen needs LLORCH_API_TOKEN, so that API clients authenticate.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := logging.New(cmd.ErrOrStderr(), logFormat, logLevel)
			if err != nil {
				return err
			}
			cfg.Logger = logger
			cfg.APIToken = os.Getenv("LLORCH_API_TOKEN")
			cfg.TuneGC = tuneGC()
			cfg.Version = version.Version
			srv, err := server.New(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			defer srv.Close()
			out := cmd.OutOrStdout()
			if srv.CACreated() {
				fmt.Fprintf(out, "created a new CA in %s\n", cfg.DataDir)
			}
			fmt.Fprintf(out, "llorch control plane %s listening on %s\n", version.Version, srv.URL())
			fmt.Fprintf(out, "CA fingerprint: %s\n", srv.Fingerprint())
			fmt.Fprintf(out, "admin socket:   %s\n", server.SocketPath(cfg.DataDir))
			return srv.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.DataDir, "data", envOr("LLORCH_DATA", defaultDataDir()), "data directory: database, CA and admin socket [LLORCH_DATA]")
	f.StringVar(&cfg.Listen, "listen", envOr("LLORCH_LISTEN", server.DefaultListen), "address of the TLS port [LLORCH_LISTEN]")
	f.StringArrayVar(&cfg.SANs, "san", nil, "DNS name or IP the server certificate is valid for (repeatable; default: localhost, 127.0.0.1, ::1)")
	f.StringVar(&cfg.TrustDomain, "trust-domain", server.DefaultTrustDomain, "SPIFFE trust domain of node identities (fixed when the CA is created)")
	f.DurationVar(&cfg.NodeCertLifetime, "node-cert-lifetime", server.DefaultNodeCertLifetime, "lifetime of node certificates (5m to 720h)")
	addFleetFlags(f, &cfg)
	f.StringVar(&cfg.AdvertiseURL, "advertise-url", os.Getenv("LLORCH_ADVERTISE_URL"), "URL edges are told to dial (default: https://<listen>) [LLORCH_ADVERTISE_URL]")
	f.StringArrayVar(&cfg.CORSOrigins, "cors-origin", nil, "browser origin allowed to call the API (repeatable; default: none)")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

// tuneGC says whether the control plane may set the garbage collector's
// target: not when the operator set one with GOGC.
func tuneGC() bool { return os.Getenv("GOGC") == "" }

// addFleetFlags adds the liveness, pacing and limit flags serve and dev
// share (docs/ARCHITECTURE.md, "Limits").
func addFleetFlags(f *pflag.FlagSet, cfg *server.Config) {
	f.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", cfg.HeartbeatInterval, "heartbeat interval edges are told to use")
	f.DurationVar(&cfg.OfflineAfter, "offline-after", cfg.OfflineAfter, "a node silent this long is offline (at least twice the heartbeat interval)")
	f.Float64Var(&cfg.RegistrationRate, "registration-rate", cfg.RegistrationRate, "new edge sessions admitted per second; more are told when to retry (0: no pacing)")
	f.IntVar(&cfg.RegistrationBurst, "registration-burst", cfg.RegistrationBurst, "new edge sessions admitted at once before pacing starts")
	l := &cfg.Limits
	f.IntVar(&l.MaxConns, "max-conns", l.MaxConns, "connections on the public port, all told (lowered to the file limit minus a reserve)")
	f.IntVar(&l.MaxUnauthenticatedConns, "max-unauthenticated-conns", l.MaxUnauthenticatedConns, "connections in their TLS handshake or without a client certificate")
	f.IntVar(&l.MaxUnauthenticatedConnsPerAddr, "max-unauthenticated-conns-per-addr", l.MaxUnauthenticatedConnsPerAddr, "the same, per source address (IPv6: per /64)")
	f.DurationVar(&l.HandshakeTimeout, "handshake-timeout", l.HandshakeTimeout, "a new connection's TLS handshake must finish within this")
	f.DurationVar(&l.IdleTimeout, "idle-timeout", l.IdleTimeout, "close a connection without a client certificate after this long without a request")
	f.DurationVar(&l.BodyTimeout, "body-timeout", l.BodyTimeout, "a request body must arrive within this (edge sessions excepted); requests that need no credential must finish within it")
	f.Float64Var(&l.Enroll.Rate, "enroll-rate", l.Enroll.Rate, "enrollments per second per source address, after the burst (0: no limit)")
	f.IntVar(&l.Enroll.Burst, "enroll-burst", l.Enroll.Burst, "enrollments at once per source address (a batch of machines behind one NAT)")
	f.IntVar(&l.AuthFailures.Burst, "max-failed-credentials", l.AuthFailures.Burst, "refused API or join tokens per source address before the address is refused; one more is allowed every 6s (0: no limit)")
	f.DurationVar(&cfg.EventRetention, "event-retention", cfg.EventRetention, "delete events older than this")
	f.IntVar(&cfg.MaxEvents, "max-events", cfg.MaxEvents, "keep at most this many events, deleting the oldest")
}
