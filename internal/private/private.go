// Package private checks that files and directories holding secrets are
// this user's alone: owned by the effective user, with no access for group
// or others. The control plane checks its data directory and CA with it
// before it trusts what is in them.
package private

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// Error says what is wrong with a path and how to fix it.
type Error struct {
	Path    string
	Problem string // e.g. "writable by other users (mode 0777)"
	Fix     string // e.g. "chmod 700 /var/lib/llorch"
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s is %s: refusing to use it; %s", e.Path, e.Problem, e.Fix)
}

// Dir makes sure dir is a private directory: it is created with mode 0700
// when missing; it is refused when it is not a directory, is owned by
// another user, or can be written by group or others (anyone could have put
// files in it). When it can only be read by group or others it is refused
// too, unless tighten is set: then it is made 0700 and its old mode
// returned (0 when nothing changed), for the caller to report.
func Dir(dir string, tighten bool) (was os.FileMode, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return 0, err
	}
	if !fi.IsDir() {
		return 0, &Error{Path: dir, Problem: "not a directory", Fix: "point to a directory"}
	}
	if err := owned(dir, fi); err != nil {
		return 0, err
	}
	mode := fi.Mode().Perm()
	switch {
	case mode&0o022 != 0:
		return 0, &Error{Path: dir, Problem: fmt.Sprintf("writable by other users (mode %04o)", mode),
			Fix: fmt.Sprintf("check what is in it, then chmod 700 %s", dir)}
	case mode&0o077 == 0:
		return 0, nil
	case !tighten:
		return 0, &Error{Path: dir, Problem: fmt.Sprintf("readable by other users (mode %04o), so its keys may have been read", mode),
			Fix: fmt.Sprintf("chmod 700 %s (and consider making a new CA)", dir)}
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return 0, fmt.Errorf("make %s private: %w", dir, err)
	}
	return mode, nil
}

// File checks that path, if it exists, is a regular file of this user that
// group and others can neither read nor write. A missing file is fine.
func File(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return &Error{Path: path, Problem: "not a regular file", Fix: "remove it"}
	}
	if err := owned(path, fi); err != nil {
		return err
	}
	if mode := fi.Mode().Perm(); mode&0o077 != 0 {
		return &Error{Path: path, Problem: fmt.Sprintf("accessible to other users (mode %04o), so it may have been read", mode),
			Fix: fmt.Sprintf("chmod 600 %s (and consider it compromised)", path)}
	}
	return nil
}

func owned(path string, fi fs.FileInfo) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if uid := os.Geteuid(); int(st.Uid) != uid {
		return &Error{Path: path, Problem: fmt.Sprintf("owned by uid %d, not by the user running this (uid %d)", st.Uid, uid),
			Fix: fmt.Sprintf("chown it to uid %d, or run as its owner", uid)}
	}
	return nil
}

// Socket checks a control plane's admin socket before a client talks to it
// (and trusts its answers, such as new join tokens): it must be owned by
// the effective user, or, for root, by the owner of its directory, which
// others cannot write to (so nobody else can have put it there).
func Socket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return &Error{Path: path, Problem: "not a socket", Fix: "is the data directory right?"}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || int(st.Uid) == os.Geteuid() {
		return nil
	}
	if os.Geteuid() == 0 {
		dir := filepath.Dir(path)
		di, err := os.Lstat(dir)
		if err != nil {
			return err
		}
		ds, ok := di.Sys().(*syscall.Stat_t)
		if ok && ds.Uid == st.Uid && di.Mode().Perm()&0o022 == 0 {
			return nil
		}
	}
	return &Error{Path: path, Problem: fmt.Sprintf("owned by uid %d, not by you (uid %d)", st.Uid, os.Geteuid()),
		Fix: "run the command as the user that runs the control plane"}
}
