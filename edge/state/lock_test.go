package state_test

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/llorch/llorch/edge/state"
)

func mustLock(tb testing.TB, dir string) func() error {
	tb.Helper()
	release, err := state.Lock(dir)
	if err != nil {
		tb.Fatalf("Lock(%s): %v", dir, err)
	}
	tb.Cleanup(func() { release() })
	return release
}

func TestLockRefusesSecondHolder(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state") // missing: Lock creates it
	release := mustLock(t, dir)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state directory: %v, mode %v; want it created 0700", err, fi.Mode())
	}

	_, err := state.Lock(dir)
	if !errors.Is(err, state.ErrLocked) {
		t.Fatalf("second Lock = %v, want ErrLocked", err)
	}
	want := fmt.Sprintf("state directory %s is in use by another edge agent (pid %d); stop it first", dir, os.Getpid())
	if err.Error() != want {
		t.Errorf("second Lock says %q\nwant %q", err, want)
	}

	if err := release(); err != nil {
		t.Fatalf("release: %v", err)
	}
	if err := release(); err != nil {
		t.Errorf("second release: %v", err)
	}
	again := mustLock(t, dir)
	if err := again(); err != nil {
		t.Fatal(err)
	}
}

func TestLockLeavesIdentityAlone(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t)
	mustLock(t, dir)
	id := ca.identity(t, "node-1")
	mustSave(t, dir, id)
	mustSave(t, dir, ca.identity(t, "node-1")) // removes stale generations
	if _, err := os.Stat(filepath.Join(dir, "edge.lock")); err != nil {
		t.Errorf("Save removed the lock file: %v", err)
	}
	mustLoad(t, dir)
}

func TestLockDirectoryIsAFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := state.Lock(path); err == nil || errors.Is(err, state.ErrLocked) {
		t.Fatalf("Lock of a file = %v, want an error that is not ErrLocked", err)
	}
}

// holderEnv makes the test binary a child that takes the lock, says so and
// waits to be killed (see TestLockDiesWithProcess).
const holderEnv = "LLORCH_TEST_LOCK_HOLDER"

func TestMain(m *testing.M) {
	if dir := os.Getenv(holderEnv); dir != "" {
		if _, err := state.Lock(dir); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println("locked")
		select {}
	}
	os.Exit(m.Run())
}

// The lock is the kernel's: another process holding it is refused with its
// PID named, and a holder killed with SIGKILL leaves nothing to clean up.
func TestLockDiesWithProcess(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holderEnv+"="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case l := <-line:
		if l != "locked" {
			t.Fatalf("child: %q", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("child did not take the lock")
	}

	_, err = state.Lock(dir)
	if !errors.Is(err, state.ErrLocked) || !strings.Contains(err.Error(), fmt.Sprintf("(pid %d)", cmd.Process.Pid)) {
		t.Fatalf("Lock while the child holds it = %v, want ErrLocked naming pid %d", err, cmd.Process.Pid)
	}

	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	mustLock(t, dir)
}
