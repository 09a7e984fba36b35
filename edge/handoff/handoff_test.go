package handoff_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/llorch/llorch/edge/handoff"
)

func TestParse(t *testing.T) {
	const base = `"pool_id":"pool-0","replica_id":"r0","engine":"llamacpp","engine_version":"b3600","url":"http://127.0.0.1:8080"`
	tests := []struct {
		name    string
		in      string
		want    handoff.Replica // compared when wantErr is nil
		wantErr error
		reason  string // a part of the error message
	}{
		{
			name: "required fields only",
			in:   `{` + base + `}`,
			want: handoff.Replica{PoolID: "pool-0", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600", URL: "http://127.0.0.1:8080", Slots: 1},
		},
		{
			name: "all fields, model as a string",
			in:   `{` + base + `,"model":"llama-3-8b","device_mask":"0,1","slots":4,"pid":4242}`,
			want: handoff.Replica{PoolID: "pool-0", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600", URL: "http://127.0.0.1:8080", Model: "llama-3-8b", DeviceMask: "0,1", Slots: 4, PID: 4242},
		},
		{
			name: "as the origin's pool-managerd wrote it: model path, extra fields",
			in: `{"engine":"llamacpp","engine_version":"b3600","provisioning_mode":"source","url":"http://127.0.0.1:8081",
			      "pool_id":"pool-0","replica_id":"r0","model":{"path":"/models/llama.gguf"},"flags":["--parallel","4"]}`,
			want: handoff.Replica{PoolID: "pool-0", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600", URL: "http://127.0.0.1:8081", Model: "/models/llama.gguf", Slots: 1},
		},
		{
			name: "model object with id and path: the id",
			in:   `{` + base + `,"model":{"id":"llama-3-8b","path":"/models/llama.gguf"}}`,
			want: handoff.Replica{PoolID: "pool-0", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600", URL: "http://127.0.0.1:8080", Model: "llama-3-8b", Slots: 1},
		},
		{
			name: "model object with id only",
			in:   `{` + base + `,"model":{"id":"m1"}}`,
			want: handoff.Replica{PoolID: "pool-0", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600", URL: "http://127.0.0.1:8080", Model: "m1", Slots: 1},
		},
		{
			name: "null optional fields take their defaults",
			in:   `{` + base + `,"model":null,"slots":null,"pid":null,"device_mask":null}`,
			want: handoff.Replica{PoolID: "pool-0", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600", URL: "http://127.0.0.1:8080", Slots: 1},
		},
		{
			name: "https with a path prefix",
			in:   `{"pool_id":"p","replica_id":"r","engine":"vllm","engine_version":"0.6","url":"https://gpu-1.internal/engines/p/"}`,
			want: handoff.Replica{PoolID: "p", ReplicaID: "r", Engine: "vllm", EngineVersion: "0.6", URL: "https://gpu-1.internal/engines/p/", Slots: 1},
		},
		{name: "empty file", in: " \n", wantErr: handoff.ErrNotJSON, reason: "empty"},
		{name: "truncated JSON", in: `{"pool_id": "pool-0",`, wantErr: handoff.ErrNotJSON, reason: "invalid JSON: unexpected end"},
		{name: "syntax error has a position", in: "{\n  \"pool_id\": pool-0\n}", wantErr: handoff.ErrNotJSON, reason: "line 2"},
		{name: "an array", in: `[{` + base + `}]`, wantErr: handoff.ErrNotJSON, reason: "JSON array, want an object"},
		{name: "missing pool_id", in: `{"replica_id":"r0","engine":"llamacpp","engine_version":"b1","url":"http://h:1"}`, wantErr: handoff.ErrMissingField, reason: `"pool_id"`},
		{name: "missing replica_id", in: `{"pool_id":"p","engine":"llamacpp","engine_version":"b1","url":"http://h:1"}`, wantErr: handoff.ErrMissingField, reason: `"replica_id"`},
		{name: "missing engine", in: `{"pool_id":"p","replica_id":"r0","engine_version":"b1","url":"http://h:1"}`, wantErr: handoff.ErrMissingField, reason: `missing required field "engine"`},
		{name: "missing engine_version", in: `{"pool_id":"p","replica_id":"r0","engine":"llamacpp","url":"http://h:1"}`, wantErr: handoff.ErrMissingField, reason: `"engine_version"`},
		{name: "missing url", in: `{"pool_id":"p","replica_id":"r0","engine":"llamacpp","engine_version":"b1"}`, wantErr: handoff.ErrMissingField, reason: `"url"`},
		{name: "blank engine", in: `{"pool_id":"p","replica_id":"r0","engine":"  ","engine_version":"b1","url":"http://h:1"}`, wantErr: handoff.ErrMissingField, reason: `"engine"`},
		{name: "null pool_id", in: `{"pool_id":null,"replica_id":"r0","engine":"e","engine_version":"b1","url":"http://h:1"}`, wantErr: handoff.ErrMissingField, reason: `"pool_id"`},
		{name: "pool_id not a string", in: `{"pool_id":7,"replica_id":"r0","engine":"e","engine_version":"b1","url":"http://h:1"}`, wantErr: handoff.ErrBadValue, reason: `field "pool_id": want a string, got number`},
		{name: "url without scheme", in: `{"pool_id":"p","replica_id":"r","engine":"e","engine_version":"v","url":"127.0.0.1:8080"}`, wantErr: handoff.ErrBadURL, reason: `"127.0.0.1:8080": no scheme`},
		{name: "url not http", in: `{"pool_id":"p","replica_id":"r","engine":"e","engine_version":"v","url":"ftp://h/x"}`, wantErr: handoff.ErrBadURL, reason: "want an http or https URL"},
		{name: "url without host", in: `{"pool_id":"p","replica_id":"r","engine":"e","engine_version":"v","url":"http://:8080"}`, wantErr: handoff.ErrBadURL, reason: "no host"},
		{name: "url with a bad port", in: `{"pool_id":"p","replica_id":"r","engine":"e","engine_version":"v","url":"http://h:80x"}`, wantErr: handoff.ErrBadURL, reason: "port"},
		{name: "url with a query", in: `{"pool_id":"p","replica_id":"r","engine":"e","engine_version":"v","url":"http://h:1/?a=b"}`, wantErr: handoff.ErrBadURL, reason: "without query"},
		{name: "url with credentials", in: `{"pool_id":"p","replica_id":"r","engine":"e","engine_version":"v","url":"http://u:secret@h:1"}`, wantErr: handoff.ErrBadURL, reason: "credentials"},
		{name: "bad url with credentials", in: `{"pool_id":"p","replica_id":"r","engine":"e","engine_version":"v","url":"http://u:secret@h:8x"}`, wantErr: handoff.ErrBadURL, reason: "port"},
		{name: "slots -1", in: `{` + base + `,"slots":-1}`, wantErr: handoff.ErrBadValue, reason: `field "slots": must be at least 1, got -1`},
		{name: "slots 0", in: `{` + base + `,"slots":0}`, wantErr: handoff.ErrBadValue, reason: "at least 1"},
		{name: "slots fractional", in: `{` + base + `,"slots":1.5}`, wantErr: handoff.ErrBadValue, reason: `field "slots": want an integer`},
		{name: "slots a string", in: `{` + base + `,"slots":"4"}`, wantErr: handoff.ErrBadValue, reason: `field "slots": want an integer, got string`},
		{name: "negative pid", in: `{` + base + `,"pid":-3}`, wantErr: handoff.ErrBadValue, reason: `"pid"`},
		{name: "model a number", in: `{` + base + `,"model":3}`, wantErr: handoff.ErrBadValue, reason: `field "model": want a string or an object`},
		{name: "model path not a string", in: `{` + base + `,"model":{"path":5}}`, wantErr: handoff.ErrBadValue, reason: `"model.path"`},
		{name: "device_mask a list", in: `{` + base + `,"device_mask":[0,1]}`, wantErr: handoff.ErrBadValue, reason: `"device_mask"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := handoff.Parse([]byte(tt.in))
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				if got != tt.want {
					t.Errorf("Parse =\n %+v\nwant\n %+v", got, tt.want)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Parse error = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("Parse error = %q, want it to mention %q", err, tt.reason)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("Parse error %q repeats a credential", err)
			}
		})
	}
}

func TestPools(t *testing.T) {
	s := handoff.Snapshot{Replicas: []handoff.Replica{
		{PoolID: "pool-b", ReplicaID: "r0", Engine: "vllm", EngineVersion: "0.6", Model: "qwen", Slots: 8, Ready: true},
		{PoolID: "pool-a", ReplicaID: "r1", Engine: "llamacpp", EngineVersion: "b3600", Model: "llama", Slots: 3, Ready: false, ProbeError: "503"},
		{PoolID: "pool-a", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b3600", Slots: 2, Ready: true},
		{PoolID: "pool-a", ReplicaID: "r2", Engine: "llamacpp", EngineVersion: "b3600", Model: "llama", Slots: 4, Ready: true},
		{PoolID: "pool-c", ReplicaID: "r0", Engine: "llamacpp", EngineVersion: "b1", Slots: 1},
	}}
	want := []handoff.Pool{
		{ID: "pool-a", Engine: "llamacpp", EngineVersion: "b3600", Model: "llama", Replicas: 3, ReadyReplicas: 2, SlotsTotal: 9, SlotsFree: 6},
		{ID: "pool-b", Engine: "vllm", EngineVersion: "0.6", Model: "qwen", Replicas: 1, ReadyReplicas: 1, SlotsTotal: 8, SlotsFree: 8},
		{ID: "pool-c", Engine: "llamacpp", EngineVersion: "b1", Replicas: 1, ReadyReplicas: 0, SlotsTotal: 1, SlotsFree: 0},
	}
	got := s.Pools()
	if len(got) != len(want) {
		t.Fatalf("Pools = %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("Pools[%d] = %+v, want %+v", i, got[i], want[i])
		}
	}
	if s.Replicas[0].PoolID != "pool-b" {
		t.Errorf("Pools reordered the snapshot's replicas")
	}
	if pools := (handoff.Snapshot{}).Pools(); len(pools) != 0 {
		t.Errorf("Pools of an empty snapshot = %+v, want none", pools)
	}
}
