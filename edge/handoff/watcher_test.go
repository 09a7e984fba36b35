package handoff_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/llorch/llorch/edge/handoff"
)

// waitLimit bounds every wait for a state; generous, for -race on a busy machine.
const waitLimit = 10 * time.Second

// engine is a fake llama.cpp server: GET /health answers with status.
type engine struct {
	srv    *httptest.Server
	status atomic.Int32
	body   atomic.Value // string
	hits   atomic.Int32
	gate   chan struct{} // when non-nil, /health waits for it to close
}

func newEngine(t testing.TB, status int) *engine {
	t.Helper()
	return startEngine(t, status, nil)
}

// newGatedEngine returns an engine whose /health answers only once release
// is called, so a test can look at a replica that has not been probed yet.
func newGatedEngine(t testing.TB, status int) (e *engine, release func()) {
	t.Helper()
	gate := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	e = startEngine(t, status, gate)
	t.Cleanup(release) // before the server closes: Close waits for handlers
	return e, release
}

func startEngine(t testing.TB, status int, gate chan struct{}) *engine {
	t.Helper()
	e := &engine{gate: gate}
	e.status.Store(int32(status))
	e.body.Store("")
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/health" {
			http.NotFound(w, r)
			return
		}
		if e.gate != nil {
			select {
			case <-e.gate:
			case <-r.Context().Done():
				return
			}
		}
		e.hits.Add(1)
		w.WriteHeader(int(e.status.Load()))
		fmt.Fprint(w, e.body.Load().(string))
	}))
	t.Cleanup(e.srv.Close)
	return e
}

func (e *engine) URL() string { return e.srv.URL }

// handoffJSON returns a valid handoff file's content.
func handoffJSON(pool, replica, url string, slots int) string {
	return fmt.Sprintf(`{"pool_id":%q,"replica_id":%q,"engine":"llamacpp","engine_version":"b3600","url":%q,"slots":%d}`, pool, replica, url, slots)
}

// writeFile replaces dir/name with content the way provisioners should: a
// hidden temporary file, then a rename.
func writeFile(t testing.TB, dir, name, content string) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

// writeFileAt replaces path with content whose mtime is mtime, atomically,
// so the watcher never sees the content with another mtime.
func writeFileAt(t testing.TB, path, content string, mtime time.Time) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(tmp, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func removeFile(t testing.TB, dir, name string) {
	t.Helper()
	if err := os.Remove(filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

// startWatcher runs a watcher on dir with short intervals until the test ends.
func startWatcher(t testing.TB, dir string, mod ...func(*handoff.Config)) *handoff.Watcher {
	t.Helper()
	cfg := handoff.Config{
		Dir:           dir,
		PollInterval:  20 * time.Millisecond,
		ProbeInterval: 50 * time.Millisecond,
		ProbeTimeout:  time.Second,
		Logger:        slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, m := range mod {
		m(&cfg)
	}
	w := handoff.New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Run returned %v, want context.Canceled", err)
			}
		case <-time.After(waitLimit):
			t.Errorf("Run did not return after its context ended")
		}
	})
	return w
}

// waitFor polls the watcher's snapshot until ok holds, and returns it.
func waitFor(t testing.TB, w *handoff.Watcher, what string, ok func(handoff.Snapshot) bool) handoff.Snapshot {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		s := w.Snapshot()
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; snapshot: %+v", what, s)
		}
		select {
		case <-w.Changed():
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func hasReplica(pool, replica string, ok func(handoff.Replica) bool) func(handoff.Snapshot) bool {
	return func(s handoff.Snapshot) bool {
		r, found := s.Replica(pool, replica)
		return found && (ok == nil || ok(r))
	}
}

func ready(r handoff.Replica) bool    { return r.Ready }
func notReady(r handoff.Replica) bool { return !r.Ready && r.ProbeError != "" }

// waitChanged waits for Changed to fire.
func waitChanged(t testing.TB, w *handoff.Watcher, after string) {
	t.Helper()
	select {
	case <-w.Changed():
	case <-time.After(waitLimit):
		t.Fatalf("Changed did not fire after %s; snapshot: %+v", after, w.Snapshot())
	}
}

func drainChanged(w *handoff.Watcher) {
	select {
	case <-w.Changed():
	default:
	}
}

func TestReplicaAppearsThenBecomesReady(t *testing.T) {
	dir := t.TempDir()
	eng, release := newGatedEngine(t, http.StatusOK)
	w := startWatcher(t, dir, func(c *handoff.Config) { c.ProbeTimeout = time.Minute })

	writeFile(t, dir, "pool-0-r0.json", `{"pool_id":"pool-0","replica_id":"r0","engine":"llamacpp","engine_version":"b3600",
		"url":"`+eng.URL()+`","model":"llama-3-8b","device_mask":"0,1","pid":4242}`)

	// The replica is reported as soon as the file is read, before its
	// engine answers: probes do not hold up scans.
	s := waitFor(t, w, "the replica to appear", hasReplica("pool-0", "r0", nil))
	r := s.Replicas[0]
	if r.Ready || r.ProbeError != "" {
		t.Errorf("before any probe answered: Ready=%v ProbeError=%q, want not ready with no error", r.Ready, r.ProbeError)
	}
	want := handoff.Replica{File: "pool-0-r0.json", PoolID: "pool-0", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600",
		URL: eng.URL(), Model: "llama-3-8b", DeviceMask: "0,1", Slots: 1, PID: 4242, ModTime: r.ModTime}
	if r != want {
		t.Errorf("replica = %+v\nwant %+v", r, want)
	}
	if r.ModTime.IsZero() {
		t.Error("ModTime is zero")
	}
	if len(s.Errors) != 0 || s.DirError != "" {
		t.Errorf("errors = %+v, dir error %q; want none", s.Errors, s.DirError)
	}

	release()
	s = waitFor(t, w, "the replica to be ready", hasReplica("pool-0", "r0", ready))
	if r := s.Replicas[0]; r.ProbeError != "" {
		t.Errorf("ready replica has ProbeError %q", r.ProbeError)
	}
}

func TestEngineReadiness(t *testing.T) {
	dir := t.TempDir()
	eng := newEngine(t, http.StatusServiceUnavailable)
	eng.body.Store(`{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`)
	w := startWatcher(t, dir)
	writeFile(t, dir, "a.json", handoffJSON("pool-0", "r0", eng.URL(), 2))

	s := waitFor(t, w, "a 503 to be reported", hasReplica("pool-0", "r0", notReady))
	r, _ := s.Replica("pool-0", "r0")
	for _, part := range []string{"503", "Loading model", eng.URL() + "/health"} {
		if !strings.Contains(r.ProbeError, part) {
			t.Errorf("ProbeError = %q, want it to mention %q", r.ProbeError, part)
		}
	}
	if p := s.Pools(); len(p) != 1 || p[0].SlotsFree != 0 || p[0].SlotsTotal != 2 {
		t.Errorf("pools = %+v, want one with 0 of 2 slots free", p)
	}

	eng.status.Store(http.StatusOK)
	s = waitFor(t, w, "the engine to become ready", hasReplica("pool-0", "r0", ready))
	if p := s.Pools(); len(p) != 1 || p[0].SlotsFree != 2 || p[0].ReadyReplicas != 1 {
		t.Errorf("pools = %+v, want one with 2 of 2 slots free", p)
	}

	eng.srv.Close()
	s = waitFor(t, w, "the engine to be seen down", hasReplica("pool-0", "r0", notReady))
	r, _ = s.Replica("pool-0", "r0")
	if !strings.Contains(r.ProbeError, "/health") {
		t.Errorf("ProbeError = %q, want the probed URL in it", r.ProbeError)
	}
	if r.URL != eng.URL() || len(s.Replicas) != 1 {
		t.Errorf("a down engine's replica must stay listed; snapshot %+v", s)
	}
}

func TestProbeTimeout(t *testing.T) {
	dir := t.TempDir()
	eng, _ := newGatedEngine(t, http.StatusOK) // never answers during the test
	w := startWatcher(t, dir, func(c *handoff.Config) { c.ProbeTimeout = 100 * time.Millisecond })
	writeFile(t, dir, "a.json", handoffJSON("pool-0", "r0", eng.URL(), 1))
	s := waitFor(t, w, "the probe to time out", hasReplica("pool-0", "r0", notReady))
	if r := s.Replicas[0]; !strings.Contains(r.ProbeError, "no answer within 100ms") {
		t.Errorf("ProbeError = %q, want a timeout", r.ProbeError)
	}
}

func TestFileChanged(t *testing.T) {
	dir := t.TempDir()
	first := newEngine(t, http.StatusOK)
	second := newEngine(t, http.StatusServiceUnavailable)
	w := startWatcher(t, dir)

	writeFile(t, dir, "pool-0-r0.json", handoffJSON("pool-0", "r0", first.URL(), 1))
	waitFor(t, w, "the replica on the first engine to be ready", hasReplica("pool-0", "r0", ready))

	// A new URL: the old readiness says nothing about the new engine.
	writeFile(t, dir, "pool-0-r0.json", handoffJSON("pool-0", "r0", second.URL(), 4))
	s := waitFor(t, w, "the replica to move to the second engine", hasReplica("pool-0", "r0", func(r handoff.Replica) bool {
		return r.URL == second.URL() && r.Slots == 4 && notReady(r)
	}))
	if r := s.Replicas[0]; !strings.Contains(r.ProbeError, second.URL()) {
		t.Errorf("ProbeError = %q, want the second engine's URL in it", r.ProbeError)
	}
	if len(s.Replicas) != 1 {
		t.Errorf("replicas = %+v, want exactly one", s.Replicas)
	}

	second.status.Store(http.StatusOK)
	waitFor(t, w, "the second engine to be ready", hasReplica("pool-0", "r0", ready))

	// Same URL, new slots: still ready, updated.
	writeFile(t, dir, "pool-0-r0.json", handoffJSON("pool-0", "r0", second.URL(), 8))
	s = waitFor(t, w, "the slots to change", hasReplica("pool-0", "r0", func(r handoff.Replica) bool { return r.Slots == 8 }))
	if p := s.Pools(); len(p) != 1 || p[0].SlotsTotal != 8 {
		t.Errorf("pools = %+v, want 8 slots", p)
	}
}

func TestFileRemoved(t *testing.T) {
	dir := t.TempDir()
	eng := newEngine(t, http.StatusOK)
	w := startWatcher(t, dir)
	writeFile(t, dir, "a.json", handoffJSON("pool-0", "r0", eng.URL(), 1))
	writeFile(t, dir, "b.json", handoffJSON("pool-0", "r1", eng.URL(), 1))
	waitFor(t, w, "both replicas ready", func(s handoff.Snapshot) bool {
		return hasReplica("pool-0", "r0", ready)(s) && hasReplica("pool-0", "r1", ready)(s)
	})

	removeFile(t, dir, "a.json")
	s := waitFor(t, w, "r0 to go", func(s handoff.Snapshot) bool { return !hasReplica("pool-0", "r0", nil)(s) })
	if len(s.Replicas) != 1 || s.Replicas[0].ReplicaID != "r1" {
		t.Errorf("replicas = %+v, want r1 only", s.Replicas)
	}
	removeFile(t, dir, "b.json")
	s = waitFor(t, w, "every replica to go", func(s handoff.Snapshot) bool { return len(s.Replicas) == 0 })
	if p := s.Pools(); len(p) != 0 {
		t.Errorf("pools = %+v, want none once the files are gone", p)
	}
}

func TestMalformedFiles(t *testing.T) {
	dir := t.TempDir()
	eng := newEngine(t, http.StatusOK)
	w := startWatcher(t, dir)
	writeFile(t, dir, "good.json", handoffJSON("pool-0", "r0", eng.URL(), 1))
	waitFor(t, w, "the good replica", hasReplica("pool-0", "r0", ready))

	bad := map[string]struct{ content, reason string }{
		"bad-json.json":  {`{"pool_id": "pool-1", "replica_id": `, "invalid JSON"},
		"no-engine.json": {`{"pool_id":"pool-1","replica_id":"r0","engine_version":"b1","url":"http://127.0.0.1:1"}`, `missing required field "engine"`},
		"bad-url.json":   {`{"pool_id":"pool-1","replica_id":"r1","engine":"llamacpp","engine_version":"b1","url":"localhost"}`, "bad url"},
		"neg-slots.json": {`{"pool_id":"pool-1","replica_id":"r2","engine":"llamacpp","engine_version":"b1","url":"http://127.0.0.1:1","slots":-1}`, `"slots": must be at least 1, got -1`},
	}
	for name, b := range bad {
		writeFile(t, dir, name, b.content)
	}
	s := waitFor(t, w, "the malformed files to be reported", func(s handoff.Snapshot) bool { return len(s.Errors) == len(bad) })
	reasons := map[string]bool{}
	for i, fe := range s.Errors {
		b, ok := bad[fe.File]
		if !ok {
			t.Errorf("error for unexpected file %q: %s", fe.File, fe.Reason)
			continue
		}
		if !strings.Contains(fe.Reason, b.reason) {
			t.Errorf("%s: reason %q, want it to mention %q", fe.File, fe.Reason, b.reason)
		}
		if reasons[fe.Reason] {
			t.Errorf("%s: reason %q is not distinct", fe.File, fe.Reason)
		}
		reasons[fe.Reason] = true
		if i > 0 && s.Errors[i-1].File >= fe.File {
			t.Errorf("errors not sorted by file: %+v", s.Errors)
		}
	}
	if len(s.Replicas) != 1 || !s.Replicas[0].Ready || s.DirError != "" {
		t.Errorf("snapshot = %+v; want the good replica, still ready, and no directory error", s)
	}

	// The watcher goes on: a fixed file turns into a replica, a new file is read.
	writeFile(t, dir, "neg-slots.json", `{"pool_id":"pool-1","replica_id":"r2","engine":"llamacpp","engine_version":"b1","url":"`+eng.URL()+`","slots":3}`)
	writeFile(t, dir, "later.json", handoffJSON("pool-2", "r0", eng.URL(), 1))
	s = waitFor(t, w, "the fixed and the new file", func(s handoff.Snapshot) bool {
		return hasReplica("pool-1", "r2", ready)(s) && hasReplica("pool-2", "r0", ready)(s) && len(s.Errors) == len(bad)-1
	})
	for _, fe := range s.Errors {
		if fe.File == "neg-slots.json" {
			t.Errorf("fixed file still reported: %+v", fe)
		}
	}
}

func TestPartialWriteInPlace(t *testing.T) {
	dir := t.TempDir()
	eng := newEngine(t, http.StatusOK)
	w := startWatcher(t, dir)
	path := filepath.Join(dir, "a.json")
	full := handoffJSON("pool-0", "r0", eng.URL(), 2)

	if err := os.WriteFile(path, []byte(full[:len(full)/2]), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, w, "the half-written file to look malformed", func(s handoff.Snapshot) bool { return len(s.Errors) == 1 })

	if err := os.WriteFile(path, []byte(full), 0o644); err != nil {
		t.Fatal(err)
	}
	s := waitFor(t, w, "the completed file's replica", hasReplica("pool-0", "r0", ready))
	if len(s.Errors) != 0 {
		t.Errorf("errors = %+v after the write completed", s.Errors)
	}
}

// A rewrite that keeps the size, within one mtime tick, is still picked up:
// a file whose mtime is recent is read again at every scan.
func TestRewriteWithSameSizeAndMtime(t *testing.T) {
	dir := t.TempDir()
	w := startWatcher(t, dir)
	path := filepath.Join(dir, "a.json")
	mtime := time.Now().Add(time.Hour) // stays "recent" for the whole test

	write := func(url string) {
		t.Helper()
		writeFileAt(t, path, handoffJSON("pool-0", "r0", url, 1), mtime)
	}
	write("http://127.0.0.1:1111")
	waitFor(t, w, "the first content", hasReplica("pool-0", "r0", func(r handoff.Replica) bool { return r.URL == "http://127.0.0.1:1111" }))
	write("http://127.0.0.1:2222")
	waitFor(t, w, "the second content", hasReplica("pool-0", "r0", func(r handoff.Replica) bool { return r.URL == "http://127.0.0.1:2222" }))
}

// A file whose size and mtime did not change is not read again.
func TestUnchangedFileIsNotReread(t *testing.T) {
	dir := t.TempDir()
	w := startWatcher(t, dir, func(c *handoff.Config) { c.ProbeInterval = time.Hour })
	path := filepath.Join(dir, "a.json")
	old := time.Now().Add(-time.Hour).Truncate(time.Second)

	write := func(url string) {
		t.Helper()
		writeFileAt(t, path, handoffJSON("pool-0", "r0", url, 1), old)
	}
	write("http://127.0.0.1:1111")
	waitFor(t, w, "the first content", hasReplica("pool-0", "r0", func(r handoff.Replica) bool { return r.ModTime.Equal(old) }))
	write("http://127.0.0.1:2222") // same size, same mtime

	// Another file appearing proves a later scan ran.
	writeFile(t, dir, "b.json", handoffJSON("pool-0", "r1", "http://127.0.0.1:3333", 1))
	s := waitFor(t, w, "the second file", hasReplica("pool-0", "r1", nil))
	if r, _ := s.Replica("pool-0", "r0"); r.URL != "http://127.0.0.1:1111" {
		t.Errorf("a.json was read again (url %q) though its size and mtime did not change", r.URL)
	}
}

func TestModelForms(t *testing.T) {
	dir := t.TempDir()
	eng := newEngine(t, http.StatusOK)
	w := startWatcher(t, dir)
	common := `"engine":"llamacpp","engine_version":"b3600","url":"` + eng.URL() + `"`
	writeFile(t, dir, "string.json", `{"pool_id":"p-string","replica_id":"r0",`+common+`,"model":"llama-3-8b"}`)
	writeFile(t, dir, "path.json", `{"pool_id":"p-path","replica_id":"r0",`+common+`,"model":{"path":"/models/llama.gguf"}}`)
	writeFile(t, dir, "id.json", `{"pool_id":"p-id","replica_id":"r0",`+common+`,"model":{"id":"qwen2","path":"/models/qwen2.gguf"}}`)
	writeFile(t, dir, "none.json", `{"pool_id":"p-none","replica_id":"r0",`+common+`}`)
	s := waitFor(t, w, "four replicas", func(s handoff.Snapshot) bool { return len(s.Replicas) == 4 })
	want := map[string]string{"p-string": "llama-3-8b", "p-path": "/models/llama.gguf", "p-id": "qwen2", "p-none": ""}
	for _, p := range s.Pools() {
		if p.Model != want[p.ID] {
			t.Errorf("pool %s: model %q, want %q", p.ID, p.Model, want[p.ID])
		}
	}
}

func TestIgnoredFiles(t *testing.T) {
	dir := t.TempDir()
	w := startWatcher(t, dir)
	garbage := "not json at all"
	writeFile(t, dir, "notes.txt", garbage)
	writeFile(t, dir, "a.json.tmp", garbage)
	if err := os.WriteFile(filepath.Join(dir, ".hidden.json"), []byte(garbage), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "sub.json"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "real.json", handoffJSON("pool-0", "r0", "http://127.0.0.1:1", 1))
	s := waitFor(t, w, "the real file", hasReplica("pool-0", "r0", nil))
	if len(s.Replicas) != 1 || len(s.Errors) != 0 {
		t.Errorf("snapshot = %+v; want only real.json's replica and no errors", s)
	}
}

func TestDuplicateReplica(t *testing.T) {
	dir := t.TempDir()
	w := startWatcher(t, dir)
	writeFile(t, dir, "a.json", handoffJSON("pool-0", "r0", "http://127.0.0.1:1111", 1))
	writeFile(t, dir, "b.json", handoffJSON("pool-0", "r0", "http://127.0.0.1:2222", 1))
	s := waitFor(t, w, "the duplicate to be reported", func(s handoff.Snapshot) bool { return len(s.Errors) == 1 && len(s.Replicas) == 1 })
	if fe := s.Errors[0]; fe.File != "b.json" || !strings.Contains(fe.Reason, "duplicate") || !strings.Contains(fe.Reason, "a.json") {
		t.Errorf("error = %+v, want b.json reported as a duplicate of a.json", fe)
	}
	if r := s.Replicas[0]; r.File != "a.json" {
		t.Errorf("replica from %s, want a.json", r.File)
	}

	removeFile(t, dir, "a.json")
	s = waitFor(t, w, "b.json to take over", hasReplica("pool-0", "r0", func(r handoff.Replica) bool { return r.File == "b.json" }))
	if len(s.Errors) != 0 {
		t.Errorf("errors = %+v, want none", s.Errors)
	}
}

func TestMissingDirectory(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "engines")
	w := startWatcher(t, dir)

	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "a.json", handoffJSON("pool-0", "r0", "http://127.0.0.1:1", 1))
	waitFor(t, w, "the replica once the directory exists", hasReplica("pool-0", "r0", nil))

	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	s := waitFor(t, w, "no replicas once the directory is gone", func(s handoff.Snapshot) bool { return len(s.Replicas) == 0 })
	if s.DirError != "" || len(s.Errors) != 0 {
		t.Errorf("missing directory reported as %q, %+v; want no error", s.DirError, s.Errors)
	}
}

func TestDirectoryIsAFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "engines")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	w := startWatcher(t, path)
	s := waitFor(t, w, "a directory error", func(s handoff.Snapshot) bool { return s.DirError != "" })
	if !strings.Contains(s.DirError, "not a directory") {
		t.Errorf("DirError = %q, want it to say it is not a directory", s.DirError)
	}
}

func TestChangedFires(t *testing.T) {
	dir := t.TempDir()
	eng, release := newGatedEngine(t, http.StatusOK)
	w := startWatcher(t, dir, func(c *handoff.Config) { c.ProbeTimeout = time.Minute })
	drainChanged(w)

	writeFile(t, dir, "a.json", handoffJSON("pool-0", "r0", eng.URL(), 1))
	waitChanged(t, w, "a file was added")
	if s := w.Snapshot(); !hasReplica("pool-0", "r0", func(r handoff.Replica) bool { return !r.Ready })(s) {
		t.Fatalf("after the add: %+v, want the replica, not ready", s)
	}

	release()
	waitChanged(t, w, "the engine answered")
	if s := w.Snapshot(); !hasReplica("pool-0", "r0", ready)(s) {
		t.Fatalf("after the probe: %+v, want the replica ready", s)
	}

	eng.status.Store(http.StatusInternalServerError)
	waitChanged(t, w, "the engine failed")
	if s := w.Snapshot(); !hasReplica("pool-0", "r0", notReady)(s) {
		t.Fatalf("after the failure: %+v, want the replica not ready", s)
	}

	writeFile(t, dir, "bad.json", "{")
	waitChanged(t, w, "a malformed file was added")
	if s := w.Snapshot(); len(s.Errors) != 1 {
		t.Fatalf("after the malformed file: %+v, want one error", s)
	}

	removeFile(t, dir, "a.json")
	waitChanged(t, w, "a file was removed")
	if s := w.Snapshot(); len(s.Replicas) != 0 {
		t.Fatalf("after the removal: %+v, want no replicas", s)
	}

	// Nothing changes: a later scan does not fire Changed. A new file
	// proves scans went on; its add must be the only change.
	writeFile(t, dir, "c.json", handoffJSON("pool-1", "r0", "http://127.0.0.1:1", 1))
	waitChanged(t, w, "another file was added")
	if s := w.Snapshot(); !hasReplica("pool-1", "r0", nil)(s) {
		t.Fatalf("Changed fired with no change; snapshot %+v", s)
	}
}

func TestSnapshotIsACopy(t *testing.T) {
	dir := t.TempDir()
	w := startWatcher(t, dir)
	if s := w.Snapshot(); len(s.Replicas) != 0 || len(s.Errors) != 0 || s.DirError != "" {
		t.Errorf("snapshot before any scan = %+v, want empty", s)
	}
	writeFile(t, dir, "a.json", handoffJSON("pool-0", "r0", "http://127.0.0.1:1", 1))
	s := waitFor(t, w, "the replica", hasReplica("pool-0", "r0", nil))
	s.Replicas[0].PoolID = "mutated"
	if _, ok := w.Snapshot().Replica("pool-0", "r0"); !ok {
		t.Error("changing a returned snapshot changed the watcher's")
	}
	if err := w.Run(context.Background()); !errors.Is(err, handoff.ErrRunning) {
		t.Errorf("second Run = %v, want ErrRunning", err)
	}
}

func TestManyReplicasConcurrentSnapshots(t *testing.T) {
	dir := t.TempDir()
	up := newEngine(t, http.StatusOK)
	down := newEngine(t, http.StatusServiceUnavailable)
	w := startWatcher(t, dir)
	ctx, cancel := context.WithCancel(context.Background())
	var readers sync.WaitGroup
	for range 4 {
		readers.Go(func() {
			for ctx.Err() == nil {
				_ = w.Snapshot().Pools()
			}
		})
	}
	defer readers.Wait()
	defer cancel()

	for i := range 10 {
		url := up.URL()
		if i%3 == 0 {
			url = down.URL()
		}
		writeFile(t, dir, fmt.Sprintf("r%d.json", i), handoffJSON(fmt.Sprintf("pool-%d", i%2), fmt.Sprintf("r%d", i), url, i+1))
	}
	s := waitFor(t, w, "ten replicas probed", func(s handoff.Snapshot) bool {
		if len(s.Replicas) != 10 {
			return false
		}
		for _, r := range s.Replicas {
			if !r.Ready && r.ProbeError == "" {
				return false
			}
		}
		return true
	})
	for i := 1; i < len(s.Replicas); i++ {
		a, b := s.Replicas[i-1], s.Replicas[i]
		if a.PoolID > b.PoolID || (a.PoolID == b.PoolID && a.ReplicaID >= b.ReplicaID) {
			t.Errorf("replicas not sorted: %s/%s before %s/%s", a.PoolID, a.ReplicaID, b.PoolID, b.ReplicaID)
		}
	}
	// pool-0: r0 r2 r4 r6 r8 (slots 1 3 5 7 9; r0 r6 on the down engine)
	// pool-1: r1 r3 r5 r7 r9 (slots 2 4 6 8 10; r3 r9 down)
	want := []handoff.Pool{
		{ID: "pool-0", Engine: "llamacpp", EngineVersion: "b3600", Replicas: 5, ReadyReplicas: 3, SlotsTotal: 25, SlotsFree: 17},
		{ID: "pool-1", Engine: "llamacpp", EngineVersion: "b3600", Replicas: 5, ReadyReplicas: 3, SlotsTotal: 30, SlotsFree: 16},
	}
	got := s.Pools()
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("pools = %+v\nwant %+v", got, want)
	}
}
