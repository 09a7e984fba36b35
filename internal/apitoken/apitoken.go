// Package apitoken sends an API token as a bearer token on every call a
// Connect client makes, unary and streaming.
package apitoken

import (
	"context"
	"net/http"

	"connectrpc.com/connect"
)

// Interceptor adds "Authorization: Bearer <token>" to every request.
func Interceptor(token string) connect.Interceptor { return interceptor(token) }

type interceptor string

func (t interceptor) set(h http.Header) { h.Set("Authorization", "Bearer "+string(t)) }

func (t interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		t.set(req.Header())
		return next(ctx, req)
	}
}

func (t interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		t.set(conn.RequestHeader())
		return conn
	}
}

func (t interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
