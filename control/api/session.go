package api

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/control/registry"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/refusal"
)

// RegisterTimeout bounds the wait for an edge's first message.
const RegisterTimeout = 30 * time.Second

type received struct {
	msg *llorchv1.ConnectRequest
	err error
}

// Connect holds one edge's session: a Register first, then heartbeats, each
// acknowledged, while commands flow the other way. Only this goroutine sends
// on the stream.
func (s *Server) Connect(ctx context.Context, stream *connect.BidiStream[llorchv1.ConnectRequest, llorchv1.ConnectResponse]) error {
	c, err := s.nodeCaller(ctx)
	if err != nil {
		return err
	}
	if ok, wait := s.cfg.Registry.Admit(); !ok {
		cerr := connect.NewError(connect.CodeUnavailable, fmt.Errorf("too many sessions registering at once; retry in %s", wait.Round(time.Millisecond)))
		cerr.Meta().Set(refusal.RetryAfterHeader, strconv.FormatInt(wait.Milliseconds(), 10))
		return cerr
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	msgs := make(chan received, 1)
	go func() {
		for {
			m, err := stream.Receive()
			select {
			case msgs <- received{m, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()

	var first received
	select {
	case first = <-msgs:
	case <-time.After(RegisterTimeout):
		return connect.NewError(connect.CodeDeadlineExceeded, errors.New("no Register message within 30s"))
	}
	if first.err != nil {
		return nil
	}
	reg := first.msg.GetRegister()
	if reg == nil {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("the first message of a session must be Register"))
	}
	sess, registered, err := s.cfg.Registry.Connect(ctx, c.NodeID, reg.GetSystem(), reg.GetStatus())
	if err != nil {
		return s.fail(ctx, err)
	}
	s.log.InfoContext(ctx, "session opened", "node_id", c.NodeID, "hostname", reg.GetSystem().GetHostname(), "agent_version", reg.GetSystem().GetAgentVersion())
	if err := stream.Send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_Registered{Registered: registered}}); err != nil {
		sess.Close(false, "session lost: "+err.Error())
		return nil
	}
	interval := registered.GetHeartbeatInterval()
	for {
		select {
		case r := <-msgs:
			if r.err != nil {
				sess.Close(false, "session lost: "+lostReason(r.err))
				return nil
			}
			switch m := r.msg.GetMessage().(type) {
			case *llorchv1.ConnectRequest_Heartbeat:
				if err := sess.Heartbeat(m.Heartbeat.GetStatus()); err != nil {
					return connect.NewError(connect.CodeAborted, err)
				}
				ack := &llorchv1.HeartbeatAck{Seq: m.Heartbeat.GetSeq(), HeartbeatInterval: interval}
				if err := stream.Send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_HeartbeatAck{HeartbeatAck: ack}}); err != nil {
					sess.Close(false, "session lost: "+lostReason(err))
					return nil
				}
			case *llorchv1.ConnectRequest_Goodbye:
				reason := m.Goodbye.GetReason()
				if reason == "" {
					reason = "shutdown"
				}
				sess.Close(true, reason)
				s.log.InfoContext(ctx, "session closed by the edge", "node_id", c.NodeID, "reason", reason)
				return nil
			default:
				sess.Close(false, "protocol error")
				return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("unexpected message %T after Register", m))
			}
		case cmd := <-sess.Commands():
			if err := stream.Send(&llorchv1.ConnectResponse{Message: &llorchv1.ConnectResponse_Command{Command: cmd}}); err != nil {
				sess.Close(false, "session lost: "+lostReason(err))
				return nil
			}
			if cmd.GetKind() == llorchv1.CommandKind_COMMAND_KIND_DISCONNECT {
				sess.Close(false, "disconnected by the control plane: "+cmd.GetReason())
				return nil
			}
		case <-sess.Context().Done():
			if ctx.Err() != nil {
				sess.Close(false, "session lost: connection closed")
				return nil
			}
			sess.Close(false, "session ended by the control plane")
			return connect.NewError(connect.CodeAborted, registry.ErrSessionReplaced)
		}
	}
}

func lostReason(err error) string {
	if connect.CodeOf(err) == connect.CodeCanceled || errors.Is(err, context.Canceled) {
		return "connection closed"
	}
	return err.Error()
}
