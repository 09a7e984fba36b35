package handoff

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/llorch/llorch/internal/clock"
)

// Bounds on what the watcher reads and reports, so that a crowded or hostile
// engines directory cannot make the edge read without end or send a
// heartbeat larger than the control plane accepts.
const (
	// MaxFileSize bounds a handoff file (a few hundred bytes is usual): a
	// larger one is reported as an error and never read past the bound.
	MaxFileSize = 64 << 10
	// MaxReplicas bounds the replicas a Snapshot holds: those of the first
	// files by name, so the choice is stable. The others are counted in
	// Snapshot.DroppedReplicas and not probed.
	MaxReplicas = 256
	// MaxErrors bounds the file errors a Snapshot holds: those of the first
	// files by name. The others are counted in Snapshot.DroppedErrors.
	MaxErrors = 64
)

const (
	// racyWindow: a file modified less than this long before a scan is read
	// again on the next scan even if its size and mtime look unchanged, since
	// two writes within one mtime tick (coarse on some filesystems) can leave
	// both equal.
	racyWindow = 2 * time.Second
	// notReadyProbeInterval caps the wait between probes of a replica that
	// is not ready, so an engine that finishes loading is seen soon.
	notReadyProbeInterval = time.Second
	// maxProbeBody bounds what is read of a health response, for its reason.
	maxProbeBody = 4 << 10
)

// Config configures a Watcher. The zero value watches DefaultDir.
type Config struct {
	Dir string // "": DefaultDir
	// PollInterval is the wait between directory scans; 0: 500ms, so a
	// change reaches the heartbeat within 2 s.
	PollInterval time.Duration
	// ProbeInterval is the wait between probes of a ready replica: GET
	// <url>/health (llama.cpp's health endpoint), where a 2xx answer means
	// ready. A replica that is not ready is probed at least every second;
	// a new or changed one at once. 0: 5s.
	ProbeInterval time.Duration
	ProbeTimeout  time.Duration // one probe's limit; 0: 2s
	HTTPClient    *http.Client  // nil: a client with ProbeTimeout that ignores proxy settings
	Clock         clock.Clock   // nil: the real clock
	Logger        *slog.Logger  // nil: discard
}

// Watcher keeps the view of the handoff directory current: it scans the
// directory, probes the engines and publishes a Snapshot.
type Watcher struct {
	dir           string
	pollInterval  time.Duration
	probeInterval time.Duration
	probeTimeout  time.Duration
	client        *http.Client
	clock         clock.Clock
	log           *slog.Logger
	changed       chan struct{}
	running       atomic.Bool

	mu   sync.Mutex
	snap Snapshot // published; never mutated after publication

	// Owned by the Run goroutine.
	files      map[string]*fileState  // by base name, every *.json seen
	probes     map[string]*probeState // by base name, for files with a valid replica at some point
	dirErr     string
	dirMissing bool
	gen        uint64
	// The caps were biting at the last publication (logged when they start).
	replicasCapped, errorsCapped bool
}

// fileState is the last reading of one file.
type fileState struct {
	size     int64
	mtime    time.Time
	racy     bool    // mtime was too recent to trust; read again on the next scan
	rep      Replica // valid when reason == ""
	reason   string  // why the file is malformed or unreadable
	reported bool    // in Snapshot.Replicas (false when malformed, a duplicate or dropped)
	dupOf    string  // the file that hands off the same replica, when this one is a duplicate
	dropped  bool    // valid, but past MaxReplicas
}

// probeState is a replica's engine health. It survives the file turning
// malformed for a while (a write in place) but not a change of URL.
type probeState struct {
	url      string
	gen      uint64 // results of probes started under another gen are dropped
	ready    bool
	err      string
	inFlight bool
	next     time.Time // when to probe next; zero: at once
}

type probeResult struct {
	file string
	gen  uint64
	err  error
}

// New returns a Watcher for cfg. It does no I/O; Run does.
func New(cfg Config) *Watcher {
	w := &Watcher{
		dir:           cfg.Dir,
		pollInterval:  cfg.PollInterval,
		probeInterval: cfg.ProbeInterval,
		probeTimeout:  cfg.ProbeTimeout,
		client:        cfg.HTTPClient,
		clock:         cfg.Clock,
		log:           cfg.Logger,
		changed:       make(chan struct{}, 1),
		files:         map[string]*fileState{},
		probes:        map[string]*probeState{},
	}
	if w.dir == "" {
		w.dir = DefaultDir
	}
	if w.pollInterval <= 0 {
		w.pollInterval = 500 * time.Millisecond
	}
	if w.probeInterval <= 0 {
		w.probeInterval = 5 * time.Second
	}
	if w.probeTimeout <= 0 {
		w.probeTimeout = 2 * time.Second
	}
	if w.client == nil {
		// Engines are probed directly, never through an HTTP proxy from the
		// environment.
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.Proxy = nil
		w.client = &http.Client{Timeout: w.probeTimeout, Transport: tr}
	}
	if w.clock == nil {
		w.clock = clock.Real{}
	}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	return w
}

// Snapshot returns the current view. It is safe for concurrent use, and the
// caller may keep or modify what it returns. Before Run's first scan it is
// empty.
func (w *Watcher) Snapshot() Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.snap
	s.Replicas = slices.Clone(s.Replicas)
	s.Errors = slices.Clone(s.Errors)
	return s
}

// Changed receives a value (the channel holds at most one) whenever the
// snapshot changes: a file added, changed or removed, a file turning
// malformed, a replica's readiness flipping, the directory becoming
// unreadable. Read Snapshot after it fires.
func (w *Watcher) Changed() <-chan struct{} { return w.changed }

// ErrRunning is returned by Run when the Watcher is already running.
var ErrRunning = errors.New("handoff watcher already running")

// Run scans the directory every PollInterval and probes the engines until ctx
// ends, then waits for its probes to stop and returns ctx.Err(). A rescan
// reads a file again only when its size or mtime changed, or when its mtime
// is less than 2 s old (two writes within one mtime tick can leave both
// unchanged). Problems with files or engines are reported in the Snapshot,
// never returned. Run returns ErrRunning if called while it runs.
func (w *Watcher) Run(ctx context.Context) error {
	if !w.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer w.running.Store(false)
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // runs before wg.Wait: stops the probes

	results := make(chan probeResult)
	var nextScan time.Time // zero: scan at once
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		now := w.clock.Now()
		if !now.Before(nextScan) {
			w.scan()
			nextScan = now.Add(w.pollInterval)
		}
		w.startProbes(ctx, &wg, now, results)
		w.publish()

		wake := nextScan
		for name, p := range w.probes {
			if st := w.files[name]; st != nil && st.reported && !p.inFlight && p.next.Before(wake) {
				wake = p.next
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case r := <-results:
			w.applyProbe(r)
		case <-w.clock.After(wake.Sub(now)):
		}
	}
}

// scan reads the directory and the files that changed since the last scan.
// Files are reached through an os.Root on the directory, so no symlink is
// followed out of it.
func (w *Watcher) scan() {
	root, err := os.OpenRoot(w.dir)
	var entries []fs.DirEntry
	if err == nil {
		defer root.Close()
		entries, err = readDir(root)
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if !w.dirMissing {
			w.log.Info("engine handoff directory does not exist: no engines", "dir", w.dir)
		}
		w.dirMissing, w.dirErr = true, ""
		for name := range w.files {
			w.removeFile(name)
		}
		return
	case err != nil:
		reason := unwrapPathError(err).Error()
		if fi, serr := os.Stat(w.dir); serr == nil && !fi.IsDir() {
			reason = fmt.Sprintf("%s is not a directory", w.dir)
		}
		if reason != w.dirErr {
			w.log.Warn("cannot read the engine handoff directory; keeping the engines last seen", "dir", w.dir, "err", reason)
		}
		w.dirMissing, w.dirErr = false, reason
		return
	}
	if w.dirErr != "" {
		w.log.Info("engine handoff directory readable again", "dir", w.dir)
	}
	w.dirMissing, w.dirErr = false, ""

	seen := map[string]bool{}
	for _, e := range entries {
		name := e.Name()
		if !isHandoffName(name) {
			continue
		}
		// Follows a symlink only while it stays inside the directory.
		fi, err := root.Stat(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed since ReadDir, or a dangling symlink
		}
		if err == nil && fi.IsDir() {
			continue
		}
		seen[name] = true
		w.scanFile(root, name, e.Type()&fs.ModeSymlink != 0, fi, err)
	}
	for name := range w.files {
		if !seen[name] {
			w.removeFile(name)
		}
	}
	w.resolve()
}

func readDir(root *os.Root) ([]fs.DirEntry, error) {
	d, err := root.Open(".")
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return d.ReadDir(-1)
}

// isHandoffName says whether a directory entry is a handoff file.
func isHandoffName(name string) bool {
	return strings.HasSuffix(name, ".json") && !strings.HasPrefix(name, ".") && len(name) > len(".json")
}

// scanFile reads name again if it is new or changed (or was racy). fi and
// statErr are what root.Stat said of it; symlink, whether the entry is one.
func (w *Watcher) scanFile(root *os.Root, name string, symlink bool, fi fs.FileInfo, statErr error) {
	old := w.files[name]
	if statErr == nil && fi.Mode().IsRegular() && old != nil && !old.racy && old.size == fi.Size() && old.mtime.Equal(fi.ModTime()) {
		return
	}
	st := &fileState{}
	if old != nil {
		st.dupOf = old.dupOf // so a duplicate is logged once, not at every reading
	}
	var data []byte
	err := statErr
	switch {
	case err != nil:
	case !fi.Mode().IsRegular():
		err = notRegularError{fi.Mode()} // never opened
	default:
		var opened fs.FileInfo
		data, opened, err = readFile(root, name)
		if opened != nil {
			fi = opened // what was read, if the file was replaced since the Stat
		}
		st.size, st.mtime = fi.Size(), fi.ModTime()
		// The filesystem stamps mtimes with the wall clock, so this compares
		// against the wall clock, not the injected one.
		st.racy = time.Since(st.mtime) < racyWindow
	}
	if errors.Is(err, fs.ErrNotExist) {
		w.removeFile(name)
		return
	}
	if err != nil {
		st.reason = unreadableReason(symlink && statErr != nil, err)
	} else if rep, err := Parse(data); err != nil {
		st.reason = err.Error()
	} else {
		rep.File = name
		rep.ModTime = st.mtime
		st.rep = rep
	}
	w.files[name] = st

	switch {
	case st.reason != "":
		if old == nil || old.reason != st.reason {
			w.log.Warn("malformed engine handoff file", "file", name, "reason", st.reason)
		}
	case old == nil || old.reason != "":
		w.log.Info("engine replica handed off", "file", name, "pool", st.rep.PoolID, "replica", st.rep.ReplicaID, "engine", st.rep.Engine, "url", st.rep.URL)
	case !sameContent(old.rep, st.rep):
		w.log.Info("engine replica changed", "file", name, "pool", st.rep.PoolID, "replica", st.rep.ReplicaID, "url", st.rep.URL, "slots", st.rep.Slots)
	}
	if st.reason != "" {
		return // keep the probe state: a write in place may complete soon
	}
	p := w.probes[name]
	switch {
	case p == nil || p.url != st.rep.URL:
		w.gen++
		w.probes[name] = &probeState{url: st.rep.URL, gen: w.gen}
	case old == nil || !sameContent(old.rep, st.rep):
		p.next = time.Time{} // changed: probe at once, keep readiness meanwhile
	}
}

func (w *Watcher) removeFile(name string) {
	if st, ok := w.files[name]; ok {
		if st.reason == "" {
			w.log.Info("engine replica removed", "file", name, "pool", st.rep.PoolID, "replica", st.rep.ReplicaID)
		}
		delete(w.files, name)
	}
	delete(w.probes, name)
}

// resolve keeps, of files naming the same pool and replica, the first by
// file name, and reports the others as duplicates; of the rest, it reports
// the first MaxReplicas by file name and drops the others.
func (w *Watcher) resolve() {
	names := make([]string, 0, len(w.files))
	for name := range w.files {
		names = append(names, name)
	}
	slices.Sort(names)
	owner := map[[2]string]string{}
	for _, name := range names {
		st := w.files[name]
		st.reported, st.dropped = false, false
		if st.reason != "" {
			st.dupOf = ""
			continue
		}
		key := [2]string{st.rep.PoolID, st.rep.ReplicaID}
		if first, dup := owner[key]; dup {
			if st.dupOf != first {
				w.log.Warn("duplicate engine handoff file ignored", "file", name, "pool", st.rep.PoolID, "replica", st.rep.ReplicaID, "first", first)
			}
			st.dupOf = first
			continue
		}
		st.dupOf = ""
		owner[key] = name
		if len(owner) > MaxReplicas {
			st.dropped = true
			continue
		}
		st.reported = true
	}
}

// startProbes starts a probe for every reported replica that is due.
func (w *Watcher) startProbes(ctx context.Context, wg *sync.WaitGroup, now time.Time, results chan<- probeResult) {
	for name, p := range w.probes {
		st := w.files[name]
		if p.inFlight || st == nil || !st.reported || now.Before(p.next) {
			continue
		}
		p.inFlight = true
		res := probeResult{file: name, gen: p.gen}
		u := p.url
		wg.Go(func() {
			res.err = w.probe(ctx, u)
			select {
			case results <- res:
			case <-ctx.Done():
			}
		})
	}
}

// applyProbe records a probe's result, unless the replica changed URL or
// went away while it ran.
func (w *Watcher) applyProbe(r probeResult) {
	p := w.probes[r.file]
	if p == nil || p.gen != r.gen {
		return
	}
	p.inFlight = false
	ready, reason := r.err == nil, ""
	if r.err != nil {
		reason = r.err.Error()
	}
	if ready != p.ready {
		if ready {
			w.log.Info("engine replica ready", "file", r.file, "url", p.url)
		} else {
			w.log.Warn("engine replica not ready", "file", r.file, "url", p.url, "reason", reason)
		}
	}
	p.ready, p.err = ready, reason
	wait := w.probeInterval
	if !ready {
		wait = min(wait, notReadyProbeInterval)
	}
	p.next = w.clock.Now().Add(wait)
}

// probe asks the engine at base whether it is ready: GET <base>/health.
func (w *Watcher) probe(ctx context.Context, base string) error {
	ctx, cancel := context.WithTimeout(ctx, w.probeTimeout)
	defer cancel()
	target := strings.TrimSuffix(base, "/") + "/health"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", target, err)
	}
	resp, err := w.client.Do(req)
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			return fmt.Errorf("GET %s: no answer within %v", target, w.probeTimeout)
		}
		return fmt.Errorf("GET %s: %w", target, unwrapURLError(err))
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxProbeBody))
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	msg := fmt.Sprintf("GET %s: %s", target, resp.Status)
	if detail := healthDetail(body); detail != "" {
		msg += ": " + detail
	}
	return errors.New(msg)
}

// healthDetail extracts a short reason from an unhealthy answer: llama.cpp's
// {"error":{"message":...}}, else the start of the body.
func healthDetail(body []byte) string {
	var v struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
		Status string `json:"status"`
	}
	s := ""
	if json.Unmarshal(body, &v) == nil {
		s = v.Error.Message
		if s == "" {
			s = v.Status
		}
	} else {
		s = string(body)
	}
	s = strings.Join(strings.Fields(s), " ")
	s = strings.ToValidUTF8(s, "?")
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return s
}

// publish builds the snapshot from the current state and, if it differs
// from the published one, publishes it and signals Changed.
func (w *Watcher) publish() {
	var s Snapshot
	s.DirError = w.dirErr
	for name, st := range w.files {
		switch {
		case st.reason != "":
			s.Errors = append(s.Errors, FileError{File: name, Reason: st.reason})
		case st.dupOf != "":
			s.Errors = append(s.Errors, FileError{File: name, Reason: fmt.Sprintf("duplicate replica: pool %q replica %q is already handed off by %s", st.rep.PoolID, st.rep.ReplicaID, st.dupOf)})
		case st.dropped:
			s.DroppedReplicas++
		default:
			r := st.rep
			if p := w.probes[name]; p != nil {
				r.Ready, r.ProbeError = p.ready, p.err
			}
			s.Replicas = append(s.Replicas, r)
		}
	}
	sortReplicas(s.Replicas)
	slices.SortFunc(s.Errors, func(a, b FileError) int { return strings.Compare(a.File, b.File) })
	if len(s.Errors) > MaxErrors {
		s.DroppedErrors = len(s.Errors) - MaxErrors
		s.Errors = s.Errors[:MaxErrors:MaxErrors]
	}
	w.logCaps(s)

	w.mu.Lock()
	same := equalSnapshots(w.snap, s)
	if !same {
		w.snap = s
	}
	w.mu.Unlock()
	if !same {
		select {
		case w.changed <- struct{}{}:
		default:
		}
	}
}

// logCaps warns when a cap starts to bite, and says when it stops.
func (w *Watcher) logCaps(s Snapshot) {
	if capped := s.DroppedReplicas > 0; capped != w.replicasCapped {
		w.replicasCapped = capped
		if capped {
			w.log.Warn("more engine replicas handed off than a heartbeat carries: reporting those of the first files by name, counting the others as dropped",
				"dir", w.dir, "reported", len(s.Replicas), "dropped", s.DroppedReplicas)
		} else {
			w.log.Info("every engine replica handed off is reported again", "dir", w.dir)
		}
	}
	if capped := s.DroppedErrors > 0; capped != w.errorsCapped {
		w.errorsCapped = capped
		if capped {
			w.log.Warn("more bad engine handoff files than a heartbeat carries: reporting those of the first files by name, counting the others as dropped",
				"dir", w.dir, "reported", len(s.Errors), "dropped", s.DroppedErrors)
		} else {
			w.log.Info("every bad engine handoff file is reported again", "dir", w.dir)
		}
	}
}

func equalSnapshots(a, b Snapshot) bool {
	return a.DirError == b.DirError &&
		a.DroppedReplicas == b.DroppedReplicas && a.DroppedErrors == b.DroppedErrors &&
		slices.Equal(a.Errors, b.Errors) &&
		slices.EqualFunc(a.Replicas, b.Replicas, func(x, y Replica) bool {
			return sameContent(x, y) && x.File == y.File && x.Ready == y.Ready && x.ProbeError == y.ProbeError && x.ModTime.Equal(y.ModTime)
		})
}

// sameContent compares what a handoff file says about a replica.
func sameContent(a, b Replica) bool {
	return a.PoolID == b.PoolID && a.ReplicaID == b.ReplicaID && a.Engine == b.Engine &&
		a.EngineVersion == b.EngineVersion && a.URL == b.URL && a.Model == b.Model &&
		a.DeviceMask == b.DeviceMask && a.Slots == b.Slots && a.PID == b.PID
}

// readFile reads name, a regular file of at most MaxFileSize bytes, and
// returns what fstat said of the file it opened. It opens without blocking
// and checks the open file, so a FIFO or a device that replaced the file
// since it was looked at is refused, never waited on nor read; and it never
// reads past MaxFileSize.
func readFile(root *os.Root, name string) ([]byte, fs.FileInfo, error) {
	f, err := root.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fi, notRegularError{fi.Mode()}
	}
	if fi.Size() > MaxFileSize {
		return nil, fi, errTooLarge
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize))
	if err != nil {
		return nil, fi, err
	}
	if len(data) == MaxFileSize {
		// It may have grown since the fstat: ask again rather than read on.
		if now, err := f.Stat(); err == nil && now.Size() > MaxFileSize {
			return nil, now, errTooLarge
		}
	}
	return data, fi, nil
}

var errTooLarge = fmt.Errorf("larger than %d KiB", MaxFileSize>>10)

// notRegularError refuses a FIFO, socket or device.
type notRegularError struct{ mode fs.FileMode }

func (e notRegularError) Error() string {
	kind := "irregular file"
	switch {
	case e.mode&fs.ModeNamedPipe != 0:
		kind = "fifo"
	case e.mode&fs.ModeSocket != 0:
		kind = "socket"
	case e.mode&fs.ModeCharDevice != 0:
		kind = "character device"
	case e.mode&fs.ModeDevice != 0:
		kind = "block device"
	case e.mode.IsDir():
		kind = "directory"
	}
	return "not a regular file (" + kind + ")"
}

// unreadableReason is a file error's reason in the snapshot. badLink says
// the file is a symlink that could not be resolved inside the directory.
func unreadableReason(badLink bool, err error) string {
	var notRegular notRegularError
	switch {
	case errors.Is(err, errTooLarge), errors.As(err, &notRegular):
		return err.Error()
	case badLink:
		return fmt.Sprintf("symlink not followed: %v", unwrapPathError(err))
	}
	return fmt.Sprintf("cannot read: %v", unwrapPathError(err))
}

func unwrapPathError(err error) error {
	if pe, ok := errors.AsType[*fs.PathError](err); ok {
		return pe.Err
	}
	return err
}
