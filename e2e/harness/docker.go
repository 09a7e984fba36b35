package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"
)

// ExecResult is what a command exec'd into a container did.
type ExecResult struct {
	Code           int
	Stdout, Stderr string
}

// String shows the result in one line for messages.
func (r ExecResult) String() string {
	return fmt.Sprintf("exit %d, stdout %q, stderr %q", r.Code, strings.TrimSpace(r.Stdout), strings.TrimSpace(r.Stderr))
}

// Exec runs cmd in a running container and returns its exit code and its
// stdout and stderr apart. The error is for Docker failing (the container
// is not running, paused, gone), not for the command failing. When ctx ends
// first the command may still be running in the container.
func (s *Suite) Exec(ctx context.Context, containerID string, cmd ...string) (ExecResult, error) {
	return s.ExecEnv(ctx, containerID, nil, cmd...)
}

// ExecEnv is Exec with extra environment variables ("K=V").
func (s *Suite) ExecEnv(ctx context.Context, containerID string, env []string, cmd ...string) (ExecResult, error) {
	created, err := s.Docker.ExecCreate(ctx, containerID, client.ExecCreateOptions{Cmd: cmd, Env: env, AttachStdout: true, AttachStderr: true})
	if err != nil {
		return ExecResult{}, fmt.Errorf("exec %s: %w", cmd[0], err)
	}
	att, err := s.Docker.ExecAttach(ctx, created.ID, client.ExecAttachOptions{})
	if err != nil {
		return ExecResult{}, fmt.Errorf("exec %s: attach: %w", cmd[0], err)
	}
	defer att.Close()
	var stdout, stderr bytes.Buffer
	done := make(chan error, 1)
	go func() {
		_, err := stdcopy.StdCopy(&stdout, &stderr, att.Reader)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			return ExecResult{}, fmt.Errorf("exec %s: read output: %w", cmd[0], err)
		}
	case <-ctx.Done():
		return ExecResult{}, fmt.Errorf("exec %s: %w", cmd[0], ctx.Err())
	}
	// The stream ends when the process does; the daemon records the exit
	// code a moment later.
	for {
		insp, err := s.Docker.ExecInspect(ctx, created.ID, client.ExecInspectOptions{})
		if err != nil {
			return ExecResult{}, fmt.Errorf("exec %s: inspect: %w", cmd[0], err)
		}
		if !insp.Running {
			return ExecResult{Code: insp.ExitCode, Stdout: stdout.String(), Stderr: stderr.String()}, nil
		}
		select {
		case <-ctx.Done():
			return ExecResult{}, fmt.Errorf("exec %s: %w", cmd[0], ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Logs returns a container's stdout and stderr so far.
func (s *Suite) Logs(ctx context.Context, containerID string) (stdout, stderr string, err error) {
	rc, err := s.Docker.ContainerLogs(ctx, containerID, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true, Timestamps: true})
	if err != nil {
		return "", "", err
	}
	defer rc.Close()
	var o, e bytes.Buffer
	if _, err := stdcopy.StdCopy(&o, &e, rc); err != nil {
		return o.String(), e.String(), err
	}
	return o.String(), e.String(), nil
}

// State inspects a container's state.
func (s *Suite) State(ctx context.Context, containerID string) (*container.State, error) {
	res, err := s.Docker.ContainerInspect(ctx, containerID, client.ContainerInspectOptions{})
	if err != nil {
		return nil, err
	}
	return res.Container.State, nil
}

// WaitExit waits for a container to stop and returns its exit code.
func (s *Suite) WaitExit(ctx context.Context, containerID string) (int, error) {
	w := s.Docker.ContainerWait(ctx, containerID, client.ContainerWaitOptions{Condition: container.WaitConditionNotRunning})
	select {
	case r := <-w.Result:
		if r.Error != nil && r.Error.Message != "" {
			return int(r.StatusCode), errors.New(r.Error.Message)
		}
		return int(r.StatusCode), nil
	case err := <-w.Error:
		return 0, err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// Kill sends SIGKILL (kill -9) to a container's main process and waits until
// the engine sees it stopped.
func (s *Suite) Kill(ctx context.Context, containerID string) error {
	if _, err := s.Docker.ContainerKill(ctx, containerID, client.ContainerKillOptions{Signal: "SIGKILL"}); err != nil {
		return fmt.Errorf("kill -9: %w", err)
	}
	_, err := s.WaitExit(ctx, containerID)
	return err
}

// CopyOut copies files out of a container (running or stopped) into dir.
// Files that do not exist are skipped; it returns the paths written.
func (s *Suite) CopyOut(ctx context.Context, containerID, dir string, paths ...string) ([]string, error) {
	var written []string
	for _, p := range paths {
		res, err := s.Docker.CopyFromContainer(ctx, containerID, client.CopyFromContainerOptions{SourcePath: p})
		if isNotFound(err) {
			continue
		}
		if err != nil {
			return written, fmt.Errorf("copy %s out: %w", p, err)
		}
		tr := tar.NewReader(res.Content)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				res.Content.Close()
				return written, fmt.Errorf("copy %s out: %w", p, err)
			}
			if h.Typeflag != tar.TypeReg {
				continue
			}
			dst := filepath.Join(dir, filepath.Base(h.Name))
			f, err := os.Create(dst)
			if err != nil {
				res.Content.Close()
				return written, err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				res.Content.Close()
				return written, err
			}
			written = append(written, dst)
		}
		res.Content.Close()
	}
	return written, nil
}
