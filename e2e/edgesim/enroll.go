package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llorch/llorch/edge/enroll"
)

// Enrollment runs in worker processes: this binary again, with workerEnv
// set. edge/enroll gives every call an http.Transport of its own and never
// closes it, so each enrollment leaves an idle HTTP/2 connection open, on
// both sides, until the control plane's 5-minute idle timeout. For `edge
// enroll`, which exits, that costs nothing; here it would hold one extra
// descriptor per edge in both processes and inflate the memory baseline.
// A worker's exit closes them all.
const workerEnv = "EDGESIM_ENROLL_WORKER"

// enrollJob is what a worker reads on stdin (the token never shows up in a
// process list).
type enrollJob struct {
	ControlURL  string   `json:"control_url"`
	Token       string   `json:"token"`
	Concurrency int      `json:"concurrency"`
	Dirs        []string `json:"dirs"`
	Hostnames   []string `json:"hostnames"`
}

// runEnrollWorker enrolls every identity of the job and writes one line per
// enrollment: "ok" or "err <message>".
func runEnrollWorker(ctx context.Context, stdin io.Reader, stdout io.Writer) int {
	var job enrollJob
	if err := json.NewDecoder(stdin).Decode(&job); err != nil {
		fmt.Fprintf(os.Stderr, "edgesim enroll worker: %v\n", err)
		return 2
	}
	var (
		mu   sync.Mutex
		next atomic.Int64
		wg   sync.WaitGroup
	)
	out := bufio.NewWriter(stdout)
	for range max(job.Concurrency, 1) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(job.Dirs) || ctx.Err() != nil {
					return
				}
				_, err := enroll.Enroll(ctx, enroll.Config{
					StateDir: job.Dirs[i], ControlURL: job.ControlURL, Token: job.Token,
					Hostname: job.Hostnames[i], Timeout: time.Minute,
				})
				mu.Lock()
				if err != nil {
					fmt.Fprintf(out, "err %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
				} else {
					fmt.Fprintln(out, "ok")
				}
				out.Flush()
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return 0
}

// enrollFleet creates the tokens and enrolls one identity into each of
// dirs, one worker process per token, one after the other.
func (s *Sim) enrollFleet(ctx context.Context, dirs []string) (EnrollResult, error) {
	n, batch := len(dirs), s.cfg.EnrollBatch
	res := EnrollResult{Edges: n, Concurrency: s.cfg.EnrollConcurrency}
	t0 := time.Now()
	var tokens []string
	for b := 0; b < n; b += batch {
		tok, err := s.cp.createToken(ctx, min(batch, n-b))
		if err != nil {
			return res, err
		}
		tokens = append(tokens, tok)
	}
	res.Tokens = len(tokens)
	res.TokenSeconds = time.Since(t0).Seconds()

	exe, err := os.Executable()
	if err != nil {
		return res, fmt.Errorf("find own executable for enrollment workers: %w", err)
	}
	var done, failed atomic.Int64
	var firstErr atomic.Value
	stopProgress := s.progressEvery(2*time.Second, func(elapsed time.Duration) string {
		d := done.Load()
		return fmt.Sprintf("enrolled %d/%d (%.0f/s)", d, n, float64(d)/elapsed.Seconds())
	})
	t1 := time.Now()
	cpu0, _ := readProc(s.cp.pid())
	var workerCPU time.Duration
	for i, tok := range tokens {
		lo, hi := i*batch, min((i+1)*batch, n)
		job := enrollJob{ControlURL: s.controlURL, Token: tok, Concurrency: s.cfg.EnrollConcurrency, Dirs: dirs[lo:hi]}
		for j := lo; j < hi; j++ {
			job.Hostnames = append(job.Hostnames, edgeName(j))
		}
		cpu, err := runWorker(ctx, exe, job, func(line string) {
			if line == "ok" {
				done.Add(1)
				return
			}
			failed.Add(1)
			firstErr.CompareAndSwap(nil, strings.TrimPrefix(line, "err "))
		})
		workerCPU += cpu
		if err != nil {
			stopProgress()
			return res, err
		}
	}
	stopProgress()
	res.Seconds = time.Since(t1).Seconds()
	if cpu1, err := readProc(s.cp.pid()); err == nil {
		res.ControlCPUPercent = 100 * (cpu1.CPU - cpu0.CPU).Seconds() / res.Seconds
	}
	res.WorkerCPUPercent = 100 * workerCPU.Seconds() / res.Seconds
	res.Enrolled = int(done.Load())
	res.Failed = int(failed.Load())
	res.PerSecond = float64(res.Enrolled) / res.Seconds
	if res.Failed > 0 {
		return res, fmt.Errorf("%d of %d enrollments failed, the first: %v", res.Failed, n, firstErr.Load())
	}
	return res, nil
}

// runWorker runs one enrollment worker, hands each line it writes to line,
// and returns the CPU time it used.
func runWorker(ctx context.Context, exe string, job enrollJob, line func(string)) (time.Duration, error) {
	in, err := json.Marshal(job)
	if err != nil {
		return 0, err
	}
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(), workerEnv+"=1")
	cmd.Stdin = strings.NewReader(string(in))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start enrollment worker: %w", err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line(sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		return 0, fmt.Errorf("enrollment worker: %w", err)
	}
	return cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(), nil
}

func edgeName(i int) string { return fmt.Sprintf("sim-%05d", i) }

func edgeDirs(root string, n int) []string {
	dirs := make([]string, n)
	for i := range dirs {
		dirs[i] = filepath.Join(root, edgeName(i))
	}
	return dirs
}
