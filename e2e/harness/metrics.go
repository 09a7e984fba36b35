package harness

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/llorch/llorch/certs"
)

// Metrics is one scrape of the control plane's /metrics: each series as
// written ("name" or `name{label="v",...}`) with its value.
type Metrics map[string]float64

// Sum adds up every series of a metric (all its label sets); 0 when it is
// absent.
func (m Metrics) Sum(name string) float64 {
	var sum float64
	for series, v := range m {
		if series == name || strings.HasPrefix(series, name+"{") {
			sum += v
		}
	}
	return sum
}

// ParseMetrics reads the Prometheus text format: comments and blank lines
// are skipped, each other line is a series, a value and perhaps a
// timestamp.
func ParseMetrics(r io.Reader) (Metrics, error) {
	m := Metrics{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		// The series ends at the first space outside a quoted label value.
		end, quoted := -1, false
		for i := 0; i < len(line) && end < 0; i++ {
			switch c := line[i]; {
			case c == '\\' && quoted:
				i++
			case c == '"':
				quoted = !quoted
			case c == ' ' && !quoted:
				end = i
			}
		}
		if end < 0 {
			return nil, fmt.Errorf("metrics: no value in %q", line)
		}
		fields := strings.Fields(line[end:])
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics: %q: %w", line, err)
		}
		m[line[:end]] = v
	}
	return m, sc.Err()
}

// Metrics scrapes /metrics on the control plane's TLS port, published on
// 127.0.0.1 for the harness, with the API token and the CA pinned. It is
// the handler the admin socket serves too (the admin CLI has no command
// that prints it, and the scratch image has no HTTP client for the
// socket). The port is looked up on every call: a restart changes it.
func (cp *ControlPlane) Metrics(ctx context.Context) (Metrics, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	port, err := cp.C.MappedPort(ctx, ControlPort+"/tcp")
	if err != nil {
		return nil, fmt.Errorf("metrics: the control plane's published port: %w", err)
	}
	tlsCfg := certs.PinnedTLSConfig(cp.Fingerprint, CPAlias)
	tlsCfg.ServerName = CPAlias
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg, ForceAttemptHTTP2: true, DisableKeepAlives: true}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+net.JoinHostPort("127.0.0.1", port.Port())+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+apiToken)
	res, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(res.Body, 512))
		return nil, fmt.Errorf("metrics: %s: %s", res.Status, strings.TrimSpace(string(body)))
	}
	return ParseMetrics(res.Body)
}
