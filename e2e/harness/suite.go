// Package harness runs llorch's real binaries in containers for the e2e and
// chaos suites. It builds the images itself from the working tree (never
// pulling anything: the engine may have no registry), wires a control plane,
// a gateway and edges into a NAT-like topology, drives the admin CLI with
// docker exec, injects faults, and reports invariants.
//
// Everything it creates (images, containers, networks, volumes) carries the
// label llorch.test=<suite> plus the run and the owning process, and is
// removed at the end even when a test fails; what a killed run left behind is
// swept at the next start. Ryuk is not used: it would have to be pulled.
//
// The suites are gated: without LLORCH_E2E=1 (LLORCH_CHAOS=1) their tests
// skip, so `go test ./...` needs no Docker.
package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/client"
	tclog "github.com/testcontainers/testcontainers-go/log"
)

// Labels put on everything a run creates.
const (
	LabelSuite = "llorch.test"     // e2e or chaos
	LabelRun   = "llorch.test.run" // the run's random ID
	LabelPID   = "llorch.test.pid" // the test process, for sweeping what dead runs left
)

// Environment knobs.
const (
	// EnvKeepImages keeps the built images after the run (LLORCH_TEST_KEEP_IMAGES=1).
	EnvKeepImages = "LLORCH_TEST_KEEP_IMAGES"
	// EnvBase is the base image for the control and edge images; default
	// scratch. Any other base must already be in the local image store.
	EnvBase = "LLORCH_TEST_BASE"
	// EnvVerbose lets testcontainers log what it does.
	EnvVerbose = "LLORCH_TEST_VERBOSE"
)

// Config says which suite runs.
type Config struct {
	Name string // e2e or chaos: the label value and the image tag prefix
	Gate string // the environment variable that must be "1" for the suite to run
	// Seeded: the suite's scenarios draw their choices from the run's seed
	// (Seed). Main prints it first, and every failure says how to repeat
	// the run with it.
	Seeded bool
}

// Suite is one test process's setup: the Docker client, the images it
// built and the invariant report.
type Suite struct {
	Name   string
	RunID  string
	Gate   string // Config.Gate
	Pkg    string // the tests' package directory, "./chaos/"
	Seeded bool   // Config.Seeded
	Docker *client.Client
	Images Images
	Root   string // the module root

	report     *Report
	keepImages bool
	seq        int
	mu         sync.Mutex
}

// Images are the image references a run built.
type Images struct {
	Control   string // the repository Dockerfile, target control
	Edge      string // the repository Dockerfile, target edge
	Testkit   string // test only: testkit and a copy of edge
	Toxiproxy string // test only: toxiproxy-server built from its Go module
}

func (i Images) all() []string { return []string{i.Control, i.Edge, i.Testkit, i.Toxiproxy} }

// Main is the body of a suite's TestMain. It sets *s when the suite is
// enabled (tests skip when it is nil), builds the images, runs the tests,
// prints the invariant table and removes what the run created.
func Main(m *testing.M, cfg Config, s **Suite) int {
	os.Setenv("TESTCONTAINERS_RYUK_DISABLED", "true") // before any testcontainers call; TestMain sets it first too
	flag.Parse()
	if os.Getenv(cfg.Gate) != "1" {
		fmt.Printf("%s: skipped: set %s=1 or run `go tool task %s` (needs Docker)\n", cfg.Name, cfg.Gate, cfg.Name)
		return m.Run()
	}
	// -artifacts needs -outputdir to exist, or m.Run exits before any test
	// (and before the cleanup here).
	if a, o := flag.Lookup("test.artifacts"), flag.Lookup("test.outputdir"); a != nil && o != nil && a.Value.String() == "true" && o.Value.String() != "" {
		if err := os.MkdirAll(o.Value.String(), 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", cfg.Name, err)
			return 1
		}
	}
	if os.Getenv(EnvVerbose) == "" {
		tclog.SetDefault(tclog.NewNoopLogger())
	}
	if cfg.Seeded {
		seed, err := RunSeed()
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", cfg.Name, err)
			return 1
		}
		fmt.Printf("%s: SEED %d (%s=%d repeats this run)\n", cfg.Name, seed, EnvSeed, seed)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	suite, err := setup(ctx, cfg)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: setup: %v\n", cfg.Name, err)
		if suite != nil {
			suite.close()
		}
		return 1
	}
	*s = suite
	code := m.Run()
	suite.report.Print(os.Stdout)
	if code != 0 {
		if run := suite.replayRun(); run != "" {
			fmt.Printf("%s: FAILED; repeat this run: %s\n", cfg.Name, run)
		}
	}
	if err := suite.close(); err != nil {
		fmt.Fprintf(os.Stderr, "%s: cleanup: %v\n", cfg.Name, err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

func setup(ctx context.Context, cfg Config) (*Suite, error) {
	start := time.Now()
	cli, err := client.New(client.FromEnv, client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	pingCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = cli.Ping(pingCtx, client.PingOptions{})
	cancel()
	if err != nil {
		cli.Close()
		return nil, fmt.Errorf("no Docker engine answers (DOCKER_HOST=%q): %w", os.Getenv("DOCKER_HOST"), err)
	}
	root, err := moduleRoot()
	if err != nil {
		cli.Close()
		return nil, err
	}
	s := &Suite{
		Name: cfg.Name, RunID: randomID(), Gate: cfg.Gate, Seeded: cfg.Seeded, Docker: cli, Root: root,
		report: &Report{}, keepImages: os.Getenv(EnvKeepImages) == "1",
	}
	s.Pkg = "./"
	if wd, err := os.Getwd(); err == nil {
		if rel, err := filepath.Rel(root, wd); err == nil && rel != "." {
			s.Pkg = "./" + filepath.ToSlash(rel) + "/"
		}
	}
	if err := s.sweep(ctx, staleRuns(s.Name)); err != nil {
		return s, fmt.Errorf("sweep what earlier runs left: %w", err)
	}
	bins, err := os.MkdirTemp("", "llorch-"+cfg.Name+"-bin-")
	if err != nil {
		return s, err
	}
	defer os.RemoveAll(bins)
	if err := buildBinaries(ctx, root, bins); err != nil {
		return s, err
	}
	if err := s.buildImages(ctx, bins); err != nil {
		return s, err
	}
	// Nothing may ever be pulled: check every image the tests use is here.
	for _, ref := range s.Images.all() {
		if _, err := cli.ImageInspect(ctx, ref); err != nil {
			return s, fmt.Errorf("image %s is not in the local store (this engine cannot pull): %w", ref, err)
		}
	}
	fmt.Printf("%s: run %s: binaries and images built in %s (images: %s)\n", cfg.Name, s.RunID, time.Since(start).Round(time.Second), strings.Join(s.Images.all(), ", "))
	return s, nil
}

// close removes everything the run created (and its images unless kept).
func (s *Suite) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	defer s.Docker.Close()
	f := thisRun(s.RunID)
	if s.keepImages {
		f.keepImages = true
		fmt.Printf("%s: keeping images (%s=1): %s\n", s.Name, EnvKeepImages, strings.Join(s.Images.all(), " "))
	}
	return s.sweep(ctx, f)
}

// Labels returns the labels for something this run creates.
func (s *Suite) Labels() map[string]string {
	return map[string]string{LabelSuite: s.Name, LabelRun: s.RunID, LabelPID: strconv.Itoa(os.Getpid())}
}

// next returns a number unique in this run, for names.
func (s *Suite) next() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	return s.seq
}

// Require skips the test when the suite is not enabled. When the test
// fails, it logs how to repeat it (Replay).
func Require(t testing.TB, s *Suite) {
	t.Helper()
	if s == nil {
		t.Skip("container suite not enabled (LLORCH_E2E=1 / LLORCH_CHAOS=1, or `go tool task e2e|chaos`)")
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("REPLAY %s", s.Replay(t))
		}
	})
}

// Replay is how to repeat test t exactly (with the run's seed when the
// suite is seeded), alone and, when a task started the run, with the rest
// of the run.
func (s *Suite) Replay(t testing.TB) string {
	parts := strings.Split(t.Name(), "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	env := ""
	if s.Seeded {
		if seed, err := RunSeed(); err == nil {
			env = fmt.Sprintf("%s=%d ", EnvSeed, seed)
		}
	}
	cmd := fmt.Sprintf("%s%s=1 TESTCONTAINERS_RYUK_DISABLED=true go test -count=1 -v -timeout 30m -run '%s' %s",
		env, s.Gate, strings.Join(parts, "/"), s.Pkg)
	if run := s.replayRun(); run != "" {
		cmd += "   (the whole run: " + run + ")"
	}
	return cmd
}

// replayRun repeats the whole run through the task that started it ("" when
// no task did).
func (s *Suite) replayRun() string {
	task := os.Getenv(EnvTask)
	if task == "" {
		return ""
	}
	if s.Seeded {
		if seed, err := RunSeed(); err == nil {
			return fmt.Sprintf("%s=%d go tool task %s", EnvSeed, seed, task)
		}
	}
	return "go tool task " + task
}

func randomID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// moduleRoot is the directory holding go.mod (tests run in their package directory).
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// goCommand is the go command that runs these tests.
func goCommand() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// buildBinaries compiles the static binaries the images hold: the product's
// control and edge exactly as for a scratch image (CGO_ENABLED=0), testkit,
// and toxiproxy-server from its pinned module (go.mod's tool directive).
func buildBinaries(ctx context.Context, root, dir string) error {
	cmd := exec.CommandContext(ctx, goCommand(), "build", "-trimpath",
		"-ldflags", "-s -w -X github.com/llorch/llorch/internal/version.Version=test",
		"-o", dir+string(filepath.Separator),
		"./control/cmd/control", "./edge/cmd/edge", "./e2e/testkit", "github.com/Shopify/toxiproxy/v2/cmd/server")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build: %w\n%s", err, out.String())
	}
	return os.Rename(filepath.Join(dir, "server"), filepath.Join(dir, "toxiproxy"))
}

// ArtifactDir is where a test's files go: go test's -artifacts directory
// when given, else a directory under the system temp dir that outlives the
// test (so the files are there to read after a failure).
func ArtifactDir(t testing.TB) string {
	t.Helper()
	if f := flag.Lookup("test.artifacts"); f != nil && f.Value.String() == "true" {
		return t.ArtifactDir()
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
	dir, err := os.MkdirTemp("", "llorch-artifacts-"+name+"-")
	if err != nil {
		t.Fatalf("artifact dir: %v", err)
	}
	return dir
}

// readAllString reads r to the end; an error is appended to the text.
func readAllString(r io.Reader) string {
	b, err := io.ReadAll(r)
	if err != nil {
		return string(b) + "\n(read error: " + err.Error() + ")"
	}
	return string(b)
}
