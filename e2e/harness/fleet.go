package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	toxiclient "github.com/Shopify/toxiproxy/v2/client"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tcnetwork "github.com/testcontainers/testcontainers-go/network"
	"github.com/testcontainers/testcontainers-go/wait"
)

// The topology (a NAT as edges behind it see one):
//
//	public network (bridge)                     site network (--internal)
//	  cp       control plane :8443                edge-N     edges, dial https://control:8443
//	  gateway  toxiproxy: 8474 API (published),   control    = the gateway, forwarding to cp:8443
//	           site:8443 -> cp:8443               engine-N   fake engines
//
// Edges only reach the control plane through the gateway, a TCP proxy on
// both networks; the control plane is not on the site network, and the
// engine drops traffic between bridges and out of an internal one, so it
// cannot open a connection to an edge. The gateway is also where network
// faults (latency, resets, blackholes) are injected.
const (
	ControlAlias = "control" // the control plane's name as edges see it (the gateway)
	CPAlias      = "cp"      // the control plane's name on the public network
	ControlURL   = "https://" + ControlAlias + ":" + ControlPort

	EdgeBin        = "/usr/local/bin/edge"
	EdgeStateDir   = "/var/lib/llorch-edge"
	EdgeEnginesDir = "/run/llorch/engines"
	TestkitBin     = "/usr/local/bin/testkit"

	apiToken = "e2e-api-token-0123456789abcdef" // LLORCH_API_TOKEN for a non-loopback --listen
)

// FleetOptions shapes a fleet.
type FleetOptions struct {
	Edges             int           // edges enrolled and running when NewFleet returns
	HeartbeatInterval time.Duration // 0: 1s
	OfflineAfter      time.Duration // 0: 3s
	// DataTmpfsSize puts the control plane's data directory on a tmpfs
	// volume of that size (e.g. "8m"), shared with sidecars; "": the
	// container's own file system (which survives a restart).
	DataTmpfsSize string
	// Engines gives each edge an engines volume, for fake engine sidecars.
	Engines bool
	// RegistrationRate and RegistrationBurst pace new sessions
	// (`--registration-rate`, `--registration-burst`); 0: the design's
	// 1000/s and 100. They are always passed explicitly, so the bounds a
	// scenario derives from them hold for the control plane it runs.
	RegistrationRate  float64
	RegistrationBurst int
	// ServeArgs are extra flags for `control serve`.
	ServeArgs []string
}

// The design's registration pacing (docs/ARCHITECTURE.md, "Pacing").
const (
	DefaultRegistrationRate  = 1000
	DefaultRegistrationBurst = 100
)

// Fleet is one control plane, its gateway and its edges on their own networks.
type Fleet struct {
	s    *Suite
	t    testing.TB
	Opts FleetOptions

	Public, Site *testcontainers.DockerNetwork
	CP           *ControlPlane
	Gateway      *Gateway
	DataVolume   string // the data volume with DataTmpfsSize, else ""

	mu        sync.Mutex
	edges     []*Edge
	timeline  []string
	artifacts string
}

// Gateway is the toxiproxy container between the site and the control plane.
type Gateway struct {
	C     *testcontainers.DockerContainer
	API   *toxiclient.Client
	Proxy *toxiclient.Proxy // "control": site :8443 -> cp:8443
}

// NewFleet starts a control plane, the gateway and opts.Edges edges, and
// waits until every edge is online. Everything is removed when the test ends.
func (s *Suite) NewFleet(t testing.TB, ctx context.Context, opts FleetOptions) *Fleet {
	t.Helper()
	if opts.HeartbeatInterval == 0 {
		opts.HeartbeatInterval = time.Second
	}
	if opts.OfflineAfter == 0 {
		opts.OfflineAfter = 3 * time.Second
	}
	if opts.RegistrationRate == 0 {
		opts.RegistrationRate = DefaultRegistrationRate
	}
	if opts.RegistrationBurst == 0 {
		opts.RegistrationBurst = DefaultRegistrationBurst
	}
	f := &Fleet{s: s, t: t, Opts: opts}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()

	var err error
	f.Public, err = tcnetwork.New(ctx, tcnetwork.WithLabels(s.Labels()))
	if f.Public != nil {
		testcontainers.CleanupNetwork(t, f.Public)
	}
	if err != nil {
		t.Fatalf("create the public network: %v", err)
	}
	f.Site, err = tcnetwork.New(ctx, tcnetwork.WithInternal(), tcnetwork.WithLabels(s.Labels()))
	if f.Site != nil {
		testcontainers.CleanupNetwork(t, f.Site)
	}
	if err != nil {
		t.Fatalf("create the site network: %v", err)
	}
	f.startControlPlane(ctx)
	f.startGateway(ctx)
	f.AddEdges(ctx, opts.Edges)
	return f
}

// Suite is the suite the fleet belongs to.
func (f *Fleet) Suite() *Suite { return f.s }

// Edges returns the fleet's edges in the order they were added.
func (f *Fleet) Edges() []*Edge {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.edges)
}

// Notef logs a step with the time, and keeps it for the failure artifacts.
func (f *Fleet) Notef(format string, args ...any) {
	f.t.Helper()
	line := time.Now().Format("15:04:05.000") + " " + fmt.Sprintf(format, args...)
	f.mu.Lock()
	f.timeline = append(f.timeline, line)
	f.mu.Unlock()
	f.t.Log(line)
}

func (f *Fleet) name(role string) string {
	return fmt.Sprintf("llorch-%s-%s-%d-%s", f.s.Name, f.s.RunID, f.s.next(), role)
}

// Volume creates a labelled volume removed at the end of the test
// (driverOpts: nil for a plain one).
func (f *Fleet) Volume(ctx context.Context, role string, driverOpts map[string]string) (string, error) {
	name := f.name(role)
	_, err := f.s.Docker.VolumeCreate(ctx, client.VolumeCreateOptions{Name: name, Driver: "local", DriverOpts: driverOpts, Labels: f.s.Labels()})
	if err != nil {
		return "", fmt.Errorf("create volume %s: %w", name, err)
	}
	f.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := f.s.Docker.VolumeRemove(ctx, name, client.VolumeRemoveOptions{Force: true}); err != nil && !isNotFound(err) {
			f.t.Errorf("remove volume %s: %v", name, err)
		}
	})
	return name, nil
}

// Run starts a container from one of the suite's images with the labels and
// a name, and registers its removal (and, when the test fails, the saving of
// its logs) before looking at the error, so that nothing leaks.
func (f *Fleet) Run(ctx context.Context, role, image string, opts ...testcontainers.ContainerCustomizer) (*testcontainers.DockerContainer, error) {
	name := f.name(role)
	opts = append([]testcontainers.ContainerCustomizer{testcontainers.WithName(name), testcontainers.WithLabels(f.s.Labels())}, opts...)
	c, err := testcontainers.Run(ctx, image, opts...)
	if c != nil {
		testcontainers.CleanupContainer(f.t, c, testcontainers.StopTimeout(0))
		f.t.Cleanup(func() {
			if f.t.Failed() {
				f.saveLogs(name, c.GetContainerID())
			}
		})
	}
	if err != nil {
		return c, fmt.Errorf("start %s: %w", name, err)
	}
	return c, nil
}

// RunOnce runs a container to completion and returns its exit code and output.
func (f *Fleet) RunOnce(ctx context.Context, role, image string, opts ...testcontainers.ContainerCustomizer) (ExecResult, error) {
	c, err := f.Run(ctx, role, image, opts...)
	if err != nil {
		return ExecResult{}, err
	}
	code, err := f.s.WaitExit(ctx, c.GetContainerID())
	if err != nil {
		return ExecResult{}, fmt.Errorf("wait for %s: %w", role, err)
	}
	stdout, stderr, err := f.s.Logs(ctx, c.GetContainerID())
	return ExecResult{Code: code, Stdout: stripTimestamps(stdout), Stderr: stripTimestamps(stderr)}, err
}

var timestampPrefix = regexp.MustCompile(`(?m)^\d{4}-\d\d-\d\dT\S+ `)

func stripTimestamps(s string) string { return timestampPrefix.ReplaceAllString(s, "") }

func (f *Fleet) startControlPlane(ctx context.Context) {
	t := f.t
	opts := []testcontainers.ContainerCustomizer{
		tcnetwork.WithNetwork([]string{CPAlias}, f.Public),
		testcontainers.WithEnv(map[string]string{"LLORCH_API_TOKEN": apiToken}),
		testcontainers.WithCmd(append([]string{"serve", "--data", ControlDataDir, "--listen", "0.0.0.0:" + ControlPort,
			"--san", ControlAlias, "--san", CPAlias,
			"--heartbeat-interval", f.Opts.HeartbeatInterval.String(), "--offline-after", f.Opts.OfflineAfter.String(),
			"--registration-rate", strconv.FormatFloat(f.Opts.RegistrationRate, 'g', -1, 64),
			"--registration-burst", strconv.Itoa(f.Opts.RegistrationBurst)},
			f.Opts.ServeArgs...)...),
		// The TLS port is published on 127.0.0.1 for the harness alone
		// (ControlPlane.Metrics: /metrics with the API token); edges reach
		// it only through the gateway.
		testcontainers.WithExposedPorts(ControlPort + "/tcp"),
		testcontainers.WithHostConfigModifier(func(h *container.HostConfig) {
			h.PortBindings = network.PortMap{network.MustParsePort(ControlPort + "/tcp"): {{HostIP: netip.MustParseAddr("127.0.0.1")}}}
		}),
		testcontainers.WithWaitStrategy(wait.ForLog("CA fingerprint: sha256:").WithStartupTimeout(30 * time.Second)),
	}
	if f.Opts.DataTmpfsSize != "" {
		// 0700, as a data directory should be (a tmpfs is 1777 unless told).
		vol, err := f.Volume(ctx, "data", map[string]string{"type": "tmpfs", "device": "tmpfs", "o": "size=" + f.Opts.DataTmpfsSize + ",mode=0700"})
		if err != nil {
			t.Fatal(err)
		}
		f.DataVolume = vol
		opts = append(opts, testcontainers.WithMounts(testcontainers.VolumeMount(vol, ControlDataDir)))
	}
	c, err := f.Run(ctx, "control", f.s.Images.Control, opts...)
	if err != nil {
		t.Fatal(err)
	}
	f.CP = &ControlPlane{s: f.s, C: c, ID: c.GetContainerID()}
	out, err := f.CP.AdminOK(ctx, "ca", "show")
	if err != nil {
		t.Fatalf("control ca show: %v", err)
	}
	if m := regexp.MustCompile(`sha256:[0-9a-f]{64}`).FindString(out); m != "" {
		f.CP.Fingerprint = m
	} else {
		t.Fatalf("control ca show printed no fingerprint: %q", out)
	}
	f.Notef("control plane up (CA %s…)", f.CP.Fingerprint[:19])
}

func (f *Fleet) startGateway(ctx context.Context) {
	t := f.t
	c, err := f.Run(ctx, "gateway", f.s.Images.Toxiproxy,
		tcnetwork.WithNetwork([]string{"gateway"}, f.Public),
		tcnetwork.WithNetwork([]string{ControlAlias}, f.Site),
		// The API is published on 127.0.0.1 only (the engine is local; on
		// this engine the IPv4 and IPv6 bindings of one port can get
		// different host ports, and testcontainers' Host() guesses a
		// gateway address when /.dockerenv exists, so neither is used).
		testcontainers.WithExposedPorts("8474/tcp"),
		testcontainers.WithHostConfigModifier(func(h *container.HostConfig) {
			h.PortBindings = network.PortMap{network.MustParsePort("8474/tcp"): {{HostIP: netip.MustParseAddr("127.0.0.1")}}}
		}),
		testcontainers.WithWaitStrategy(wait.ForLog("Starting Toxiproxy HTTP server").WithStartupTimeout(30*time.Second)),
	)
	if err != nil {
		t.Fatal(err)
	}
	port, err := c.MappedPort(ctx, "8474/tcp")
	if err != nil {
		t.Fatal(err)
	}
	api := toxiclient.NewClient("http://" + net.JoinHostPort("127.0.0.1", port.Port()))
	WaitFor(t, ctx, "the gateway's API", 10*time.Second, func(context.Context) (bool, string, error) {
		_, err := api.Version()
		return err == nil, "", err
	})
	proxy, err := api.CreateProxy("control", "0.0.0.0:"+ControlPort, CPAlias+":"+ControlPort)
	if err != nil {
		t.Fatalf("create the gateway proxy: %v", err)
	}
	f.Gateway = &Gateway{C: c, API: api, Proxy: proxy}
}

// saveLogs writes a container's logs (and, for the control plane, its
// database) into the test's artifact directory.
func (f *Fleet) saveLogs(name, id string) {
	dir := f.artifactDir()
	if dir == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stdout, stderr, err := f.s.Logs(ctx, id)
	text := "== stdout\n" + stdout + "\n== stderr\n" + stderr
	if err != nil {
		text += "\n== error reading logs: " + err.Error()
	}
	if err := os.WriteFile(filepath.Join(dir, name+".log"), []byte(text), 0o644); err != nil {
		f.t.Logf("save logs of %s: %v", name, err)
	}
	if f.CP != nil && id == f.CP.ID {
		sub := filepath.Join(dir, name+"-data")
		if err := os.MkdirAll(sub, 0o755); err == nil {
			f.s.CopyOut(ctx, id, sub, ControlDB, ControlDB+"-wal", ControlDB+"-shm")
		}
	}
}

// artifactDir creates the fleet's artifact directory once, with the timeline.
func (f *Fleet) artifactDir() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.artifacts != "" {
		return f.artifacts
	}
	f.artifacts = ArtifactDir(f.t)
	os.WriteFile(filepath.Join(f.artifacts, "timeline.txt"), []byte(strings.Join(f.timeline, "\n")+"\n"), 0o644)
	f.t.Logf("container logs, timeline and the control plane's database saved in %s", f.artifacts)
	return f.artifacts
}

// WriteArtifact writes a file into the test's artifact directory now (for
// histories that matter when the test fails) and returns its path.
func (f *Fleet) WriteArtifact(name string, data []byte) string {
	p := filepath.Join(f.artifactDir(), name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		f.t.Logf("write %s: %v", p, err)
	}
	return p
}

// NodeMap lists the nodes by ID.
func (f *Fleet) NodeMap(ctx context.Context) (map[string]Node, error) {
	ns, err := f.CP.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	m := make(map[string]Node, len(ns))
	for _, n := range ns {
		m[n.ID] = n
	}
	return m, nil
}

// StatusIs is a Cond: every node in ids has status want.
func (f *Fleet) StatusIs(want string, ids ...string) Cond {
	return func(ctx context.Context) (bool, string, error) {
		m, err := f.NodeMap(ctx)
		if err != nil {
			return false, "", err
		}
		var off []string
		for _, id := range ids {
			n, ok := m[id]
			if !ok {
				off = append(off, id+"=missing")
			} else if n.Status != want {
				off = append(off, id+"="+n.Status)
			}
		}
		if len(off) == 0 {
			return true, "all " + want, nil
		}
		return false, "not " + want + ": " + strings.Join(off, ", "), nil
	}
}

// WaitStatus waits until every node in ids has status want and returns how long that took.
func (f *Fleet) WaitStatus(t testing.TB, ctx context.Context, want string, timeout time.Duration, ids ...string) time.Duration {
	t.Helper()
	return WaitFor(t, ctx, fmt.Sprintf("%d nodes %s", len(ids), want), timeout, f.StatusIs(want, ids...))
}

// NodeIDs are the node IDs of edges.
func NodeIDs(edges []*Edge) []string {
	ids := make([]string, len(edges))
	for i, e := range edges {
		ids[i] = e.NodeID
	}
	return ids
}

// AddEdges enrolls and starts n edges (a few at a time) and waits until all are online.
func (f *Fleet) AddEdges(ctx context.Context, n int) []*Edge {
	t := f.t
	t.Helper()
	if n == 0 {
		return nil
	}
	base := len(f.Edges())
	edges := make([]*Edge, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			name := fmt.Sprintf("edge-%d", base+i+1)
			e, err := f.enroll(ctx, name)
			if err == nil {
				err = e.start(ctx)
			}
			edges[i], errs[i] = e, err
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.edges = append(f.edges, edges...)
	f.mu.Unlock()
	f.WaitStatus(t, ctx, "online", 30*time.Second, NodeIDs(edges)...)
	f.Notef("%d edges online: %s", n, strings.Join(NodeIDs(edges), ", "))
	return edges
}

// NetworkConnect reconnects a container to a network under its aliases.
func (f *Fleet) NetworkConnect(ctx context.Context, nw *testcontainers.DockerNetwork, containerID string, aliases ...string) error {
	_, err := f.s.Docker.NetworkConnect(ctx, nw.ID, client.NetworkConnectOptions{Container: containerID, EndpointConfig: &network.EndpointSettings{Aliases: aliases}})
	return err
}

// NetworkDisconnect cuts a container off a network.
func (f *Fleet) NetworkDisconnect(ctx context.Context, nw *testcontainers.DockerNetwork, containerID string) error {
	_, err := f.s.Docker.NetworkDisconnect(ctx, nw.ID, client.NetworkDisconnectOptions{Container: containerID, Force: true})
	return err
}

// IPOn is a container's address on a network.
func (f *Fleet) IPOn(ctx context.Context, containerID string, nw *testcontainers.DockerNetwork) (string, error) {
	res, err := f.s.Docker.ContainerInspect(ctx, containerID, client.ContainerInspectOptions{})
	if err != nil {
		return "", err
	}
	if res.Container.NetworkSettings != nil {
		if ep, ok := res.Container.NetworkSettings.Networks[nw.Name]; ok && ep.IPAddress.IsValid() {
			return ep.IPAddress.String(), nil
		}
	}
	return "", fmt.Errorf("container %.12s has no address on network %s", containerID, nw.Name)
}
