package private_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/llorch/llorch/internal/private"
)

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestDir(t *testing.T) {
	base := t.TempDir()
	fresh := filepath.Join(base, "fresh", "data")
	if was, err := private.Dir(fresh, false); err != nil || was != 0 || mode(t, fresh) != 0o700 {
		t.Fatalf("a new directory: was %o, %v, mode %o; want created 0700", was, err, mode(t, fresh))
	}
	readable := filepath.Join(base, "readable")
	os.Mkdir(readable, 0o755)
	os.Chmod(readable, 0o755)
	var perr *private.Error
	if _, err := private.Dir(readable, false); !errors.As(err, &perr) || !strings.Contains(err.Error(), "readable by other users (mode 0755)") {
		t.Errorf("a readable directory, not tightened: %v", err)
	}
	if was, err := private.Dir(readable, true); err != nil || was != 0o755 || mode(t, readable) != 0o700 {
		t.Errorf("a readable directory, tightened: was %o, %v, now %o", was, err, mode(t, readable))
	}
	for _, m := range []os.FileMode{0o777, 0o770, 0o702, 0o1777} {
		w := filepath.Join(base, "writable")
		os.Mkdir(w, 0o700)
		os.Chmod(w, m)
		if _, err := private.Dir(w, true); !errors.As(err, &perr) || !strings.Contains(err.Error(), "writable by other users") {
			t.Errorf("mode %o: %v, want refused as writable", m, err)
		}
		if mode(t, w)&0o022 == 0 {
			t.Errorf("mode %o was changed: a writable directory is refused, not fixed", m)
		}
		os.Remove(w)
	}
	file := filepath.Join(base, "file")
	os.WriteFile(file, nil, 0o600)
	if _, err := private.Dir(file, true); err == nil {
		t.Error("a file taken for a directory")
	}
}

func TestFile(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "root.key")
	if err := private.File(key); err != nil {
		t.Errorf("a missing file: %v", err)
	}
	os.WriteFile(key, []byte("k"), 0o600)
	if err := private.File(key); err != nil {
		t.Errorf("a 0600 file: %v", err)
	}
	for _, m := range []os.FileMode{0o644, 0o640, 0o604, 0o666} {
		os.Chmod(key, m)
		if err := private.File(key); err == nil || !strings.Contains(err.Error(), "accessible to other users") {
			t.Errorf("mode %o: %v, want refused", m, err)
		}
	}
	link := filepath.Join(dir, "link.key")
	os.Symlink(key, link)
	if err := private.File(link); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("a symlink: %v", err)
	}
}

func TestSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "control.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := private.Socket(sock); err != nil {
		t.Errorf("our own socket: %v", err)
	}
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, nil, 0o600)
	if err := private.Socket(plain); err == nil {
		t.Error("a file taken for a socket")
	}
	if os.Geteuid() != 0 {
		t.Skip("checking another user's socket needs root to chown it")
	}
	os.Chown(sock, 12345, 12345)
	if err := private.Socket(sock); err == nil {
		t.Error("root trusted a socket of another user in a directory that user does not own")
	}
	os.Chown(dir, 12345, 12345)
	os.Chmod(dir, 0o700)
	if err := private.Socket(sock); err != nil {
		t.Errorf("root refused the socket of the user who owns its private directory: %v", err)
	}
}
