package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
)

// Paths and names inside the control plane container.
const (
	ControlBin     = "/usr/local/bin/control"
	ControlDataDir = "/var/lib/llorch"
	ControlDB      = ControlDataDir + "/llorch.db"
	ControlPort    = "8443"
)

// Node is a node as `control node list|show --json` prints it.
type Node struct {
	ID                string            `json:"id"`
	Name              string            `json:"name"`
	Status            string            `json:"status"`
	StatusReason      string            `json:"status_reason"`
	LastSeen          *time.Time        `json:"last_seen"`
	Draining          bool              `json:"draining"`
	Labels            map[string]string `json:"labels"`
	TokenID           string            `json:"token_id"`
	CertificateSerial string            `json:"certificate_serial"`
	GPUs              []json.RawMessage `json:"gpus"`
	GPUUnavailable    string            `json:"gpu_unavailable"`
	Pools             []Pool            `json:"pools"`
	HandoffErrors     []struct {
		File   string `json:"file"`
		Reason string `json:"reason"`
	} `json:"handoff_errors"`
}

// Pool is an engine pool a node reports.
type Pool struct {
	ID       string    `json:"id"`
	Engine   string    `json:"engine"`
	Model    string    `json:"model"`
	Ready    bool      `json:"ready"`
	Replicas []Replica `json:"replicas"`
}

// Replica is one engine replica of a pool.
type Replica struct {
	ID         string `json:"id"`
	URL        string `json:"url"`
	Ready      bool   `json:"ready"`
	ProbeError string `json:"probe_error"`
}

// Event is a recorded event as `control node events --json` prints it.
type Event struct {
	ID     int64     `json:"id"`
	Time   time.Time `json:"time"`
	NodeID string    `json:"node_id"`
	Kind   string    `json:"kind"`
	// From and To are a status event's move.
	From      string `json:"from"`
	To        string `json:"to"`
	Reason    string `json:"reason"`
	Coalesced int    `json:"coalesced"`
}

// Token is a join token as `control token list --json` prints it.
type Token struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	MaxUses int    `json:"max_uses"`
	Uses    int    `json:"uses"`
	Revoked bool   `json:"revoked"`
	State   string `json:"state"`
}

// ControlPlane is the control plane container.
type ControlPlane struct {
	s           *Suite
	C           *testcontainers.DockerContainer
	ID          string // container ID
	Fingerprint string // CA fingerprint
}

// Admin runs `control ARGS --data DATA` in the container (the admin
// socket) and returns what it did; the error is Docker's, not the command's.
func (cp *ControlPlane) Admin(ctx context.Context, args ...string) (ExecResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	cmd := append([]string{ControlBin}, args...)
	cmd = append(cmd, "--data", ControlDataDir)
	return cp.s.Exec(ctx, cp.ID, cmd...)
}

// AdminOK runs an admin command that must succeed and returns its stdout.
func (cp *ControlPlane) AdminOK(ctx context.Context, args ...string) (string, error) {
	res, err := cp.Admin(ctx, args...)
	if err != nil {
		return "", err
	}
	if res.Code != 0 {
		return "", fmt.Errorf("control %s: %s", strings.Join(args, " "), res)
	}
	return res.Stdout, nil
}

func (cp *ControlPlane) adminJSON(ctx context.Context, v any, args ...string) error {
	out, err := cp.AdminOK(ctx, args...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("control %s: %w in %q", strings.Join(args, " "), err, out)
	}
	return nil
}

// Nodes lists the nodes.
func (cp *ControlPlane) Nodes(ctx context.Context) ([]Node, error) {
	var ns []Node
	return ns, cp.adminJSON(ctx, &ns, "node", "list", "--json")
}

// Node shows one node.
func (cp *ControlPlane) Node(ctx context.Context, id string) (Node, error) {
	var n Node
	return n, cp.adminJSON(ctx, &n, "node", "show", id, "--json")
}

// Events lists the recorded events (all nodes when nodeID is ""), oldest first.
func (cp *ControlPlane) Events(ctx context.Context, nodeID string) ([]Event, error) {
	args := []string{"node", "events", "--json", "--limit", "10000"}
	if nodeID != "" {
		args = append(args, nodeID)
	}
	var es []Event
	if err := cp.adminJSON(ctx, &es, args...); err != nil {
		return nil, err
	}
	// Printed newest first.
	for i, j := 0, len(es)-1; i < j; i, j = i+1, j-1 {
		es[i], es[j] = es[j], es[i]
	}
	return es, nil
}

// Tokens lists the join tokens.
func (cp *ControlPlane) Tokens(ctx context.Context) ([]Token, error) {
	var ts []Token
	return ts, cp.adminJSON(ctx, &ts, "token", "list", "--json")
}

// CreateToken creates a join token and returns it and its ID. args are
// extra flags (--uses, --label, --ttl).
func (cp *ControlPlane) CreateToken(ctx context.Context, name string, args ...string) (token, id string, err error) {
	out, err := cp.AdminOK(ctx, append([]string{"token", "create", "--name", name}, args...)...)
	if err != nil {
		return "", "", err
	}
	token = strings.TrimSpace(out)
	if strings.Count(out, "\n") != 1 {
		return "", "", fmt.Errorf("token create printed %q, want exactly one line", out)
	}
	id, err = TokenID(token)
	return token, id, err
}

// TokenID is the ID part of a join token (llorch1.<fingerprint>.<id>.<secret>).
func TokenID(token string) (string, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 4 || parts[0] != "llorch1" {
		return "", fmt.Errorf("%q is not a join token", token)
	}
	return parts[2], nil
}

// Ready reports whether the control plane answers on its admin socket.
func (cp *ControlPlane) Ready(ctx context.Context) (bool, string, error) {
	ns, err := cp.Nodes(ctx)
	if err != nil {
		return false, "", err
	}
	return true, fmt.Sprintf("%d nodes", len(ns)), nil
}

// Kill kills the control plane with SIGKILL.
func (cp *ControlPlane) Kill(ctx context.Context) error { return cp.s.Kill(ctx, cp.ID) }

// Stop stops the control plane with SIGTERM (SIGKILL after grace).
func (cp *ControlPlane) Stop(ctx context.Context, grace time.Duration) error {
	secs := int(grace.Seconds())
	_, err := cp.s.Docker.ContainerStop(ctx, cp.ID, client.ContainerStopOptions{Timeout: &secs})
	return err
}

// Start starts the stopped control plane container again (same data) and
// waits until it answers; it returns when it did.
func (cp *ControlPlane) Start(t testing.TB, ctx context.Context) time.Time {
	t.Helper()
	if _, err := cp.s.Docker.ContainerStart(ctx, cp.ID, client.ContainerStartOptions{}); err != nil {
		t.Fatalf("start the control plane again: %v", err)
	}
	WaitFor(t, ctx, "the control plane to answer after its start", 30*time.Second, cp.Ready)
	return time.Now()
}

// Pause freezes the control plane (cgroup freezer), Unpause thaws it.
func (cp *ControlPlane) Pause(ctx context.Context) error {
	_, err := cp.s.Docker.ContainerPause(ctx, cp.ID, client.ContainerPauseOptions{})
	return err
}

// Unpause thaws a paused control plane.
func (cp *ControlPlane) Unpause(ctx context.Context) error {
	_, err := cp.s.Docker.ContainerUnpause(ctx, cp.ID, client.ContainerUnpauseOptions{})
	return err
}
