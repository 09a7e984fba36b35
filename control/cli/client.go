package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/internal/apitoken"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
	"github.com/llorch/llorch/internal/private"
)

// target says how admin commands reach a control plane: the local socket in
// a data directory, or a remote URL with an API token.
type target struct {
	dataDir       string
	server        string
	caFingerprint string
}

func (t *target) addFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&t.dataDir, "data", envOr("LLORCH_DATA", defaultDataDir()), "data directory of a local control plane (its admin socket) [LLORCH_DATA]")
	cmd.Flags().StringVar(&t.server, "server", os.Getenv("LLORCH_SERVER"), "URL of a remote control plane, used with LLORCH_API_TOKEN instead of the local socket [LLORCH_SERVER]")
	cmd.Flags().StringVar(&t.caFingerprint, "ca-fingerprint", os.Getenv("LLORCH_CA_FINGERPRINT"), "with --server: the CA fingerprint to trust, as `control ca show` prints it [LLORCH_CA_FINGERPRINT]")
}

// adminClient returns an AdminService client for the target.
func (t *target) adminClient() (llorchv1connect.AdminServiceClient, error) {
	if t.server == "" {
		sock := server.SocketPath(t.dataDir)
		if _, err := os.Stat(sock); err != nil {
			return nil, fmt.Errorf("no control plane is running with data directory %s (no socket %s): start one with `control serve --data %s`, or use --server", t.dataDir, sock, t.dataDir)
		}
		// Whoever owns the socket gets our commands and is believed: it
		// must be the control plane's, not one planted beside it.
		if err := private.Socket(sock); err != nil {
			return nil, err
		}
		hc := &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
			Protocols: unencryptedHTTP2(),
		}}
		return llorchv1connect.NewAdminServiceClient(hc, "http://control.sock", connect.WithGRPC()), nil
	}
	u, err := url.Parse(t.server)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("--server %q: must be https://host:port", t.server)
	}
	if !certs.ValidFingerprint(t.caFingerprint) {
		return nil, errors.New("--server needs --ca-fingerprint sha256:<64 hex> (LLORCH_CA_FINGERPRINT), as `control ca show` prints it on the server")
	}
	token := os.Getenv("LLORCH_API_TOKEN")
	if token == "" {
		return nil, errors.New("--server needs an API token in LLORCH_API_TOKEN")
	}
	tlsCfg := certs.PinnedTLSConfig(t.caFingerprint, u.Hostname())
	// No deadline on the whole call: `node events --follow` streams for as
	// long as it runs. A control plane that does not answer is caught by
	// the dial, handshake and response-header timeouts.
	hc := &http.Client{Transport: &http.Transport{
		TLSClientConfig:       tlsCfg,
		ForceAttemptHTTP2:     true,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
	}}
	return llorchv1connect.NewAdminServiceClient(hc, t.server, connect.WithInterceptors(apitoken.Interceptor(token))), nil
}

func unencryptedHTTP2() *http.Protocols {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &p
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
