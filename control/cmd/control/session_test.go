package main_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

type node struct {
	ID           string `json:"id"`
	Name         string `json:"name"`
	Status       string `json:"status"`
	StatusReason string `json:"status_reason"`
}

func nodeStatus(tb testing.TB, data, id string) node {
	tb.Helper()
	r := run(tb, "control", "node", "show", id, "--json", "--data", data)
	var n node
	if err := json.Unmarshal([]byte(r.stdout), &n); err != nil {
		tb.Fatalf("node show: %v: %+v", err, r)
	}
	return n
}

func waitStatus(tb testing.TB, data, id, want string, within time.Duration) time.Duration {
	tb.Helper()
	start := time.Now()
	for time.Since(start) < within {
		if nodeStatus(tb, data, id).Status == want {
			return time.Since(start)
		}
		time.Sleep(50 * time.Millisecond)
	}
	tb.Fatalf("node %s not %s within %s (now %+v)", id, want, within, nodeStatus(tb, data, id))
	return 0
}

// listeningSockets returns the TCP/UDP sockets in LISTEN state that process
// pid holds, read from /proc like `ss -ltnp` does.
func listeningSockets(tb testing.TB, pid int) []string {
	tb.Helper()
	inodes := map[string]bool{}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, fd := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	var listening []string
	for _, table := range []string{"tcp", "tcp6"} {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) > 9 && f[3] == "0A" && inodes[f[9]] { // 0A = LISTEN
				listening = append(listening, table+" "+f[1])
			}
		}
	}
	return listening
}

func TestEdgeSessionAsProcesses(t *testing.T) {
	work := t.TempDir()
	data := filepath.Join(work, "data")
	cmd := exec.Command(filepath.Join(bin, "control"), "serve", "--data", data, "--listen", "127.0.0.1:0", "--heartbeat-interval", "1s", "--offline-after", "3s")
	url := startServe(t, cmd)

	token := oneLine(t, "token create", run(t, "control", "token", "create", "--data", data, "--name", "gpu-1").stdout)
	state := filepath.Join(work, "state")
	if r := run(t, "edge", "enroll", "--token", token, "--control", url, "--state", state); r.code != 0 {
		t.Fatalf("enroll: %+v", r)
	}
	var id struct {
		NodeID string `json:"node_id"`
	}
	raw, _ := os.ReadFile(filepath.Join(state, "current", "identity.json"))
	json.Unmarshal(raw, &id)

	edgeRun := func() *exec.Cmd {
		c := exec.Command(filepath.Join(bin, "edge"), "run", "--state", state, "--engines-dir", filepath.Join(work, "engines"))
		c.Stderr = logOnFailure(t, "edge run")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
		return c
	}
	edge := edgeRun()
	waitStatus(t, data, id.NodeID, "online", 5*time.Second)
	if l := listeningSockets(t, edge.Process.Pid); len(l) > 0 {
		t.Fatalf("the edge listens: %v", l)
	}

	// kill -9: offline within the threshold plus one interval.
	edge.Process.Signal(syscall.SIGKILL)
	edge.Wait()
	took := waitStatus(t, data, id.NodeID, "offline", 3*time.Second+time.Second+500*time.Millisecond)
	t.Logf("offline %s after kill -9", took.Round(10*time.Millisecond))

	// Restart: same node, back online, no new enrollment.
	edge = edgeRun()
	waitStatus(t, data, id.NodeID, "online", 5*time.Second)

	// SIGTERM: goodbye, offline at once with reason shutdown, exit 0.
	edge.Process.Signal(syscall.SIGTERM)
	took = waitStatus(t, data, id.NodeID, "offline", 2*time.Second)
	if err := edge.Wait(); err != nil {
		t.Errorf("edge run after SIGTERM: %v, want exit 0", err)
	}
	if n := nodeStatus(t, data, id.NodeID); n.StatusReason != "shutdown" {
		t.Errorf("reason %q, want shutdown", n.StatusReason)
	}
	t.Logf("offline %s after SIGTERM", took.Round(10*time.Millisecond))
	list := run(t, "control", "node", "list", "--json", "--data", data)
	var nodes []node
	json.Unmarshal([]byte(list.stdout), &nodes)
	if len(nodes) != 1 {
		t.Fatalf("%d nodes, want 1: %s", len(nodes), list.stdout)
	}
}

// control dev is the README's first command: a control plane and one local
// edge, online, and a restart reuses the edge's identity.
func TestDev(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	for round := range 2 {
		cmd := exec.Command(filepath.Join(bin, "control"), "dev", "--dir", dir, "--listen", "127.0.0.1:0")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = logOnFailure(t, "control dev")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		nodeIDs := make(chan string, 1)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if rest, ok := strings.CutPrefix(sc.Text(), "local edge: node "); ok {
					nodeIDs <- strings.Fields(rest)[0]
				}
			}
		}()
		var id string
		select {
		case id = <-nodeIDs:
		case <-time.After(30 * time.Second):
			t.Fatal("control dev did not start its edge")
		}
		data := filepath.Join(dir, "control")
		waitStatus(t, data, id, "online", 15*time.Second)
		list := run(t, "control", "node", "list", "--json", "--data", data)
		var nodes []node
		json.Unmarshal([]byte(list.stdout), &nodes)
		if len(nodes) != 1 {
			t.Fatalf("round %d: %d nodes, want 1 (a restart must reuse the edge's identity)", round, len(nodes))
		}
		if round == 1 {
			// The first run stopped its edge before its control plane, so the
			// edge's goodbye was recorded.
			if events := run(t, "control", "node", "events", id, "--data", data).stdout; !strings.Contains(events, "online -> offline: shutdown") {
				t.Fatalf("after control dev stopped, the local edge's goodbye is not in its events:\n%s", events)
			}
		}
		cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			t.Fatalf("control dev after SIGTERM: %v", err)
		}
	}
}

// Remote admin: --server with the CA fingerprint pinned and the API token.
func TestRemoteAdmin(t *testing.T) {
	const token = "b1e3c7a90d5f42e6a8c19d07f3b5e2a4"
	data := filepath.Join(t.TempDir(), "data")
	cmd := exec.Command(filepath.Join(bin, "control"), "serve", "--data", data, "--listen", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "LLORCH_API_TOKEN="+token)
	url := startServeEnv(t, cmd)
	fp := oneLine(t, "ca show", run(t, "control", "ca", "show", "--data", data).stdout)

	remote := func(env []string, args ...string) result {
		c := exec.Command(filepath.Join(bin, "control"), args...)
		c.Env = append(os.Environ(), env...)
		var out, errb strings.Builder
		c.Stdout, c.Stderr = &out, &errb
		err := c.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return result{out.String(), errb.String(), code}
	}
	ok := remote([]string{"LLORCH_API_TOKEN=" + token}, "token", "create", "--server", url, "--ca-fingerprint", fp, "--name", "far")
	if ok.code != 0 {
		t.Fatalf("remote token create: %+v", ok)
	}
	oneLine(t, "remote token create", ok.stdout)
	tests := []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"wrong token", []string{"LLORCH_API_TOKEN=" + strings.Repeat("x", 32)}, []string{"--ca-fingerprint", fp}, "invalid API token"},
		{"no token", []string{"LLORCH_API_TOKEN="}, []string{"--ca-fingerprint", fp}, "LLORCH_API_TOKEN"},
		{"no fingerprint", []string{"LLORCH_API_TOKEN=" + token}, nil, "--ca-fingerprint"},
		{"wrong fingerprint", []string{"LLORCH_API_TOKEN=" + token}, []string{"--ca-fingerprint", "sha256:" + strings.Repeat("0", 64)}, "does not match"},
	}
	for _, tt := range tests {
		args := append([]string{"node", "list", "--server", url}, tt.args...)
		r := remote(tt.env, args...)
		if r.code == 0 || !strings.Contains(oneLine(t, tt.name, r.stderr), tt.want) {
			t.Errorf("%s: %+v, want one line with %q", tt.name, r, tt.want)
		}
	}
}

// `node events --follow` against a remote control plane keeps streaming for
// longer than any of the client's or the server's timeouts (30 s).
func TestRemoteFollowOutlivesTimeouts(t *testing.T) {
	t.Parallel()
	const token = "b1e3c7a90d5f42e6a8c19d07f3b5e2a4"
	data := filepath.Join(t.TempDir(), "data")
	cmd := exec.Command(filepath.Join(bin, "control"), "serve", "--data", data, "--listen", "127.0.0.1:0",
		"--idle-timeout", "2s", "--body-timeout", "2s")
	cmd.Env = append(os.Environ(), "LLORCH_API_TOKEN="+token)
	url := startServeEnv(t, cmd)
	fp := oneLine(t, "ca show", run(t, "control", "ca", "show", "--data", data).stdout)
	follow := exec.Command(filepath.Join(bin, "control"), "node", "events", "--follow", "--limit", "0", "--server", url, "--ca-fingerprint", fp)
	follow.Env = append(os.Environ(), "LLORCH_API_TOKEN="+token)
	out, err := follow.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	follow.Stderr = logOnFailure(t, "follow")
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { follow.Process.Kill(); follow.Wait() })
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	time.Sleep(35 * time.Second) // what is tested is that nothing ends the stream meanwhile
	run(t, "control", "token", "create", "--data", data, "--name", "late")
	select {
	case l, ok := <-lines:
		if !ok || !strings.Contains(l, "token_created") {
			t.Fatalf("after 35 s the follower printed %q (open: %v), want the new token's event", l, ok)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the follower printed nothing for the event recorded after 35 s")
	}
}
