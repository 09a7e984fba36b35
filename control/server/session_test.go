package server_test

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/control/server/servertest"
	"github.com/llorch/llorch/edge/client"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

type rawSession = connect.BidiStreamForClient[llorchv1.ConnectRequest, llorchv1.ConnectResponse]

// rawNode enrolls a node and returns its identity, for sessions driven by
// hand rather than by the agent.
func rawNode(tb testing.TB, srv *servertest.Server) state.Identity {
	tb.Helper()
	res, _, err := enrollEdge(tb, srv, srv.Token(tb, &llorchv1.CreateJoinTokenRequest{Name: "raw"}))
	if err != nil {
		tb.Fatal(err)
	}
	return res.Identity
}

// openSession opens a session stream as the node, each on its own connection.
func openSession(tb testing.TB, id state.Identity) *rawSession {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	stream := llorchv1connect.NewSessionServiceClient(client.HTTPClient(client.NewIdentity(id)), id.ControlURL).Connect(ctx)
	tb.Cleanup(func() { stream.CloseRequest(); stream.CloseResponse() })
	return stream
}

func register(tb testing.TB, stream *rawSession) *llorchv1.Registered {
	tb.Helper()
	if err := stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: &llorchv1.Register{System: &llorchv1.NodeSystem{Hostname: "raw"}}}}); err != nil {
		tb.Fatalf("send Register: %v", err)
	}
	msg, err := stream.Receive()
	if err != nil {
		tb.Fatalf("receive Registered: %v", err)
	}
	reg := msg.GetRegistered()
	if reg == nil {
		tb.Fatalf("first message %v, want Registered", msg)
	}
	return reg
}

// receiveErr receives until the stream ends and returns how it ended.
func receiveErr(tb testing.TB, stream *rawSession) error {
	tb.Helper()
	done := make(chan error, 1)
	go func() {
		for {
			if _, err := stream.Receive(); err != nil {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		tb.Fatal("the session did not end")
		return nil
	}
}

func TestSessionProtocol(t *testing.T) {
	t.Run("first message must be Register", func(t *testing.T) {
		srv := servertest.Start(t, fastFleet)
		stream := openSession(t, rawNode(t, srv))
		if err := stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Heartbeat{Heartbeat: &llorchv1.Heartbeat{Seq: 1}}}); err != nil {
			t.Fatal(err)
		}
		if err := receiveErr(t, stream); connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Fatalf("heartbeat before Register: %v, want invalid argument", err)
		}
	})
	t.Run("silent session is cut off", func(t *testing.T) {
		srv := servertest.Start(t, func(c *server.Config) { fastFleet(c); c.RegisterTimeout = 300 * time.Millisecond })
		stream := openSession(t, rawNode(t, srv))
		stream.Send(nil) // opens the stream with no message
		err := receiveErr(t, stream)
		if connect.CodeOf(err) != connect.CodeDeadlineExceeded || !strings.Contains(err.Error(), "no Register message within 300ms") {
			t.Fatalf("a session that never registered: %v, want deadline exceeded", err)
		}
	})
	t.Run("commands follow Registered, acks follow heartbeats", func(t *testing.T) {
		srv := servertest.Start(t, fastFleet)
		id := rawNode(t, srv)
		stream := openSession(t, id)
		if reg := register(t, stream); reg.GetNodeId() != id.NodeID || reg.GetHeartbeatInterval().AsDuration() != testInterval {
			t.Fatalf("Registered %v", reg)
		}
		if _, err := srv.Admin.DrainNode(context.Background(), connect.NewRequest(&llorchv1.DrainNodeRequest{Id: id.NodeID, Reason: "maintenance"})); err != nil {
			t.Fatal(err)
		}
		msg, err := stream.Receive()
		if err != nil || msg.GetCommand().GetKind() != llorchv1.CommandKind_COMMAND_KIND_DRAIN {
			t.Fatalf("after drain: %v, %v; want a DRAIN command", msg, err)
		}
		if err := stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Heartbeat{Heartbeat: &llorchv1.Heartbeat{Seq: 7}}}); err != nil {
			t.Fatal(err)
		}
		msg, err = stream.Receive()
		if err != nil || msg.GetHeartbeatAck().GetSeq() != 7 {
			t.Fatalf("after heartbeat 7: %v, %v; want its ack", msg, err)
		}
	})
	t.Run("newest session wins", func(t *testing.T) {
		srv := servertest.Start(t, fastFleet)
		id := rawNode(t, srv)
		old := openSession(t, id)
		register(t, old)
		cur := openSession(t, id)
		register(t, cur)
		if err := receiveErr(t, old); connect.CodeOf(err) != connect.CodeAborted || !strings.Contains(err.Error(), "replaced") {
			t.Fatalf("the replaced session ended with %v, want aborted: replaced", err)
		}
		waitNode(t, srv, id.NodeID, 5*time.Second, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	})
	t.Run("removal says why, then ends the session", func(t *testing.T) {
		srv := servertest.Start(t, fastFleet)
		id := rawNode(t, srv)
		stream := openSession(t, id)
		register(t, stream)
		if _, err := srv.Admin.RemoveNode(context.Background(), connect.NewRequest(&llorchv1.RemoveNodeRequest{Id: id.NodeID, Reason: "stolen"})); err != nil {
			t.Fatal(err)
		}
		msg, err := stream.Receive()
		if err != nil || msg.GetCommand().GetKind() != llorchv1.CommandKind_COMMAND_KIND_DISCONNECT || msg.GetCommand().GetReason() != "node removed: stolen" {
			t.Fatalf("after removal: %v, %v; want DISCONNECT", msg, err)
		}
		if err := receiveErr(t, stream); !errors.Is(err, io.EOF) {
			t.Fatalf("after DISCONNECT the stream ended with %v, want its end", err)
		}
	})
}
