package harness

import (
	"context"
	"fmt"
	"regexp"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tcnetwork "github.com/testcontainers/testcontainers-go/network"
)

// Edge is one edge: its state volume and the container running `edge run`.
type Edge struct {
	f       *Fleet
	Name    string // the node name, container role and site network alias
	NodeID  string
	TokenID string // the join token it enrolled with
	Volume  string // state volume, mounted at EdgeStateDir
	Engines string // engines volume at EdgeEnginesDir (FleetOptions.Engines), else ""
	C       *testcontainers.DockerContainer
}

var enrolledAs = regexp.MustCompile(`enrolled as node (\S+) `)

// enroll creates a token and a state volume and runs `edge enroll`.
func (f *Fleet) enroll(ctx context.Context, name string) (*Edge, error) {
	token, tokenID, err := f.CP.CreateToken(ctx, name, "--label", "site=a")
	if err != nil {
		return nil, err
	}
	e := &Edge{f: f, Name: name, TokenID: tokenID}
	if e.Volume, err = f.Volume(ctx, name+"-state", nil); err != nil {
		return nil, err
	}
	if f.Opts.Engines {
		if e.Engines, err = f.Volume(ctx, name+"-engines", nil); err != nil {
			return nil, err
		}
	}
	res, err := f.EnrollOnce(ctx, name+"-enroll", e.Volume, token)
	if err != nil {
		return nil, err
	}
	m := enrolledAs.FindStringSubmatch(res.Stdout)
	if res.Code != 0 || m == nil {
		return nil, fmt.Errorf("edge enroll %s: %s", name, res)
	}
	e.NodeID = m[1]
	return e, nil
}

// EnrollOnce runs `edge enroll` with token (given in LLORCH_ENROLL_TOKEN, as
// an operator would, so it stays out of process lists) in a one-shot edge
// container on the site network, with the state volume.
func (f *Fleet) EnrollOnce(ctx context.Context, role, stateVolume, token string) (ExecResult, error) {
	return f.RunOnce(ctx, role, f.s.Images.Edge,
		tcnetwork.WithNetwork(nil, f.Site),
		testcontainers.WithMounts(testcontainers.VolumeMount(stateVolume, EdgeStateDir)),
		testcontainers.WithEnv(map[string]string{"LLORCH_ENROLL_TOKEN": token}),
		testcontainers.WithCmd("enroll", "--control", ControlURL, "--state", EdgeStateDir))
}

func (e *Edge) mounts() testcontainers.ContainerMounts {
	ms := testcontainers.Mounts(testcontainers.VolumeMount(e.Volume, EdgeStateDir))
	if e.Engines != "" {
		ms = append(ms, testcontainers.VolumeMount(e.Engines, EdgeEnginesDir))
	}
	return ms
}

// start creates and starts the `edge run` container.
func (e *Edge) start(ctx context.Context) error {
	c, err := e.f.Run(ctx, e.Name, e.f.s.Images.Edge,
		tcnetwork.WithNetwork([]string{e.Name}, e.f.Site),
		testcontainers.WithMounts(e.mounts()...),
		testcontainers.WithCmd("run", "--state", EdgeStateDir, "--engines-dir", EdgeEnginesDir))
	e.C = c
	return err
}

// ContainerID is the `edge run` container's ID.
func (e *Edge) ContainerID() string { return e.C.GetContainerID() }

// Command runs `edge ARGS --state STATE` in a one-shot container with the
// edge's state volume on the site network (e.g. status).
func (e *Edge) Command(ctx context.Context, args ...string) (ExecResult, error) {
	args = append(args, "--state", EdgeStateDir)
	return e.f.RunOnce(ctx, e.Name+"-"+args[0], e.f.s.Images.Edge,
		tcnetwork.WithNetwork(nil, e.f.Site),
		testcontainers.WithMounts(testcontainers.VolumeMount(e.Volume, EdgeStateDir)),
		testcontainers.WithCmd(args...))
}

// Kill kills `edge run` with SIGKILL: no goodbye.
func (e *Edge) Kill(ctx context.Context) error { return e.f.s.Kill(ctx, e.ContainerID()) }

// Stop stops `edge run` with SIGTERM: it says goodbye.
func (e *Edge) Stop(ctx context.Context) error {
	secs := 10
	_, err := e.f.s.Docker.ContainerStop(ctx, e.ContainerID(), client.ContainerStopOptions{Timeout: &secs})
	return err
}

// Restart starts the stopped `edge run` container again, with the same
// state volume and container file system.
func (e *Edge) Restart(ctx context.Context) error {
	_, err := e.f.s.Docker.ContainerStart(ctx, e.ContainerID(), client.ContainerStartOptions{})
	return err
}

// Partition cuts the edge off its site network (a link cut: its packets go
// nowhere, and nothing reaches it).
func (e *Edge) Partition(ctx context.Context) error {
	return e.f.NetworkDisconnect(ctx, e.f.Site, e.ContainerID())
}

// Heal puts the edge back on its site network under its name.
func (e *Edge) Heal(ctx context.Context) error {
	return e.f.NetworkConnect(ctx, e.f.Site, e.ContainerID(), e.Name)
}

// Exited reports whether `edge run` has exited, and its exit code.
func (e *Edge) Exited(ctx context.Context) (bool, int, error) {
	st, err := e.f.s.State(ctx, e.ContainerID())
	if err != nil {
		return false, 0, err
	}
	return !st.Running && !st.Restarting && st.Status != "created", st.ExitCode, nil
}

// Logs are the `edge run` container's stdout and stderr.
func (e *Edge) Logs(ctx context.Context) (string, string, error) {
	return e.f.s.Logs(ctx, e.ContainerID())
}

// Sidecar starts a testkit container with args (e.g. "sleep").
func (f *Fleet) Sidecar(ctx context.Context, role string, args []string, opts ...testcontainers.ContainerCustomizer) (*testcontainers.DockerContainer, error) {
	opts = append(opts, testcontainers.WithCmd(args...))
	return f.Run(ctx, role, f.s.Images.Testkit, opts...)
}

// WithNetworkOf places a container in another container's network
// namespace: it sees exactly what that container sees.
func WithNetworkOf(containerID string) testcontainers.CustomizeRequestOption {
	return testcontainers.WithHostConfigModifier(func(h *container.HostConfig) {
		h.NetworkMode = container.NetworkMode("container:" + containerID)
	})
}
