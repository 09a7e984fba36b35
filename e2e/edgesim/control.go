package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/llorch/llorch/control/adminclient"
)

// controlProc is the control plane as a child process, reached the way an
// operator reaches it: its CLI and its admin socket (DATA/control.sock).
type controlProc struct {
	bin, dataDir, listen, logDir, logLevel string
	heartbeat, offlineAfter                time.Duration

	starts    int
	cmd       *exec.Cmd
	done      chan struct{} // closed when the current process has exited
	startedAt time.Time
	admin     *http.Client
}

func newControlProc(bin, dataDir, listen, logDir, logLevel string, heartbeat, offlineAfter time.Duration) *controlProc {
	admin := adminclient.SocketHTTP(dataDir)
	admin.Timeout = 30 * time.Second
	admin.Transport.(*http.Transport).DisableKeepAlives = true // a restarted control plane is a new socket
	return &controlProc{
		bin: bin, dataDir: dataDir, listen: listen, logDir: logDir, logLevel: logLevel,
		heartbeat: heartbeat, offlineAfter: offlineAfter, admin: admin,
	}
}

// simulationFlags lift the limits that would treat the simulated fleet as
// one machine: every edge dials from 127.0.0.1, where real ones come from
// addresses of their own, and all of them enroll from it. A binary that
// predates the limits (a comparison run) gets none.
func (c *controlProc) simulationFlags() []string {
	help, _ := exec.Command(c.bin, "serve", "--help").CombinedOutput()
	if !strings.Contains(string(help), "--max-unauthenticated-conns-per-addr") {
		return nil
	}
	return []string{"--max-unauthenticated-conns-per-addr", "1000000", "--max-unauthenticated-conns", "1000000", "--enroll-rate", "0"}
}

// start runs `control serve`; its output goes to control-<n>.log.
func (c *controlProc) start() error {
	c.starts++
	logPath := filepath.Join(c.logDir, fmt.Sprintf("control-%d.log", c.starts))
	logFile, err := os.Create(logPath)
	if err != nil {
		return fmt.Errorf("control plane log: %w", err)
	}
	args := []string{"serve", "--data", c.dataDir, "--listen", c.listen,
		"--heartbeat-interval", c.heartbeat.String(), "--offline-after", c.offlineAfter.String(),
		"--log-level", c.logLevel}
	cmd := exec.Command(c.bin, append(args, c.simulationFlags()...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so a Ctrl-C reaches only edgesim, which stops
	// it; and killed with edgesim should edgesim die first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("start %s: %w", c.bin, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		logFile.Close()
		close(done)
	}()
	c.cmd, c.done, c.startedAt = cmd, done, time.Now()
	return nil
}

func (c *controlProc) running() bool {
	if c.cmd == nil {
		return false
	}
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

func (c *controlProc) pid() int { return c.cmd.Process.Pid }

func (c *controlProc) logPath() string {
	return filepath.Join(c.logDir, fmt.Sprintf("control-%d.log", c.starts))
}

// waitReady polls the admin socket until /metrics answers.
func (c *controlProc) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := c.metrics(ctx); err == nil {
			return nil
		}
		if !c.running() {
			return fmt.Errorf("control plane exited during startup: %s (log: %s)", c.cmd.ProcessState, c.logPath())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("control plane not ready after %s (log: %s)", timeout, c.logPath())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// signal sends sig and waits up to timeout for the process to exit (then
// kills it); it returns how long the exit took.
func (c *controlProc) signal(sig syscall.Signal, timeout time.Duration) (time.Duration, error) {
	if !c.running() {
		return 0, errors.New("control plane is not running")
	}
	t0 := time.Now()
	if err := c.cmd.Process.Signal(sig); err != nil {
		return 0, fmt.Errorf("signal control plane: %w", err)
	}
	select {
	case <-c.done:
		return time.Since(t0), nil
	case <-time.After(timeout):
		c.cmd.Process.Kill()
		<-c.done
		return time.Since(t0), fmt.Errorf("control plane still running %s after %s; killed it", timeout, sig)
	}
}

// stop ends the process gracefully, or not at all gracefully after 20s.
func (c *controlProc) stop() {
	if c.running() {
		c.signal(syscall.SIGTERM, 20*time.Second)
	}
}

// cli runs an admin command against the local socket and returns its stdout.
func (c *controlProc) cli(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, append(args, "--data", c.dataDir)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("control %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// createToken makes a join token for uses enrollments.
func (c *controlProc) createToken(ctx context.Context, uses int) (string, error) {
	out, err := c.cli(ctx, "token", "create", "--uses", strconv.Itoa(uses), "--ttl", "1h")
	if err != nil {
		return "", err
	}
	token := strings.TrimSpace(string(out))
	if token == "" || strings.Contains(token, "\n") {
		return "", errors.New("control token create: expected one token on stdout")
	}
	return token, nil
}

// nodeStatuses counts nodes by status, from `control node list --json`.
func (c *controlProc) nodeStatuses(ctx context.Context) (map[string]int, error) {
	out, err := c.cli(ctx, "node", "list", "--json")
	if err != nil {
		return nil, err
	}
	var nodes []struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(out, &nodes); err != nil {
		return nil, fmt.Errorf("control node list --json: %w", err)
	}
	counts := map[string]int{}
	for _, n := range nodes {
		counts[n.Status]++
	}
	return counts, nil
}

// metricsText is a parsed Prometheus text exposition: series (name plus
// labels as printed) to value.
type metricsText map[string]float64

// metrics fetches /metrics from the admin socket.
func (c *controlProc) metrics(ctx context.Context) (metricsText, error) {
	body, err := c.get(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	defer body.Close()
	return parseMetrics(body)
}

// heapProfile runs a garbage collection in the control plane and writes its
// heap profile (what is live after it) to path, through the profiler on the
// admin socket.
func (c *controlProc) heapProfile(ctx context.Context, path string) error {
	body, err := c.get(ctx, "/debug/pprof/heap?gc=1")
	if err != nil {
		return err
	}
	defer body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, body); err != nil {
		f.Close()
		return fmt.Errorf("heap profile: %w", err)
	}
	return f.Close()
}

// get fetches path from the admin socket; the caller closes the body.
func (c *controlProc) get(ctx context.Context, path string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, adminclient.SocketURL+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.admin.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("%s: %s", path, resp.Status)
	}
	return resp.Body, nil
}

func parseMetrics(r io.Reader) (metricsText, error) {
	m := metricsText{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// sum adds up every series of a metric whose labels contain all of match
// (each like `to="offline"`).
func (m metricsText) sum(name string, match ...string) float64 {
	var total float64
	for series, v := range m {
		base, labels, _ := strings.Cut(series, "{")
		if base != name {
			continue
		}
		ok := true
		for _, want := range match {
			ok = ok && strings.Contains(labels, want)
		}
		if ok {
			total += v
		}
	}
	return total
}

// procStat is what /proc says about a process.
type procStat struct {
	RSS     int64         // bytes
	PeakRSS int64         // bytes, the most since the process started (VmHWM)
	CPU     time.Duration // user + system
	FDs     int
	Threads int
}

// readProc reads /proc/<pid>/{status,stat,fd}; pid 0 is this process.
func readProc(pid int) (procStat, error) {
	dir := "/proc/self"
	if pid != 0 {
		dir = "/proc/" + strconv.Itoa(pid)
	}
	var st procStat
	status, err := os.ReadFile(dir + "/status")
	if err != nil {
		return st, err
	}
	for line := range strings.Lines(string(status)) {
		key, val, _ := strings.Cut(line, ":")
		fields := strings.Fields(val)
		if len(fields) == 0 {
			continue
		}
		switch key {
		case "VmRSS":
			kb, _ := strconv.ParseInt(fields[0], 10, 64)
			st.RSS = kb << 10
		case "VmHWM":
			kb, _ := strconv.ParseInt(fields[0], 10, 64)
			st.PeakRSS = kb << 10
		case "Threads":
			st.Threads, _ = strconv.Atoi(fields[0])
		}
	}
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return st, err
	}
	// Fields after "(comm)": state is field 3, utime 14, stime 15 (clock ticks).
	if i := bytes.LastIndexByte(stat, ')'); i > 0 {
		f := strings.Fields(string(stat[i+1:]))
		if len(f) > 12 {
			ut, _ := strconv.ParseInt(f[11], 10, 64)
			stt, _ := strconv.ParseInt(f[12], 10, 64)
			st.CPU = time.Duration(ut+stt) * time.Second / clockTicks
		}
	}
	if ents, err := os.ReadDir(dir + "/fd"); err == nil {
		st.FDs = len(ents)
	}
	return st, nil
}

// listenOverflows reads the kernel's count of connections dropped because a
// listen queue was full (TcpExt ListenOverflows in /proc/net/netstat; for
// the whole network namespace). Each drop costs the client a SYN
// retransmission: 1s, then 2s, 4s... later.
func listenOverflows() int64 {
	b, err := os.ReadFile("/proc/net/netstat")
	if err != nil {
		return 0
	}
	var names []string
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "TcpExt:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i, name := range names {
			if name == "ListenOverflows" && i < len(f) {
				n, _ := strconv.ParseInt(f[i], 10, 64)
				return n
			}
		}
	}
	return 0
}

// clockTicks is USER_HZ, 100 on every Linux architecture Go supports.
const clockTicks = 100

// raiseFileLimit raises RLIMIT_NOFILE to its hard limit. Calling Setrlimit
// (rather than relying on the Go runtime's own raise) makes children started
// from now on inherit it too.
func raiseFileLimit() (uint64, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, fmt.Errorf("setrlimit: %w", err)
	}
	return rl.Cur, nil
}

// freePort picks a loopback port that is free now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
