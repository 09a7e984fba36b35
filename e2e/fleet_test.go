package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/testcontainers/testcontainers-go"
	tcnetwork "github.com/testcontainers/testcontainers-go/network"

	"github.com/llorch/llorch/e2e/harness"
)

// TestFleet walks the whole operator flow through the real binaries: tokens,
// enrollment (and an idempotent second one), sessions, engine pools from
// handoff files, drain, a goodbye, and removal.
func TestFleet(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: 3, Engines: true})
	edges := f.Edges()

	t.Run("enrolled and online", func(t *testing.T) {
		nodes, err := f.NodeMap(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(nodes) != 3 {
			t.Fatalf("%d nodes, want 3: %v", len(nodes), nodes)
		}
		for _, e := range edges {
			n := nodes[e.NodeID]
			if n.Name != e.Name || n.Status != "online" || n.TokenID != e.TokenID || n.Labels["site"] != "a" {
				t.Errorf("node %s = %+v, want name %s, online, token %s, label site=a", e.NodeID, n, e.Name, e.TokenID)
			}
			// Static (CGO_ENABLED=0) edges in scratch images have no NVML.
			if len(n.GPUs) != 0 || n.GPUUnavailable == "" {
				t.Errorf("node %s: gpus %v, gpu_unavailable %q; want none, with the reason", e.Name, n.GPUs, n.GPUUnavailable)
			}
		}
		tokens, err := f.CP.Tokens(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, tok := range tokens {
			if tok.Uses != 1 || tok.State != "used" {
				t.Errorf("token %s: uses %d, state %s; want 1, used", tok.ID, tok.Uses, tok.State)
			}
		}
		if n := countEvents(t, ctx, f, "", "enrolled"); n != 3 {
			t.Errorf("%d enrolled events, want 3", n)
		}
	})

	t.Run("enroll again spends no token", func(t *testing.T) {
		e := edges[0]
		token, tokenID, err := f.CP.CreateToken(ctx, "spare")
		if err != nil {
			t.Fatal(err)
		}
		res, err := f.EnrollOnce(ctx, e.Name+"-reenroll", e.Volume, token)
		if err != nil {
			t.Fatal(err)
		}
		if res.Code != 0 || !strings.Contains(res.Stdout, "already enrolled as node "+e.NodeID) || !strings.Contains(res.Stdout, "no token spent") {
			t.Fatalf("edge enroll on an enrolled state directory: %s", res)
		}
		if tok := findToken(t, ctx, f, tokenID); tok.Uses != 0 {
			t.Errorf("token %s: uses %d after a re-enroll, want 0", tokenID, tok.Uses)
		}
		if n := countEvents(t, ctx, f, "", "enrolled"); n != 3 {
			t.Errorf("%d enrolled events, want still 3", n)
		}
	})

	t.Run("engine pool from a handoff file", func(t *testing.T) {
		e := edges[0]
		_, err := f.Sidecar(ctx, "engine-1", []string{"engine", "-listen", ":8080",
			"-handoff", harness.EdgeEnginesDir + "/pool-a-r1.json", "-pool", "pool-a", "-replica", "r1",
			"-url", "http://engine-1:8080", "-model", "tiny-llama"},
			tcnetwork.WithNetwork([]string{"engine-1"}, f.Site),
			testcontainers.WithMounts(testcontainers.VolumeMount(e.Engines, harness.EdgeEnginesDir)))
		if err != nil {
			t.Fatal(err)
		}
		// A provisioner's broken file is reported, and does not hide the good one.
		if err := e.C.CopyToContainer(ctx, []byte(`{"pool_id": "pool-b"`), harness.EdgeEnginesDir+"/broken.json", 0o644); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, ctx, "pool-a ready with replica r1, and broken.json reported", 20*time.Second, func(ctx context.Context) (bool, string, error) {
			n, err := f.CP.Node(ctx, e.NodeID)
			if err != nil {
				return false, "", err
			}
			ready := false
			for _, p := range n.Pools {
				if p.ID == "pool-a" && p.Ready && p.Model == "tiny-llama" && len(p.Replicas) == 1 &&
					p.Replicas[0].ID == "r1" && p.Replicas[0].Ready && p.Replicas[0].URL == "http://engine-1:8080" {
					ready = true
				}
			}
			broken := false
			for _, h := range n.HandoffErrors {
				broken = broken || h.File == "broken.json"
			}
			return ready && broken, fmt.Sprintf("pools %+v, handoff errors %+v", n.Pools, n.HandoffErrors), nil
		})
	})

	t.Run("drain and undrain", func(t *testing.T) {
		e := edges[1]
		if _, err := f.CP.AdminOK(ctx, "node", "drain", e.NodeID); err != nil {
			t.Fatal(err)
		}
		if n, err := f.CP.Node(ctx, e.NodeID); err != nil || !n.Draining {
			t.Fatalf("after drain: draining %v, err %v", n.Draining, err)
		}
		if _, err := f.CP.AdminOK(ctx, "node", "undrain", e.NodeID); err != nil {
			t.Fatal(err)
		}
		if n, err := f.CP.Node(ctx, e.NodeID); err != nil || n.Draining || n.Status != "online" {
			t.Fatalf("after undrain: %+v, err %v", n, err)
		}
		for _, kind := range []string{"drained", "undrained"} {
			if n := countEvents(t, ctx, f, e.NodeID, kind); n != 1 {
				t.Errorf("%d %s events for %s, want 1", n, kind, e.Name)
			}
		}
	})

	t.Run("goodbye takes a node offline at once", func(t *testing.T) {
		e := edges[1]
		stopped := time.Now()
		if err := e.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		took := f.WaitStatus(t, ctx, "offline", 5*time.Second, e.NodeID)
		n, err := f.CP.Node(ctx, e.NodeID)
		if err != nil {
			t.Fatal(err)
		}
		if n.StatusReason != "shutdown" {
			t.Errorf("status reason %q, want shutdown", n.StatusReason)
		}
		t.Logf("offline %s after SIGTERM (offline-after is %s)", took.Round(time.Millisecond), f.Opts.OfflineAfter)
		if took >= f.Opts.OfflineAfter {
			t.Errorf("offline after %s: not at once (the silence threshold is %s)", time.Since(stopped), f.Opts.OfflineAfter)
		}
		if err := e.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		f.WaitStatus(t, ctx, "online", 15*time.Second, e.NodeID)
	})

	t.Run("removed edge is refused", func(t *testing.T) {
		e := edges[2]
		if _, err := f.CP.AdminOK(ctx, "node", "remove", e.NodeID); err != nil {
			t.Fatal(err)
		}
		harness.WaitFor(t, ctx, "edge run to exit after the removal", 20*time.Second, func(ctx context.Context) (bool, string, error) {
			exited, code, err := e.Exited(ctx)
			return exited && code != 0, fmt.Sprintf("exited %v, code %d", exited, code), err
		})
		_, stderr, err := e.Logs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(stderr, "revoked") {
			t.Errorf("edge run's last words do not say revoked:\n%s", tail(stderr, 5))
		}
		res, err := e.Command(ctx, "status")
		if err != nil {
			t.Fatal(err)
		}
		if res.Code != 1 || !strings.Contains(res.Stderr, "revoked") || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 {
			t.Errorf("edge status of a removed node: %s; want exit 1 and one line saying revoked", res)
		}
		if n := countEvents(t, ctx, f, e.NodeID, "removed"); n != 1 {
			t.Errorf("%d removed events, want 1", n)
		}
		nodes, err := f.CP.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nodes {
			if n.ID == e.NodeID && n.Status != "removed" {
				t.Errorf("removed node listed as %s", n.Status)
			}
		}
	})

	t.Run("the others stayed up", func(t *testing.T) {
		f.WaitStatus(t, ctx, "online", 10*time.Second, edges[0].NodeID, edges[1].NodeID)
	})
}

// TestNAT proves the topology: edges reach the control plane (through the
// gateway) and each other's site, but the control plane cannot open a
// connection to an edge. The probes run in sidecars that share the network
// namespace of the control plane or of an edge, so they see exactly what
// those processes see; the control plane's own image holds no tools.
func TestNAT(t *testing.T) {
	harness.Require(t, suite)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	f := suite.NewFleet(t, ctx, harness.FleetOptions{Edges: 2})
	edges := f.Edges()

	// Something that listens on the site network: if the control plane
	// could route there at all, it would connect to it.
	engine, err := f.Sidecar(ctx, "engine-nat", []string{"engine", "-listen", ":8080"},
		tcnetwork.WithNetwork([]string{"engine-nat"}, f.Site))
	if err != nil {
		t.Fatal(err)
	}
	engineIP, err := f.IPOn(ctx, engine.GetContainerID(), f.Site)
	if err != nil {
		t.Fatal(err)
	}
	cpProbe, err := f.Sidecar(ctx, "probe-cp", []string{"sleep"}, harness.WithNetworkOf(f.CP.ID))
	if err != nil {
		t.Fatal(err)
	}
	edgeProbe, err := f.Sidecar(ctx, "probe-edge-1", []string{"sleep"}, harness.WithNetworkOf(edges[0].ContainerID()))
	if err != nil {
		t.Fatal(err)
	}
	var edgeIPs []string
	for _, e := range edges {
		ip, err := f.IPOn(ctx, e.ContainerID(), f.Site)
		if err != nil {
			t.Fatal(err)
		}
		edgeIPs = append(edgeIPs, ip)
	}
	harness.WaitFor(t, ctx, "the fake engine to listen", 10*time.Second, func(ctx context.Context) (bool, string, error) {
		r := dial(t, ctx, edgeProbe, "engine-nat:8080")
		return r["engine-nat:8080"] == "connected", fmt.Sprint(r), nil
	})

	// From an edge: the control plane (via the gateway), the engine and the
	// other edge's host are all reachable ("refused" is an answer: the
	// host is there, nothing listens on that port).
	fromEdge := dial(t, ctx, edgeProbe, harness.ControlAlias+":"+harness.ControlPort, "engine-nat:8080", engineIP+":8080", edgeIPs[1]+":9")
	want(t, "edge -> control plane", fromEdge[harness.ControlAlias+":"+harness.ControlPort], "connected")
	want(t, "edge -> engine by name", fromEdge["engine-nat:8080"], "connected")
	want(t, "edge -> engine by address", fromEdge[engineIP+":8080"], "connected")
	want(t, "edge -> other edge", fromEdge[edgeIPs[1]+":9"], "refused")

	// From the control plane: itself yes; no edge, no engine, no site name.
	targets := []string{harness.CPAlias + ":" + harness.ControlPort, engineIP + ":8080", edges[0].Name + ":9", "engine-nat:8080"}
	for _, ip := range edgeIPs {
		targets = append(targets, ip+":9")
	}
	fromCP := dial(t, ctx, cpProbe, targets...)
	want(t, "control plane -> itself", fromCP[targets[0]], "connected")
	for _, target := range targets[1:] {
		if r := fromCP[target]; r == "connected" || r == "refused" {
			t.Errorf("control plane -> %s: %s; the control plane must not reach the site network", target, r)
		} else {
			t.Logf("control plane -> %s: %s (cannot dial in)", target, r)
		}
	}
	// And the edges are online all the same: they dial out.
	f.WaitStatus(t, ctx, "online", 10*time.Second, harness.NodeIDs(edges)...)

	// The control plane image is minimal: no shell to exec.
	if res, err := suite.Exec(ctx, f.CP.ID, "/bin/sh", "-c", "true"); err == nil && res.Code == 0 {
		t.Errorf("the control plane image has a shell")
	}
}

// dial runs testkit dial in a probe and returns the result per address.
func dial(t testing.TB, ctx context.Context, probe *testcontainers.DockerContainer, addrs ...string) map[string]string {
	t.Helper()
	cmd := append([]string{harness.TestkitBin, "dial", "-timeout", "2s"}, addrs...)
	res, err := suite.Exec(ctx, probe.GetContainerID(), cmd...)
	if err != nil || res.Code != 0 {
		t.Fatalf("testkit dial: %v %s", err, res)
	}
	out := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(res.Stdout), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			out[f[0]] = f[1]
		}
	}
	return out
}

func want(t testing.TB, what, got, want string) {
	t.Helper()
	if got != want {
		t.Errorf("%s: %s, want %s", what, got, want)
	} else {
		t.Logf("%s: %s", what, got)
	}
}

// countEvents counts the recorded events of a kind (for one node, or all when nodeID is "").
func countEvents(t testing.TB, ctx context.Context, f *harness.Fleet, nodeID, kind string) int {
	t.Helper()
	es, err := f.CP.Events(ctx, nodeID)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range es {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

func findToken(t testing.TB, ctx context.Context, f *harness.Fleet, id string) harness.Token {
	t.Helper()
	ts, err := f.CP.Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range ts {
		if tok.ID == id {
			return tok
		}
	}
	t.Fatalf("no token %s", id)
	return harness.Token{}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
