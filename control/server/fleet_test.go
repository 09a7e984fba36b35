package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/llorch/llorch/certs"
	"github.com/llorch/llorch/control/adminclient"
	"github.com/llorch/llorch/control/server"
	"github.com/llorch/llorch/control/server/servertest"
	"github.com/llorch/llorch/edge/agent"
	"github.com/llorch/llorch/edge/gpu"
	"github.com/llorch/llorch/edge/state"
	llorchv1 "github.com/llorch/llorch/internal/gen/llorch/v1"
	"github.com/llorch/llorch/internal/gen/llorch/v1/llorchv1connect"
)

func certsSerial(id state.Identity) string { return certs.SerialHex(id.Leaf()) }

const (
	testInterval = 200 * time.Millisecond
	testOffline  = 600 * time.Millisecond
)

func fastFleet(c *server.Config) { c.HeartbeatInterval, c.OfflineAfter = testInterval, testOffline }

// fakeGPUs is a hand-written gpu.Source.
type fakeGPUs struct{ inv gpu.Inventory }

func (f fakeGPUs) Inventory(context.Context) gpu.Inventory { return f.inv }
func (f fakeGPUs) Close() error                            { return nil }

var twoGPUs = fakeGPUs{gpu.Inventory{DriverVersion: "550.54.15", CUDAVersion: "12.4", Devices: []gpu.Device{
	{Index: 0, UUID: "GPU-0", Name: "NVIDIA L4", MemoryTotalBytes: 24 << 30},
	{Index: 1, UUID: "GPU-1", Name: "NVIDIA L4", MemoryTotalBytes: 24 << 30},
}}}

type fleetEdge struct {
	id      string
	dir     string
	engines string
	url     string // where its agent dials
	gpus    gpu.Source
	cancel  context.CancelFunc
	done    chan error
}

// newEdge enrolls an edge; via, if not empty, is the URL its agent dials
// (a proxy in front of the control plane).
func newEdge(tb testing.TB, srv *servertest.Server, name string, gpus gpu.Source, via string) *fleetEdge {
	tb.Helper()
	res, dir, err := enrollEdge(tb, srv, srv.Token(tb, &llorchv1.CreateJoinTokenRequest{Name: name}))
	if err != nil {
		tb.Fatal(err)
	}
	e := &fleetEdge{id: res.Identity.NodeID, dir: dir, engines: filepath.Join(dir, "engines"), url: via, gpus: gpus}
	e.start(tb)
	return e
}

// start runs the agent from the identity on disk, as `edge run` does.
func (e *fleetEdge) start(tb testing.TB) {
	tb.Helper()
	id, err := state.Load(e.dir)
	if err != nil {
		tb.Fatal(err)
	}
	if e.url != "" {
		id.ControlURL = e.url
	}
	a := agent.New(agent.Config{StateDir: e.dir, EnginesDir: e.engines, GPUs: e.gpus, BackoffMax: time.Second}, id)
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel, e.done = cancel, make(chan error, 1)
	go func() { e.done <- a.Run(ctx) }()
	tb.Cleanup(e.stop)
}

// stop is SIGTERM: the agent says goodbye and returns.
func (e *fleetEdge) stop() {
	if e.cancel != nil {
		e.cancel()
		<-e.done
		e.cancel = nil
	}
}

// waitNode polls the node until ok says yes, or fails after within.
func waitNode(tb testing.TB, srv *servertest.Server, id string, within time.Duration, what string, ok func(*llorchv1.Node) bool) *llorchv1.Node {
	tb.Helper()
	deadline := time.Now().Add(within)
	var last *llorchv1.Node
	for time.Now().Before(deadline) {
		resp, err := srv.Admin.GetNode(context.Background(), connect.NewRequest(&llorchv1.GetNodeRequest{Id: id}))
		if err == nil {
			last = resp.Msg.GetNode()
			if ok(last) {
				return last
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	tb.Fatalf("node %s: not %s within %s; last seen as %v", id, what, within, last)
	return nil
}

func is(s llorchv1.NodeStatus) func(*llorchv1.Node) bool {
	return func(n *llorchv1.Node) bool { return n.GetStatus() == s }
}

func events(tb testing.TB, srv *servertest.Server, id string) []*llorchv1.Event {
	tb.Helper()
	resp, err := srv.Admin.ListEvents(context.Background(), connect.NewRequest(&llorchv1.ListEventsRequest{NodeId: id, Limit: 1000}))
	if err != nil {
		tb.Fatal(err)
	}
	return resp.Msg.GetEvents()
}

func countEvents(evs []*llorchv1.Event, kind string) int {
	n := 0
	for _, e := range evs {
		if e.GetKind() == kind {
			n++
		}
	}
	return n
}

// countMoves counts the status events that moved a node from from (any
// status when unspecified) to to, with a reason that starts with why.
func countMoves(evs []*llorchv1.Event, from, to llorchv1.NodeStatus, why string) int {
	n := 0
	for _, e := range evs {
		if e.GetKind() == "status" && (from == llorchv1.NodeStatus_NODE_STATUS_UNSPECIFIED || e.GetFrom() == from) &&
			e.GetTo() == to && strings.HasPrefix(e.GetReason(), why) {
			n++
		}
	}
	return n
}

func TestFleetOnlineWithGPUsAndPools(t *testing.T) {
	srv := servertest.Start(t, fastFleet)
	edges := []*fleetEdge{
		newEdge(t, srv, "gpu-1", twoGPUs, ""),
		newEdge(t, srv, "gpu-2", twoGPUs, ""),
		newEdge(t, srv, "gpu-3", fakeGPUs{gpu.Inventory{Unavailable: "NVML library not found"}}, ""),
	}
	for _, e := range edges {
		waitNode(t, srv, e.id, 2*testInterval, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	}
	n := waitNode(t, srv, edges[0].id, time.Second, "reporting GPUs", func(n *llorchv1.Node) bool { return len(n.GetGpuInventory().GetGpus()) == 2 })
	if g := n.GetGpuInventory(); g.GetGpus()[1].GetUuid() != "GPU-1" || g.GetCudaVersion() != "12.4" {
		t.Errorf("GPU inventory %v", g)
	}
	if n.GetSystem().GetHostname() == "" {
		t.Error("no system info")
	}
	waitNode(t, srv, edges[2].id, time.Second, "saying why it has no GPUs", func(n *llorchv1.Node) bool {
		return n.GetGpuInventory().GetUnavailable() == "NVML library not found"
	})

	// Handoff files: written, changed, broken, removed.
	engine := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			w.Write([]byte(`{"status":"ok"}`))
			return
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(engine.Close)
	e := edges[0]
	os.MkdirAll(e.engines, 0o755)
	write := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(e.engines, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("pool-a-r0.json", `{"pool_id":"pool-a","replica_id":"r0","engine":"llamacpp","engine_version":"b4000","url":"`+engine.URL+`","model":"qwen2.5-7b","slots":4}`)
	pool := func(id string) func(*llorchv1.Node) *llorchv1.Pool {
		return func(n *llorchv1.Node) *llorchv1.Pool {
			for _, p := range n.GetPools() {
				if p.GetId() == id {
					return p
				}
			}
			return nil
		}
	}
	waitNode(t, srv, e.id, 3*time.Second, "showing a ready pool-a", func(n *llorchv1.Node) bool {
		p := pool("pool-a")(n)
		return p != nil && p.GetReady() && p.GetSlotsTotal() == 4 && p.GetModel() == "qwen2.5-7b"
	})
	write("pool-a-r0.json", `{"pool_id":"pool-a","replica_id":"r0","engine":"llamacpp","engine_version":"b4001","url":"`+engine.URL+`","model":"qwen2.5-7b","slots":8}`)
	waitNode(t, srv, e.id, 3*time.Second, "showing the changed pool-a", func(n *llorchv1.Node) bool {
		p := pool("pool-a")(n)
		return p != nil && p.GetSlotsTotal() == 8 && p.GetEngineVersion() == "b4001"
	})
	write("broken.json", `{"pool_id": "pool-b",`)
	waitNode(t, srv, e.id, 3*time.Second, "reporting the broken file while pool-a stays", func(n *llorchv1.Node) bool {
		return len(n.GetHandoffErrors()) == 1 && n.GetHandoffErrors()[0].GetFile() == "broken.json" && pool("pool-a")(n) != nil
	})
	os.Remove(filepath.Join(e.engines, "pool-a-r0.json"))
	waitNode(t, srv, e.id, 3*time.Second, "without pool-a", func(n *llorchv1.Node) bool { return pool("pool-a")(n) == nil })
}

func TestFleetLossGoodbyeAndReturn(t *testing.T) {
	srv := servertest.Start(t, fastFleet)
	proxy := servertest.NewProxy(t, srv.Addr().String())
	cut := newEdge(t, srv, "behind-proxy", twoGPUs, proxy.URL())
	leaving := newEdge(t, srv, "leaving", twoGPUs, "")
	waitNode(t, srv, cut.id, 2*testInterval, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	waitNode(t, srv, leaving.id, 2*testInterval, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))

	// A partition (as kill -9 would look from here): offline within the
	// threshold plus an interval.
	proxy.Cut()
	lost := time.Now()
	waitNode(t, srv, cut.id, testOffline+2*testInterval, "offline", is(llorchv1.NodeStatus_NODE_STATUS_OFFLINE))
	t.Logf("partitioned edge offline after %s", time.Since(lost).Round(time.Millisecond))
	proxy.Heal()
	waitNode(t, srv, cut.id, 3*time.Second, "back online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))

	// SIGTERM: a goodbye makes it offline at once, with the reason.
	leaving.stop()
	n := waitNode(t, srv, leaving.id, 100*time.Millisecond, "offline", is(llorchv1.NodeStatus_NODE_STATUS_OFFLINE))
	if n.GetStatusReason() != "shutdown" {
		t.Errorf("reason %q, want shutdown", n.GetStatusReason())
	}
	// Restarting it brings it back as the same node, with no new enrollment.
	leaving.start(t)
	waitNode(t, srv, leaving.id, 2*time.Second, "back online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	for _, e := range []*fleetEdge{cut, leaving} {
		if got := countEvents(events(t, srv, e.id), "enrolled"); got != 1 {
			t.Errorf("node %s enrolled %d times", e.id, got)
		}
	}
	nodes, _ := srv.Admin.ListNodes(context.Background(), connect.NewRequest(&llorchv1.ListNodesRequest{}))
	if len(nodes.Msg.GetNodes()) != 2 {
		t.Errorf("%d nodes, want 2 (no duplicates)", len(nodes.Msg.GetNodes()))
	}
	// Every transition is an event with a reason.
	evs := events(t, srv, cut.id)
	if countMoves(evs, llorchv1.NodeStatus_NODE_STATUS_UNSPECIFIED, llorchv1.NodeStatus_NODE_STATUS_OFFLINE, "no heartbeat for") == 0 {
		t.Error("no event for the partitioned node going offline (no heartbeat for ...)")
	}
	if countMoves(evs, llorchv1.NodeStatus_NODE_STATUS_OFFLINE, llorchv1.NodeStatus_NODE_STATUS_ONLINE, "registered") == 0 {
		t.Error("no event for the partitioned node coming back (offline -> online: registered)")
	}
}

func TestFleetSurvivesControlPlaneRestart(t *testing.T) {
	srv := servertest.Start(t, fastFleet)
	var edges []*fleetEdge
	for _, name := range []string{"a", "b", "c"} {
		edges = append(edges, newEdge(t, srv, name, twoGPUs, ""))
	}
	for _, e := range edges {
		waitNode(t, srv, e.id, 2*testInterval, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	}
	if _, err := srv.Admin.DrainNode(context.Background(), connect.NewRequest(&llorchv1.DrainNodeRequest{Id: edges[0].id, Reason: "maintenance"})); err != nil {
		t.Fatal(err)
	}
	// Stopped for longer than the offline threshold, then back on the same
	// address and data.
	cfg := srv.Config
	cfg.Listen = srv.Addr().String()
	srv.Stop()
	time.Sleep(3 * testOffline) // the downtime itself is what is tested
	srv = servertest.StartConfig(t, cfg)
	for _, e := range edges {
		waitNode(t, srv, e.id, 15*time.Second, "online again", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	}
	waitNode(t, srv, edges[0].id, time.Second, "still draining", func(n *llorchv1.Node) bool { return n.GetDraining() })
	for _, e := range edges {
		if got := countMoves(events(t, srv, e.id), llorchv1.NodeStatus_NODE_STATUS_UNSPECIFIED, llorchv1.NodeStatus_NODE_STATUS_OFFLINE, ""); got != 0 {
			t.Errorf("node %s was reported offline %d times because of the control plane's downtime", e.id, got)
		}
	}
}

func TestRemovedEdgeStops(t *testing.T) {
	srv := servertest.Start(t, fastFleet)
	e := newEdge(t, srv, "doomed", twoGPUs, "")
	waitNode(t, srv, e.id, 2*testInterval, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	if _, err := srv.Admin.RemoveNode(context.Background(), connect.NewRequest(&llorchv1.RemoveNodeRequest{Id: e.id})); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-e.done:
		if err == nil || !strings.Contains(err.Error(), "revoked") {
			t.Fatalf("agent of a removed node returned %v, want a revoked error", err)
		}
		e.cancel = nil
	case <-time.After(5 * time.Second):
		t.Fatal("the agent of a removed node keeps running")
	}
}

func TestRenewNowCommand(t *testing.T) {
	srv := servertest.Start(t, fastFleet)
	e := newEdge(t, srv, "renewing", twoGPUs, "")
	n := waitNode(t, srv, e.id, 2*testInterval, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	old := n.GetCertificateSerial()
	if _, err := srv.Admin.RenewNodeCertificate(context.Background(), connect.NewRequest(&llorchv1.RenewNodeCertificateRequest{Id: e.id})); err != nil {
		t.Fatal(err)
	}
	// The edge renews, reconnects with the new certificate, which becomes current.
	waitNode(t, srv, e.id, 5*time.Second, "on a renewed certificate", func(n *llorchv1.Node) bool {
		return n.GetCertificateSerial() != old && n.GetStatus() == llorchv1.NodeStatus_NODE_STATUS_ONLINE
	})
	id, err := state.Load(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := certsSerial(id); got == old {
		t.Fatal("the state directory still holds the old certificate")
	}
	e.stop()
	// The edge may have been stopped while its new session was registering:
	// then the control plane sees the stream end a moment later.
	waitNode(t, srv, e.id, 5*time.Second, "gone", func(n *llorchv1.Node) bool { return n.GetStatus() != llorchv1.NodeStatus_NODE_STATUS_ONLINE })
	_, err = srv.Admin.RenewNodeCertificate(context.Background(), connect.NewRequest(&llorchv1.RenewNodeCertificateRequest{Id: e.id}))
	if connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("renew of a disconnected node: %v, want failed precondition", err)
	}
}

func TestWatchEventsOverGRPCWeb(t *testing.T) {
	const token = testAPIToken
	srv := servertest.Start(t, func(c *server.Config) { fastFleet(c); c.APIToken = token })
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	// A browser speaks gRPC-web over HTTP/1.1 or HTTP/2.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	admin := llorchv1connect.NewAdminServiceClient(hc, srv.URL(), connect.WithGRPCWeb(), adminclient.BearerToken(token))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := admin.WatchEvents(ctx, connect.NewRequest(&llorchv1.WatchEventsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	e := newEdge(t, srv, "watched", twoGPUs, "")
	want := map[string]bool{"enrolled": false, "status": false}
	for stream.Receive() {
		ev := stream.Msg().GetEvent()
		if ev.GetNodeId() == e.id {
			want[ev.GetKind()] = true
		}
		if want["enrolled"] && want["status"] {
			return
		}
	}
	t.Fatalf("stream ended before the node's enrollment and status change: %v (%v)", stream.Err(), want)
}

func TestMetrics(t *testing.T) {
	const token = testAPIToken
	srv := servertest.Start(t, func(c *server.Config) { fastFleet(c); c.APIToken = token })
	e := newEdge(t, srv, "measured", twoGPUs, "")
	waitNode(t, srv, e.id, 2*testInterval, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	roots := x509.NewCertPool()
	roots.AddCert(srv.Root())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	get := func(tok string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, srv.URL()+"/metrics", nil)
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, _ := get(""); code != http.StatusUnauthorized {
		t.Fatalf("/metrics without a token: %d, want 401", code)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, body := get(token)
		if code != http.StatusOK {
			t.Fatalf("/metrics: %d", code)
		}
		ok := true
		for _, want := range []string{`llorch_nodes{status="online"} 1`, "llorch_sessions 1", `llorch_enrollments_total{result="ok"} 1`, `llorch_node_transitions_total{from="enrolled",to="online"} 1`, "llorch_heartbeats_total"} {
			ok = ok && strings.Contains(body, want)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/metrics lacks the fleet's figures:\n%s", body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A fleet arriving at once is paced: refused edges come back when told to,
// and all register.
func TestRegistrationsArePaced(t *testing.T) {
	srv := servertest.Start(t, func(c *server.Config) {
		fastFleet(c)
		c.RegistrationRate, c.RegistrationBurst = 4, 1
	})
	var edges []*fleetEdge
	for _, name := range []string{"a", "b", "c", "d", "e", "f"} {
		edges = append(edges, newEdge(t, srv, name, twoGPUs, ""))
	}
	for _, e := range edges {
		waitNode(t, srv, e.id, 10*time.Second, "online", is(llorchv1.NodeStatus_NODE_STATUS_ONLINE))
	}
	body := metricsText(t, srv)
	if !strings.Contains(body, "llorch_sessions_paced_total") || strings.Contains(body, "llorch_sessions_paced_total 0") {
		t.Errorf("no session was paced:\n%s", body)
	}
}

func metricsText(tb testing.TB, srv *servertest.Server) string {
	tb.Helper()
	resp, err := adminclient.SocketHTTP(srv.Config.DataDir).Get(adminclient.SocketURL + "/metrics")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}
