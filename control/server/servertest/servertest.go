// Package servertest starts real control planes for tests: a temporary data
// directory, real SQLite, the real CA and TLS on a loopback port.
package servertest

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llorch/llorch/control/adminclient"
	"github.com/llorch/llorch/control/server"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

// Server is a running control plane and an admin client on its socket.
type Server struct {
	*server.Server
	Config server.Config
	Admin  llorchv1connect.AdminServiceClient
	stop   func()
}

// Stop shuts the control plane down gracefully (as SIGTERM does); the test's
// cleanup does it otherwise. Stopping twice is fine.
func (s *Server) Stop() { s.stop() }

// Start runs a control plane until the test ends. edit, if not nil, changes
// the configuration first (DataDir and Listen are already set).
func Start(tb testing.TB, edit func(*server.Config)) *Server {
	tb.Helper()
	cfg := server.DefaultConfig()
	cfg.DataDir = filepath.Join(tb.TempDir(), "data") // made 0700 by the server, as a new one is
	cfg.Listen = "127.0.0.1:0"
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{tb}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if edit != nil {
		edit(&cfg)
	}
	return StartConfig(tb, cfg)
}

// StartConfig runs a control plane with exactly cfg until the test ends.
func StartConfig(tb testing.TB, cfg server.Config) *Server {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := server.New(ctx, cfg)
	if err != nil {
		cancel()
		tb.Fatalf("start control plane: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
				tb.Errorf("control plane: %v", err)
			}
			srv.Close()
		})
	}
	tb.Cleanup(stop)
	return &Server{Server: srv, Config: cfg, Admin: llorchv1connect.NewAdminServiceClient(adminclient.SocketHTTP(cfg.DataDir), adminclient.SocketURL, connect.WithGRPC()), stop: stop}
}

// Token creates a join token and returns its string.
func (s *Server) Token(tb testing.TB, req *llorchv1.CreateJoinTokenRequest) string {
	tb.Helper()
	if req == nil {
		req = &llorchv1.CreateJoinTokenRequest{}
	}
	if req.Ttl == nil {
		req.Ttl = durationpb.New(time.Hour)
	}
	resp, err := s.Admin.CreateJoinToken(context.Background(), connect.NewRequest(req))
	if err != nil {
		tb.Fatalf("create token: %v", err)
	}
	return resp.Msg.GetToken()
}

type testWriter struct{ tb testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.tb.Log(string(p))
	return len(p), nil
}
