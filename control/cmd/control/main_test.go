package main_test

// These tests run the real binaries the way the README does, including a
// kill -9 of the control plane.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "llorch-bin-")
	if err != nil {
		panic(err)
	}
	bin = dir
	for _, pkg := range []string{"control", "edge"} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, pkg), "github.com/llorch/llorch/"+pkg+"/cmd/"+pkg).CombinedOutput()
		if err != nil {
			panic("build " + pkg + ": " + string(out))
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type result struct {
	stdout, stderr string
	code           int
}

func run(tb testing.TB, name string, args ...string) result {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, name), args...)
	cmd.Env = append(os.Environ(), "LLORCH_ENROLL_TOKEN=", "LLORCH_API_TOKEN=", "LLORCH_DATA=", "LLORCH_EDGE_STATE=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		tb.Fatalf("%s %v: %v", name, args, err)
	}
	return result{out.String(), errb.String(), code}
}

// serve starts `control serve` and returns its URL once it listens.
func serve(tb testing.TB, data string) (*exec.Cmd, string) {
	tb.Helper()
	cmd := exec.Command(filepath.Join(bin, "control"), "serve", "--data", data, "--listen", "127.0.0.1:0")
	return cmd, startServe(tb, cmd)
}

// startServe starts a `control serve` command without an API token and
// returns its URL once it listens.
func startServe(tb testing.TB, cmd *exec.Cmd) string {
	tb.Helper()
	cmd.Env = append(os.Environ(), "LLORCH_API_TOKEN=")
	return startServeEnv(tb, cmd)
}

// startServeEnv starts a `control serve` command with its own environment.
func startServeEnv(tb testing.TB, cmd *exec.Cmd) string {
	tb.Helper()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stderr = logOnFailure(tb, "control")
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if _, u, ok := strings.Cut(sc.Text(), " listening on "); ok {
				urls <- u
			}
		}
	}()
	select {
	case u := <-urls:
		return u
	case <-time.After(30 * time.Second):
		tb.Fatal("control serve did not start listening")
		return ""
	}
}

func oneLine(tb testing.TB, what, s string) string {
	tb.Helper()
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) != 1 || lines[0] == "" {
		tb.Fatalf("%s printed %d lines, want exactly one: %q", what, len(lines), s)
	}
	return lines[0]
}

func TestReadmeFlowWithKill9(t *testing.T) {
	work := t.TempDir()
	data := filepath.Join(work, "data")
	srv, _ := serve(t, data)

	created := run(t, "control", "token", "create", "--data", data, "--name", "gpu-1", "--label", "zone=lab")
	if created.code != 0 {
		t.Fatalf("token create: %+v", created)
	}
	token := oneLine(t, "token create", created.stdout)

	// The token was acknowledged; kill -9 right away, then restart.
	srv.Process.Signal(syscall.SIGKILL)
	srv.Wait()
	_, url := serve(t, data)

	tokenFile := filepath.Join(work, "token")
	os.WriteFile(tokenFile, []byte(token+"\n"), 0o600)
	state := filepath.Join(work, "state")
	enrolled := run(t, "edge", "enroll", "--token-file", tokenFile, "--control", url, "--state", state)
	if enrolled.code != 0 {
		t.Fatalf("enroll after kill -9 and restart: %+v", enrolled)
	}
	key := filepath.Join(state, "current", "node.key")
	if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file %s: %v, mode %v; want 0600", key, err, fi.Mode())
	}
	if _, err := exec.LookPath("openssl"); err == nil {
		crt := filepath.Join(state, "current", "node.crt")
		out, err := exec.Command("openssl", "verify", "-CAfile", filepath.Join(state, "current", "ca.crt"), "-untrusted", crt, crt).CombinedOutput()
		if err != nil || !strings.Contains(string(out), ": OK") {
			t.Errorf("openssl verify: %v: %s", err, out)
		}
	}

	// Enrolling again with the identity on disk spends nothing.
	again := run(t, "edge", "enroll", "--token-file", tokenFile, "--control", url, "--state", state)
	if again.code != 0 || !strings.Contains(again.stdout, "already enrolled") {
		t.Fatalf("second enroll: %+v", again)
	}
	// The same token in another state directory is refused, with one clear line.
	reuse := run(t, "edge", "enroll", "--token-file", tokenFile, "--control", url, "--state", filepath.Join(work, "state2"))
	if reuse.code == 0 || !strings.Contains(oneLine(t, "refused enroll", reuse.stderr), "already been used") {
		t.Fatalf("reused token: %+v", reuse)
	}

	listed := run(t, "control", "node", "list", "--json", "--data", data)
	var nodes []struct {
		ID     string            `json:"id"`
		Name   string            `json:"name"`
		Status string            `json:"status"`
		Labels map[string]string `json:"labels"`
	}
	if err := json.Unmarshal([]byte(listed.stdout), &nodes); err != nil || len(nodes) != 1 {
		t.Fatalf("node list --json: %v: %+v", err, listed)
	}
	if n := nodes[0]; n.Name != "gpu-1" || n.Status != "enrolled" || n.Labels["zone"] != "lab" {
		t.Fatalf("node = %+v", n)
	}

	if st := run(t, "edge", "status", "--state", state); st.code != 0 || !strings.Contains(st.stdout, nodes[0].ID) {
		t.Fatalf("edge status: %+v", st)
	}
	if rm := run(t, "control", "node", "remove", nodes[0].ID, "--data", data); rm.code != 0 {
		t.Fatalf("node remove: %+v", rm)
	}
	st := run(t, "edge", "status", "--state", state)
	if st.code == 0 || !strings.Contains(oneLine(t, "edge status", st.stderr), "revoked") {
		t.Fatalf("edge status after removal: %+v", st)
	}
}

func TestEveryCommandHasHelp(t *testing.T) {
	for _, c := range [][]string{
		{"control", "--help"}, {"control", "serve", "--help"}, {"control", "dev", "--help"},
		{"control", "token", "create", "--help"}, {"control", "token", "list", "--help"}, {"control", "token", "revoke", "--help"},
		{"control", "node", "list", "--help"}, {"control", "node", "show", "--help"}, {"control", "node", "remove", "--help"},
		{"control", "node", "events", "--help"}, {"control", "ca", "show", "--help"},
		{"edge", "--help"}, {"edge", "enroll", "--help"}, {"edge", "status", "--help"}, {"edge", "run", "--help"},
	} {
		if r := run(t, c[0], c[1:]...); r.code != 0 || !strings.Contains(r.stdout, "Usage:") {
			t.Errorf("%v: exit %d, stdout %q", c, r.code, r.stdout)
		}
	}
}

func TestBadInputIsOneClearLine(t *testing.T) {
	data := t.TempDir()
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"control", "serve", "--data", data, "--listen", "0.0.0.0:0"}, "LLORCH_API_TOKEN"},
		{[]string{"control", "serve", "--data", data, "--trust-domain", "Not Valid"}, "trust domain"},
		{[]string{"control", "token", "create", "--data", data}, "no control plane is running"},
		{[]string{"control", "ca", "show", "--data", data}, "no CA"},
		{[]string{"control", "bogus"}, "unknown command"},
		{[]string{"edge", "enroll", "--state", data, "--control", "https://127.0.0.1:1"}, "no join token"},
		{[]string{"edge", "enroll", "--state", data, "--control", "https://127.0.0.1:1", "--token", "nope"}, "malformed"},
		{[]string{"edge", "status", "--state", data}, "not enrolled"},
		{[]string{"edge", "run", "--state", data}, "not enrolled"},
	}
	for _, tt := range tests {
		r := run(t, tt.args[0], tt.args[1:]...)
		if r.code == 0 || !strings.Contains(oneLine(t, strings.Join(tt.args, " "), r.stderr), tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want one line with %q", tt.args, r.code, r.stderr, tt.want)
		}
	}
}

// syncBuffer is a bytes.Buffer safe for the goroutine that copies a child's output.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logOnFailure collects a child process's log and shows it only if the test fails.
func logOnFailure(tb testing.TB, name string) *syncBuffer {
	b := &syncBuffer{}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("%s log:\n%s", name, b.String())
		}
	})
	return b
}

// A data directory or CA that others can write to, or a key others can
// read, makes `control serve` refuse to start with one clear line; a data
// directory others can only read is made private.
func TestServeRefusesUnsafeFiles(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	srv, _ := serve(t, data)
	srv.Process.Signal(syscall.SIGTERM)
	srv.Wait()
	ca := filepath.Join(data, "ca")
	tests := []struct {
		name  string
		plant func()
		undo  func()
		want  string
	}{
		{"world-writable CA directory", func() { os.Chmod(ca, 0o777) }, func() { os.Chmod(ca, 0o700) }, ca + " is writable by other users (mode 0777)"},
		{"group-readable CA directory", func() { os.Chmod(ca, 0o750) }, func() { os.Chmod(ca, 0o700) }, ca + " is readable by other users"},
		{"world-readable root key", func() { os.Chmod(filepath.Join(ca, "root.key"), 0o644) }, func() { os.Chmod(filepath.Join(ca, "root.key"), 0o600) }, "root.key is accessible to other users (mode 0644)"},
		{"readable ticket keys", func() { os.Chmod(filepath.Join(ca, "session-ticket.keys"), 0o640) }, func() { os.Chmod(filepath.Join(ca, "session-ticket.keys"), 0o600) }, "session-ticket.keys is accessible to other users"},
		{"world-writable data directory", func() { os.Chmod(data, 0o777) }, func() { os.Chmod(data, 0o700) }, data + " is writable by other users"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.plant()
			defer tt.undo()
			r := run(t, "control", "serve", "--data", data, "--listen", "127.0.0.1:0")
			if r.code == 0 || !strings.Contains(r.stderr, tt.want) {
				t.Fatalf("exit %d, stderr %q; want a refusal saying %q", r.code, r.stderr, tt.want)
			}
			oneLine(t, "the refusal", r.stderr)
		})
	}
	// A data directory others may only read (a `mkdir` under umask 022) is
	// made 0700, and the control plane starts.
	os.Chmod(data, 0o755)
	srv, _ = serve(t, data)
	srv.Process.Signal(syscall.SIGTERM)
	srv.Wait()
	if fi, _ := os.Stat(data); fi.Mode().Perm() != 0o700 {
		t.Errorf("data directory left at mode %o", fi.Mode().Perm())
	}
}

// The admin CLI talks only to a socket of its own user: a socket planted
// by another user in the data directory gets no commands (they could carry
// join tokens back to whoever planted it).
func TestCLIRefusesAnotherUsersSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("planting another user's socket needs root to chown it")
	}
	data := t.TempDir()
	os.Chmod(data, 0o700)
	l, err := net.Listen("unix", filepath.Join(data, "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	os.Chown(filepath.Join(data, "control.sock"), 12345, 12345)
	r := run(t, "control", "token", "create", "--data", data)
	if r.code == 0 || !strings.Contains(r.stderr, "owned by uid 12345") {
		t.Fatalf("exit %d, stderr %q: want a refusal naming the socket's owner", r.code, r.stderr)
	}
	oneLine(t, "the refusal", r.stderr)
}
