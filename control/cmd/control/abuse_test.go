package main_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// An attacker with no credentials, from one address, against the real
// binary: thousands of connections held in every state (idle, handshake
// never finished, TLS done with no request, request bodies never finished),
// gzip bombs and oversized messages and headers to every public procedure,
// all at once for a while. Meanwhile an edge with its certificate stays
// online, a second machine enrolls and `control node list` answers over the
// admin socket. The control plane's RSS grows by less than 64 MiB, and what
// the attacker holds is closed within the timeouts once it stops.
func TestUnauthenticatedAbuse(t *testing.T) {
	if testing.Short() {
		t.Skip("the attack runs for seconds")
	}
	const (
		attackFor   = 8 * time.Second
		maxGrowth   = 64 << 20
		from        = "127.0.0.2" // the attacker's one address; everyone else dials from 127.0.0.1
		handshakeTO = 2 * time.Second
		idleTO      = 2 * time.Second
		bodyTO      = 3 * time.Second
	)
	work := t.TempDir()
	data := filepath.Join(work, "data")
	cmd := exec.Command(filepath.Join(bin, "control"), "serve", "--data", data, "--listen", "127.0.0.1:0",
		"--heartbeat-interval", "1s", "--offline-after", "3s",
		"--handshake-timeout", handshakeTO.String(), "--idle-timeout", idleTO.String(), "--body-timeout", bodyTO.String())
	url := startServe(t, cmd)
	addr := strings.TrimPrefix(url, "https://")
	pid := cmd.Process.Pid

	token := oneLine(t, "token create", run(t, "control", "token", "create", "--data", data, "--uses", "2").stdout)
	state := filepath.Join(work, "edge")
	if r := run(t, "edge", "enroll", "--token", token, "--control", url, "--state", state); r.code != 0 {
		t.Fatalf("enroll: %+v", r)
	}
	var id struct {
		NodeID string `json:"node_id"`
	}
	raw, _ := os.ReadFile(filepath.Join(state, "current", "identity.json"))
	json.Unmarshal(raw, &id)
	edge := exec.Command(filepath.Join(bin, "edge"), "run", "--state", state, "--engines-dir", filepath.Join(work, "engines"))
	edge.Stderr = logOnFailure(t, "edge run")
	if err := edge.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { edge.Process.Kill(); edge.Wait() })
	waitStatus(t, data, id.NodeID, "online", 10*time.Second)
	time.Sleep(2 * time.Second) // let the start's garbage settle
	baseline := rss(t, pid)

	// The attack.
	a := &attacker{t: t, addr: addr, from: from}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, kind := range []func(){a.idleTCP, a.halfHello, a.tlsNoRequest(http2.NextProtoTLS), a.tlsNoRequest("http/1.1"),
		a.stalledBodies, a.bombs, a.bombs, a.bigHeaders} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
					kind()
				}
			}
		}()
	}
	// Meanwhile: the peak RSS, the admin socket, a second enrollment.
	peak := baseline
	deadline := time.Now().Add(attackFor)
	enrolled := false
	for time.Now().Before(deadline) {
		peak = max(peak, rss(t, pid))
		if r := run(t, "control", "node", "list", "--json", "--data", data); r.code != 0 || !strings.Contains(r.stdout, `"online"`) {
			t.Errorf("control node list during the attack: %+v", r)
		}
		if !enrolled {
			if r := run(t, "edge", "enroll", "--token", token, "--control", url, "--state", filepath.Join(work, "second")); r.code != 0 {
				t.Errorf("an enrollment during the attack: %+v", r)
			}
			enrolled = true
		}
		time.Sleep(200 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	peak = max(peak, rss(t, pid))
	t.Logf("RSS %d MiB before, %d MiB at most during the attack; %d connections refused, %d requests sent",
		baseline>>20, peak>>20, a.refused.Load(), a.requests.Load())
	if peak-baseline > maxGrowth {
		t.Errorf("RSS grew by %d MiB, more than %d MiB", (peak-baseline)>>20, maxGrowth>>20)
	}
	if a.requests.Load() == 0 {
		t.Error("the attack sent no request")
	}
	if a.refused.Load() == 0 {
		t.Error("no connection of the attacker's was refused: the caps did not act")
	}
	// The edge was never off: no status change since it came online.
	if n := nodeStatus(t, data, id.NodeID); n.Status != "online" {
		t.Errorf("the edge is %s (%s) after the attack", n.Status, n.StatusReason)
	}
	var events []struct {
		Kind, From, To, Reason string
	}
	json.Unmarshal([]byte(run(t, "control", "node", "events", id.NodeID, "--json", "--data", data).stdout), &events)
	for _, e := range events {
		if e.Kind == "status" && e.To != "online" {
			t.Errorf("the edge went %s during the attack (%s)", e.To, e.Reason)
		}
	}
	// What the attacker still holds is closed within the timeouts.
	limit := max(handshakeTO, idleTO, bodyTO) + 5*time.Second // slack for a loaded machine
	end := time.Now().Add(limit)
	for {
		if n := unauthConns(t, data); n <= 1 {
			break
		} else if time.Now().After(end) {
			t.Fatalf("%d connections without a certificate still open %s after the attack", n, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
	a.closeAll()
}

// rss is a process's resident set, from /proc.
func rss(tb testing.TB, pid int) int64 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		tb.Fatalf("no VmRSS in /proc/%d/status", pid)
	}
	kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return kb << 10
}

// unauthConns reads llorch_public_conns{class="unauthenticated"} over the socket.
func unauthConns(tb testing.TB, data string) int {
	tb.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", filepath.Join(data, "control.sock"))
	}}}
	resp, err := hc.Get("http://control.sock/metrics")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`llorch_public_conns\{class="unauthenticated"\} (\d+)`).FindSubmatch(b)
	if m == nil {
		tb.Fatalf("no llorch_public_conns in the metrics")
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// attacker opens connections from one address and keeps what the server
// lets it keep.
type attacker struct {
	t        *testing.T
	addr     string
	from     string
	refused  atomic.Int64
	requests atomic.Int64

	mu   sync.Mutex
	held []net.Conn
}

func (a *attacker) dial() net.Conn {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(a.from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", a.addr)
	if err != nil {
		a.refused.Add(1)
		time.Sleep(10 * time.Millisecond)
		return nil
	}
	return c
}

// hold keeps c unless the server closed it at once (over a cap).
func (a *attacker) hold(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil {
		if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
			a.refused.Add(1)
			c.Close()
			return
		}
	}
	c.SetReadDeadline(time.Time{})
	a.mu.Lock()
	defer a.mu.Unlock()
	a.held = append(a.held, c)
	if len(a.held) > 3000 { // stay under the test process's file limit
		a.held[0].Close()
		a.held = a.held[1:]
	}
}

func (a *attacker) closeAll() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.held {
		c.Close()
	}
}

func (a *attacker) idleTCP() {
	if c := a.dial(); c != nil {
		a.hold(c)
	}
}

func (a *attacker) halfHello() {
	if c := a.dial(); c != nil {
		c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01})
		a.hold(c)
	}
}

func (a *attacker) tlsConn(proto string) *tls.Conn {
	c := a.dial()
	if c == nil {
		return nil
	}
	tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{proto}})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		a.refused.Add(1)
		c.Close()
		return nil
	}
	tc.SetDeadline(time.Time{})
	return tc
}

func (a *attacker) tlsNoRequest(proto string) func() {
	return func() {
		if tc := a.tlsConn(proto); tc != nil {
			a.mu.Lock()
			a.held = append(a.held, tc)
			a.mu.Unlock()
		}
	}
}

// stalledBodies opens as many streams as a connection allows, each a public
// call whose body never ends.
func (a *attacker) stalledBodies() {
	tc := a.tlsConn(http2.NextProtoTLS)
	if tc == nil {
		return
	}
	tc.Write([]byte(http2.ClientPreface))
	fr := http2.NewFramer(tc, tc)
	fr.WriteSettings()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for i := range 32 {
		hb.Reset()
		for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":authority", "x"},
			{":path", "/llorch.v1.EnrollService/Enroll"}, {"content-type", "application/proto"}} {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		id := uint32(2*i + 1)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndHeaders: true})
		fr.WriteData(id, false, []byte{0x0a, 0xff})
		a.requests.Add(1)
	}
	a.mu.Lock()
	a.held = append(a.held, tc)
	a.mu.Unlock()
}

var bomb = func() []byte {
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	zeros := make([]byte, 1<<20)
	for range 256 { // 256 MiB in about 256 KiB
		w.Write(zeros)
	}
	w.Close()
	return b.Bytes()
}()

// bombs sends gzip bombs and oversized messages to every public procedure,
// many at once on one HTTP/2 connection.
func (a *attacker) bombs() {
	tr := &http2.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
		DialTLSContext: func(ctx context.Context, network, _ string, cfg *tls.Config) (net.Conn, error) {
			if tc := a.tlsConn(http2.NextProtoTLS); tc != nil {
				return tc, nil
			}
			return nil, fmt.Errorf("refused")
		},
	}
	defer tr.CloseIdleConnections()
	var wg sync.WaitGroup
	for _, path := range []string{"/llorch.v1.EnrollService/Enroll", "/llorch.v1.InfoService/GetInfo", "/grpc.health.v1.Health/Check",
		"/llorch.v1.AdminService/CreateJoinToken", "/llorch.v1.NodeService/WhoAmI"} {
		for _, body := range []struct {
			data     []byte
			encoding string
		}{{bomb, "gzip"}, {make([]byte, 2<<20), ""}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				req, _ := http.NewRequest(http.MethodPost, "https://"+a.addr+path, bytes.NewReader(body.data))
				req.Header.Set("Content-Type", "application/proto")
				if body.encoding != "" {
					req.Header.Set("Content-Encoding", body.encoding)
				}
				a.requests.Add(1)
				if resp, err := tr.RoundTrip(req); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}()
		}
	}
	wg.Wait()
}

func (a *attacker) bigHeaders() {
	tc := a.tlsConn("http/1.1")
	if tc == nil {
		return
	}
	defer tc.Close()
	fmt.Fprintf(tc, "POST /llorch.v1.InfoService/GetInfo HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n", strings.Repeat("a", 1<<20))
	a.requests.Add(1)
	io.Copy(io.Discard, io.LimitReader(tc, 4096))
}
