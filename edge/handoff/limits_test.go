package handoff_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/llorch/llorch/edge/handoff"
)

func mkfifo(t *testing.T, path string) {
	t.Helper()
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// errorFor returns the snapshot's error for file, or "".
func errorFor(s handoff.Snapshot, file string) string {
	for _, e := range s.Errors {
		if e.File == file {
			return e.Reason
		}
	}
	return ""
}

// A FIFO named like a handoff file neither hangs the scan (waitFor's
// deadline bounds it) nor stops the other files being read.
func TestFIFOIsReportedNotRead(t *testing.T) {
	dir := t.TempDir()
	mkfifo(t, filepath.Join(dir, "pipe.json"))
	writeFile(t, dir, "good.json", handoffJSON("pool-0", "r0", "http://127.0.0.1:1", 1))
	w := startWatcher(t, dir)
	s := waitFor(t, w, "the FIFO reported beside the good file", func(s handoff.Snapshot) bool {
		return errorFor(s, "pipe.json") != "" && hasReplica("pool-0", "r0", nil)(s)
	})
	if got := errorFor(s, "pipe.json"); got != "not a regular file (fifo)" {
		t.Errorf("pipe.json: reason %q, want \"not a regular file (fifo)\"", got)
	}
	// Scans go on.
	writeFile(t, dir, "later.json", handoffJSON("pool-0", "r1", "http://127.0.0.1:1", 1))
	waitFor(t, w, "a file written after the FIFO", hasReplica("pool-0", "r1", nil))
}

// A FIFO that replaces a file between the directory's Stat and the open is
// opened without waiting for a writer and refused on fstat.
func TestReadFileRefusesFIFOOnceOpen(t *testing.T) {
	dir := t.TempDir()
	mkfifo(t, filepath.Join(dir, "pipe.json"))
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	type result struct {
		data []byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		data, _, err := handoff.ReadFile(root, "pipe.json")
		done <- result{data, err}
	}()
	select {
	case r := <-done:
		if r.err == nil || r.err.Error() != "not a regular file (fifo)" {
			t.Errorf("ReadFile(fifo) = %q, %v; want \"not a regular file (fifo)\"", r.data, r.err)
		}
	case <-time.After(waitLimit):
		// Unblock the open so the goroutine ends.
		if f, err := os.OpenFile(filepath.Join(dir, "pipe.json"), os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
		t.Fatal("ReadFile blocked on a FIFO")
	}
}

func TestSymlinks(t *testing.T) {
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret.json")
	// Valid handoff content: if it were read, a replica would show.
	if err := os.WriteFile(secret, []byte(handoffJSON("stolen", "r0", "http://127.0.0.1:1", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	parent := t.TempDir()
	dir := filepath.Join(parent, "engines")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(parent, "x.json"), []byte(handoffJSON("stolen", "r1", "http://127.0.0.1:1", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, ".real.json", handoffJSON("pool-0", "r0", "http://127.0.0.1:1", 1)) // hidden: only reached through the link
	symlink(t, secret, filepath.Join(dir, "absolute.json"))
	symlink(t, "../x.json", filepath.Join(dir, "dotdot.json"))
	symlink(t, ".real.json", filepath.Join(dir, "inside.json"))
	symlink(t, "/etc/shadow", filepath.Join(dir, "shadow.json"))

	w := startWatcher(t, dir)
	s := waitFor(t, w, "the links resolved", func(s handoff.Snapshot) bool {
		return len(s.Errors) == 3 && hasReplica("pool-0", "r0", nil)(s)
	})
	for _, file := range []string{"absolute.json", "dotdot.json", "shadow.json"} {
		t.Logf("%s: %s", file, errorFor(s, file))
		if got := errorFor(s, file); !strings.Contains(got, "symlink not followed") {
			t.Errorf("%s: reason %q, want it to say the symlink was not followed", file, got)
		}
	}
	if len(s.Replicas) != 1 || s.Replicas[0].File != "inside.json" {
		t.Errorf("replicas = %+v, want only pool-0/r0 from inside.json", s.Replicas)
	}
	if p := s.Pools(); len(p) != 1 || p[0].ID != "pool-0" {
		t.Errorf("pools = %+v: a file outside the directory was read", p)
	}
}

func TestOversizeFile(t *testing.T) {
	dir := t.TempDir()
	// Valid JSON, padded past the cap with white space: only the cap refuses it.
	big := handoffJSON("pool-0", "r0", "http://127.0.0.1:1", 1) + strings.Repeat(" ", handoff.MaxFileSize)
	writeFile(t, dir, "big.json", big)
	atCap := handoffJSON("pool-0", "r1", "http://127.0.0.1:1", 1)
	atCap += strings.Repeat(" ", handoff.MaxFileSize-len(atCap))
	writeFile(t, dir, "at-cap.json", atCap)
	w := startWatcher(t, dir)
	s := waitFor(t, w, "the oversize file reported", func(s handoff.Snapshot) bool { return len(s.Errors) == 1 && len(s.Replicas) == 1 })
	if got := errorFor(s, "big.json"); got != "larger than 64 KiB" {
		t.Errorf("big.json: reason %q, want \"larger than 64 KiB\"", got)
	}
	if !hasReplica("pool-0", "r1", nil)(s) {
		t.Errorf("a file of exactly %d bytes was refused: %+v", handoff.MaxFileSize, s)
	}
}

// lockedBuffer collects log output from the watcher's goroutine.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), s)
}

func TestReplicaAndErrorCaps(t *testing.T) {
	const files, bad = 300, 70
	dir := t.TempDir()
	for i := range files {
		writeFile(t, dir, fmt.Sprintf("r%03d.json", i), handoffJSON("pool-0", fmt.Sprintf("r%03d", i), "http://127.0.0.1:1", 1))
	}
	for i := range bad {
		writeFile(t, dir, fmt.Sprintf("bad%03d.json", i), "{")
	}
	var logs lockedBuffer
	w := startWatcher(t, dir, func(c *handoff.Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	})
	s := waitFor(t, w, "the caps to apply", func(s handoff.Snapshot) bool {
		return len(s.Replicas)+s.DroppedReplicas == files && len(s.Errors)+s.DroppedErrors == bad
	})
	if len(s.Replicas) != handoff.MaxReplicas || s.DroppedReplicas != files-handoff.MaxReplicas {
		t.Errorf("%d replicas reported, %d dropped; want %d and %d", len(s.Replicas), s.DroppedReplicas, handoff.MaxReplicas, files-handoff.MaxReplicas)
	}
	// Stable: the first files by name.
	for i, r := range s.Replicas {
		if want := fmt.Sprintf("r%03d.json", i); r.File != want {
			t.Fatalf("replica %d from %s, want %s (the first files by name)", i, r.File, want)
		}
	}
	if len(s.Errors) != handoff.MaxErrors || s.DroppedErrors != bad-handoff.MaxErrors {
		t.Errorf("%d errors reported, %d dropped; want %d and %d", len(s.Errors), s.DroppedErrors, handoff.MaxErrors, bad-handoff.MaxErrors)
	}
	if last := s.Errors[len(s.Errors)-1].File; last != fmt.Sprintf("bad%03d.json", handoff.MaxErrors-1) {
		t.Errorf("last error reported is for %s, want the first %d files by name", last, handoff.MaxErrors)
	}

	// More scans, one more change: still one warning per cap.
	writeFile(t, dir, "r999.json", handoffJSON("pool-0", "r999", "http://127.0.0.1:1", 1))
	waitFor(t, w, "one more dropped", func(s handoff.Snapshot) bool { return s.DroppedReplicas == files+1-handoff.MaxReplicas })
	if n := logs.count("more engine replicas handed off than a heartbeat carries"); n != 1 {
		t.Errorf("replica cap warned %d times, want once", n)
	}
	if n := logs.count("more bad engine handoff files than a heartbeat carries"); n != 1 {
		t.Errorf("error cap warned %d times, want once", n)
	}

	// Below the caps again, everything is reported.
	for i := handoff.MaxReplicas - 10; i < files; i++ {
		removeFile(t, dir, fmt.Sprintf("r%03d.json", i))
	}
	removeFile(t, dir, "r999.json")
	// (A scan may land while the files are being removed: wait for the end.)
	waitFor(t, w, "every replica left reported, none dropped", func(s handoff.Snapshot) bool {
		return s.DroppedReplicas == 0 && len(s.Replicas) == handoff.MaxReplicas-10
	})
}
