// Package handoff owns the edge's view of its inference engines. Engine
// provisioners hand an engine replica over to the edge by writing one JSON
// file per replica into a directory (default .runtime/engines); this package
// reads those files, probes each engine's health endpoint, and reports the
// replicas, grouped into pools, for the edge's heartbeats. Everything the edge
// knows about engines goes through a Watcher: nothing else reads the handoff
// directory or probes engines.
//
// A file is named <anything>.json; hidden files (a leading dot, as temporary
// files written before a rename are) and other names are ignored. Its fields:
//
//	pool_id, replica_id, engine, engine_version  required strings
//	url             required http or https URL of the engine (no query)
//	model           optional: a string, or an object with "id" and/or "path"
//	device_mask     optional string, e.g. "0,1"
//	slots           optional integer ≥ 1, default 1
//	pid             optional integer ≥ 0
//
// Unknown fields are ignored. A file that breaks these rules is malformed: it
// is reported with its reason and never stops the watcher. Writers should
// write a temporary file and rename it; a file written in place may look
// malformed for one scan.
//
// The watcher reads only regular files of at most MaxFileSize bytes inside
// the directory: a FIFO, socket or device is reported ("not a regular file
// (fifo)") and never opened for reading, a symlink is followed only while it
// stays inside the directory (through os.Root; one to /etc/shadow or ../x is
// reported and not read), and subdirectories are ignored. A snapshot holds
// at most MaxReplicas replicas and MaxErrors file errors, those of the first
// files by name, and counts the rest.
package handoff

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"
)

// DefaultDir is where engine provisioners write handoff files, relative to
// the edge's working directory.
const DefaultDir = ".runtime/engines"

// Reasons a handoff file is malformed. Parse wraps one of them with the
// detail (which field, what was found); FileError.Reason is that message.
var (
	// ErrNotJSON: the file is empty, not JSON, or not a JSON object.
	ErrNotJSON = errors.New("invalid JSON")
	// ErrMissingField: a required field is absent, null or blank.
	ErrMissingField = errors.New("missing required field")
	// ErrBadURL: url is not an absolute http or https URL.
	ErrBadURL = errors.New("bad url")
	// ErrBadValue: a field has the wrong type or an out-of-range value.
	ErrBadValue = errors.New("bad value")
)

// Replica is one engine replica, read from one handoff file.
type Replica struct {
	File          string // the handoff file's base name
	PoolID        string
	ReplicaID     string
	Engine        string // e.g. "llamacpp"
	EngineVersion string
	URL           string // the engine's base URL, as written in the file
	Model         string // the model's id, else its path; "" when the file names none
	DeviceMask    string // "" when the file names none
	Slots         int    // ≥ 1
	PID           int    // 0 when the file names none
	// Ready says the last probe of the engine succeeded; false until one has.
	Ready bool
	// ProbeError says why the replica is not ready: "" when it is ready or
	// has not been probed yet.
	ProbeError string
	ModTime    time.Time // the file's modification time
}

// FileError reports a handoff file that could not be used.
type FileError struct {
	File   string // base name
	Reason string
}

// Snapshot is the watcher's view of the handoff directory at one moment.
type Snapshot struct {
	Replicas []Replica   // sorted by PoolID, then ReplicaID
	Errors   []FileError // malformed or unreadable files, sorted by File
	// DirError says why the directory itself could not be read; the
	// replicas are then those of the last successful scan. A missing
	// directory is not an error: it holds no replicas.
	DirError string
	// DroppedReplicas counts the valid replicas left out past MaxReplicas
	// (those of the last files by name); they are not probed either.
	DroppedReplicas int
	// DroppedErrors counts the file errors left out past MaxErrors.
	DroppedErrors int
}

// Pool is the replicas of one pool, summed up for reporting.
type Pool struct {
	ID            string
	Engine        string // of the first replica (by ReplicaID) that names one
	EngineVersion string // likewise
	Model         string // likewise
	Replicas      int
	ReadyReplicas int
	SlotsTotal    int // slots of all replicas
	SlotsFree     int // slots of the ready replicas (the edge has no load information yet)
	// Draining is never set by this package: handoff files do not carry
	// it. It is here so the edge can report a drain in the same struct.
	Draining bool
}

// Pools groups the snapshot's replicas by PoolID, sorted by ID.
func (s Snapshot) Pools() []Pool {
	reps := slices.Clone(s.Replicas)
	sortReplicas(reps)
	var pools []Pool
	for _, r := range reps {
		if len(pools) == 0 || pools[len(pools)-1].ID != r.PoolID {
			pools = append(pools, Pool{ID: r.PoolID})
		}
		p := &pools[len(pools)-1]
		p.Replicas++
		p.SlotsTotal += r.Slots
		if r.Ready {
			p.ReadyReplicas++
			p.SlotsFree += r.Slots
		}
		if p.Engine == "" {
			p.Engine = r.Engine
		}
		if p.EngineVersion == "" {
			p.EngineVersion = r.EngineVersion
		}
		if p.Model == "" {
			p.Model = r.Model
		}
	}
	return pools
}

// Replica returns the replica poolID/replicaID and whether the snapshot has it.
func (s Snapshot) Replica(poolID, replicaID string) (Replica, bool) {
	for _, r := range s.Replicas {
		if r.PoolID == poolID && r.ReplicaID == replicaID {
			return r, true
		}
	}
	return Replica{}, false
}

// fileJSON is the handoff file as written. Pointers tell absent from zero.
type fileJSON struct {
	PoolID        *string         `json:"pool_id"`
	ReplicaID     *string         `json:"replica_id"`
	Engine        *string         `json:"engine"`
	EngineVersion *string         `json:"engine_version"`
	URL           *string         `json:"url"`
	Model         json.RawMessage `json:"model"`
	DeviceMask    *string         `json:"device_mask"`
	Slots         *int            `json:"slots"`
	PID           *int            `json:"pid"`
}

// Parse reads one handoff file's content. The Replica it returns has no File,
// ModTime or readiness. The error wraps ErrNotJSON, ErrMissingField, ErrBadURL
// or ErrBadValue, and its message says which field and what was wrong.
func Parse(data []byte) (Replica, error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return Replica{}, fmt.Errorf("%w: the file is empty", ErrNotJSON)
	}
	if !json.Valid(trimmed) {
		var v any
		err := json.Unmarshal(trimmed, &v) // for the syntax error's position
		return Replica{}, fmt.Errorf("%w: %s", ErrNotJSON, syntaxDetail(data, err))
	}
	if trimmed[0] != '{' {
		return Replica{}, fmt.Errorf("%w: the file holds a JSON %s, want an object", ErrNotJSON, jsonKind(trimmed))
	}
	var f fileJSON
	if err := json.Unmarshal(trimmed, &f); err != nil {
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
			return Replica{}, fmt.Errorf("%w: field %q: want %s, got %s", ErrBadValue, te.Field, typeName(te.Type.Kind().String()), te.Value)
		}
		return Replica{}, fmt.Errorf("%w: %v", ErrBadValue, err)
	}

	r := Replica{Slots: 1}
	for _, req := range []struct {
		name string
		v    *string
		dst  *string
	}{
		{"pool_id", f.PoolID, &r.PoolID},
		{"replica_id", f.ReplicaID, &r.ReplicaID},
		{"engine", f.Engine, &r.Engine},
		{"engine_version", f.EngineVersion, &r.EngineVersion},
		{"url", f.URL, &r.URL},
	} {
		if req.v == nil || strings.TrimSpace(*req.v) == "" {
			return Replica{}, fmt.Errorf("%w %q", ErrMissingField, req.name)
		}
		*req.dst = *req.v
	}
	if err := checkURL(r.URL); err != nil {
		return Replica{}, err
	}
	model, err := parseModel(f.Model)
	if err != nil {
		return Replica{}, err
	}
	r.Model = model
	if f.DeviceMask != nil {
		r.DeviceMask = *f.DeviceMask
	}
	if f.Slots != nil {
		if *f.Slots < 1 {
			return Replica{}, fmt.Errorf("%w: field \"slots\": must be at least 1, got %d", ErrBadValue, *f.Slots)
		}
		r.Slots = *f.Slots
	}
	if f.PID != nil {
		if *f.PID < 0 {
			return Replica{}, fmt.Errorf("%w: field \"pid\": must not be negative, got %d", ErrBadValue, *f.PID)
		}
		r.PID = *f.PID
	}
	return r, nil
}

// checkURL accepts an absolute http or https URL with a host, since the
// watcher probes <url>/health.
func checkURL(s string) error {
	q := redactUserinfo(s)
	if !strings.Contains(s, "://") {
		return fmt.Errorf("%w %q: no scheme; want an http or https URL such as http://127.0.0.1:8080", ErrBadURL, q)
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%w %q: %v", ErrBadURL, q, unwrapURLError(err))
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("%w %q: want an http or https URL such as http://127.0.0.1:8080", ErrBadURL, q)
	case u.Hostname() == "":
		return fmt.Errorf("%w %q: no host", ErrBadURL, q)
	case u.User != nil:
		return fmt.Errorf("%w: credentials in the url are not supported", ErrBadURL) // and not echoed
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		return fmt.Errorf("%w %q: want a base URL without query or fragment", ErrBadURL, q)
	}
	return nil
}

// redactUserinfo hides what precedes an @ in a URL, so errors never repeat
// a password.
func redactUserinfo(s string) string {
	at := strings.LastIndex(s, "@")
	sch := strings.Index(s, "://")
	if at < 0 || sch < 0 || at < sch {
		return s
	}
	return s[:sch+3] + "…@" + s[at+1:]
}

func unwrapURLError(err error) error {
	if ue, ok := errors.AsType[*url.Error](err); ok {
		return ue.Err
	}
	return err
}

// parseModel accepts a string, or an object with "id" and/or "path" (the
// origin's provisioners wrote {"path": ...} and {"id": ..., "path": ...}).
func parseModel(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", fmt.Errorf("%w: field \"model\": %v", ErrBadValue, err)
		}
		return s, nil
	case '{':
		var m struct {
			ID   *string `json:"id"`
			Path *string `json:"path"`
		}
		if err := json.Unmarshal(raw, &m); err != nil {
			if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
				return "", fmt.Errorf("%w: field \"model.%s\": want a string, got %s", ErrBadValue, te.Field, te.Value)
			}
			return "", fmt.Errorf("%w: field \"model\": %v", ErrBadValue, err)
		}
		if m.ID != nil && *m.ID != "" {
			return *m.ID, nil
		}
		if m.Path != nil {
			return *m.Path, nil
		}
		return "", nil
	default:
		return "", fmt.Errorf("%w: field \"model\": want a string or an object with \"id\" and/or \"path\", got %s", ErrBadValue, jsonKind(raw))
	}
}

// syntaxDetail turns a JSON syntax error into "message at line L, column C".
func syntaxDetail(data []byte, err error) string {
	se, ok := errors.AsType[*json.SyntaxError](err)
	if !ok {
		if err == nil {
			return "unknown error"
		}
		return err.Error()
	}
	// Offset counts bytes of the trimmed input; add the leading space back.
	off := int(se.Offset) + (len(data) - len(bytes.TrimLeft(data, " \t\r\n")))
	off = min(off, len(data))
	line := 1 + bytes.Count(data[:off], []byte("\n"))
	col := off - bytes.LastIndexByte(data[:off], '\n') - 1
	return fmt.Sprintf("%s (line %d, column %d)", se.Error(), line, max(col, 1))
}

// jsonKind names the kind of a valid JSON value from its first byte.
func jsonKind(v []byte) string {
	switch v[0] {
	case '{':
		return "object"
	case '[':
		return "array"
	case '"':
		return "string"
	case 't', 'f':
		return "boolean"
	case 'n':
		return "null"
	default:
		return "number"
	}
}

// typeName names a Go kind the way a file's author thinks of it.
func typeName(kind string) string {
	switch {
	case strings.HasPrefix(kind, "int"), strings.HasPrefix(kind, "uint"):
		return "an integer"
	case kind == "string":
		return "a string"
	default:
		return kind
	}
}

func sortReplicas(rs []Replica) {
	slices.SortFunc(rs, func(a, b Replica) int {
		if c := strings.Compare(a.PoolID, b.PoolID); c != 0 {
			return c
		}
		if c := strings.Compare(a.ReplicaID, b.ReplicaID); c != 0 {
			return c
		}
		return strings.Compare(a.File, b.File)
	})
}
