package server_test

import (
	"context"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/control/server/servertest"
	"github.com/llorch/llorch/edge/client"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

// BenchmarkSessionHeartbeats measures heartbeat handling end to end, in
// process: real edges' sessions over mTLS (HTTP/2 bidi streams), each
// heartbeat decoded, recorded in the registry and acknowledged. It reports
// heartbeats/s and the store writes per heartbeat (0: liveness is in memory).
func BenchmarkSessionHeartbeats(b *testing.B) {
	srv := servertest.Start(b, nil)
	const edges = 32
	streams := make(chan *connect.BidiStreamForClient[llorchv1.ConnectRequest, llorchv1.ConnectResponse], edges)
	report := &llorchv1.NodeStatusReport{
		GpuInventory: &llorchv1.GpuInventory{Gpus: []*llorchv1.Gpu{{Index: 0, Uuid: "GPU-0", Name: "NVIDIA A100", MemoryTotalBytes: 40 << 30}}},
		Pools:        []*llorchv1.Pool{{Id: "pool-a", Engine: "llamacpp", SlotsTotal: 4, SlotsFree: 4, Ready: true}},
	}
	for range edges {
		res, _, err := enrollEdge(b, srv, srv.Token(b, nil))
		if err != nil {
			b.Fatal(err)
		}
		sessions := llorchv1connect.NewSessionServiceClient(client.HTTPClient(client.NewIdentity(res.Identity)), srv.URL())
		stream := sessions.Connect(context.Background())
		b.Cleanup(func() { stream.CloseRequest(); stream.CloseResponse() })
		if err := stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Register{Register: &llorchv1.Register{Status: report}}}); err != nil {
			b.Fatal(err)
		}
		if _, err := stream.Receive(); err != nil {
			b.Fatal(err)
		}
		streams <- stream
	}
	writes := func() int64 {
		n, _ := srv.Store().ListEvents(context.Background(), "", 10000)
		return int64(len(n))
	}
	before := writes()
	var seq atomic.Uint64
	b.SetParallelism(edges / 2)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		stream := <-streams
		defer func() { streams <- stream }()
		for pb.Next() {
			hb := &llorchv1.Heartbeat{Seq: seq.Add(1), Status: report}
			if err := stream.Send(&llorchv1.ConnectRequest{Message: &llorchv1.ConnectRequest_Heartbeat{Heartbeat: hb}}); err != nil {
				b.Error(err)
				return
			}
			if _, err := stream.Receive(); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "heartbeats/s")
	b.ReportMetric(float64(writes()-before)/float64(b.N), "events/heartbeat")
}
