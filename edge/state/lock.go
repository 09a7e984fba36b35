package state

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// ErrLocked says another edge agent (or enrollment) holds the state
// directory. Lock's error wraps it and names the directory and the holder.
var ErrLocked = errors.New("in use by another edge agent")

// lockFile is the lock in the state directory; it holds the holder's PID.
const lockFile = "edge.lock"

// Lock takes the state directory for this process, creating the directory
// (mode 0700) if missing, so that two agents never share an identity (both
// would renew it, and each renewal supersedes the other's certificate). It
// holds an exclusive flock on STATE/edge.lock, which the kernel releases
// when the process exits, kill -9 included; the file holds the holder's PID
// for the message a second holder gets. Locks are per open file, so a
// second Lock of the same directory in the same process is refused too.
//
// When another holder has the lock the error wraps ErrLocked and reads
// "state directory DIR is in use by another edge agent (pid N); stop it
// first". release gives the lock up; it may be called more than once.
func Lock(dir string) (release func() error, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if err := flock(f); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, lockedError(dir, path)
		}
		return nil, fmt.Errorf("lock state directory: %s: %w", path, err)
	}
	// The PID is only for the message: a failure to write it costs nothing
	// but a less helpful message.
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	var once sync.Once
	var closeErr error
	return func() error {
		once.Do(func() {
			// Emptied while still held: a later reader finds no PID
			// rather than one of a process that has gone.
			f.Truncate(0)
			closeErr = f.Close() // releases the flock
		})
		return closeErr
	}, nil
}

func flock(f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err != syscall.EINTR {
			return err
		}
	}
}

// lockedError names the holder when its PID can be read.
func lockedError(dir, path string) error {
	holder := ""
	if f, err := os.Open(path); err == nil {
		b, _ := io.ReadAll(io.LimitReader(f, 32))
		f.Close()
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			holder = fmt.Sprintf(" (pid %d)", pid)
		}
	}
	return fmt.Errorf("state directory %s is %w%s; stop it first", dir, ErrLocked, holder)
}
