package store_test

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/llorch/llorch/control"
	"github.com/llorch/llorch/control/store"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 123456789, time.UTC)

func newStore(tb testing.TB) *store.Store {
	tb.Helper()
	return openStore(tb, filepath.Join(tb.TempDir(), "llorch.db"))
}

func openStore(tb testing.TB, path string) *store.Store {
	tb.Helper()
	s, err := store.Open(context.Background(), path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Error(err)
		}
	})
	return s
}

// rawDB opens path without the store, to set up or inspect schemas by hand.
func rawDB(tb testing.TB, path string) *sql.DB {
	tb.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	return db
}

func hash(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

func newToken(id string, maxUses int) control.JoinToken {
	return control.JoinToken{
		ID:         id,
		Name:       "token " + id,
		Labels:     map[string]string{"pool": "a"},
		SecretHash: hash("secret-" + id),
		CreatedAt:  t0,
		ExpiresAt:  t0.Add(time.Hour),
		MaxUses:    maxUses,
	}
}

func newNode(id string) control.Node {
	return control.Node{
		ID:           id,
		Name:         "name-" + id,
		Labels:       map[string]string{"gpu": "h100"},
		CertSerial:   "serial-" + id + "-1",
		CertNotAfter: t0.Add(24 * time.Hour),
	}
}

func mustCreateToken(tb testing.TB, s *store.Store, t control.JoinToken) {
	tb.Helper()
	if err := s.CreateToken(context.Background(), t); err != nil {
		tb.Fatal(err)
	}
}

// mustEnroll enrolls node with a fresh single-use token named after it.
func mustEnroll(tb testing.TB, s *store.Store, node control.Node) {
	tb.Helper()
	tok := newToken("tok-"+node.ID, 1)
	mustCreateToken(tb, s, tok)
	if err := s.EnrollNode(context.Background(), tok.ID, tok.SecretHash, t0.Add(time.Minute), node); err != nil {
		tb.Fatal(err)
	}
}

func mustGetNode(tb testing.TB, s *store.Store, id string) control.Node {
	tb.Helper()
	n, err := s.GetNode(context.Background(), id)
	if err != nil {
		tb.Fatal(err)
	}
	return n
}

func mustListEvents(tb testing.TB, s *store.Store, nodeID string) []control.Event {
	tb.Helper()
	es, err := s.ListEvents(context.Background(), nodeID, 1000)
	if err != nil {
		tb.Fatal(err)
	}
	return es
}

func countKind(es []control.Event, kind control.EventKind) int {
	n := 0
	for _, e := range es {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

func wantErr(tb testing.TB, err, want error) {
	tb.Helper()
	if !errors.Is(err, want) {
		tb.Fatalf("error = %v, want %v", err, want)
	}
}

func migrationFiles(tb testing.TB) []string {
	tb.Helper()
	files, err := filepath.Glob("migrations/*.sql")
	if err != nil || len(files) == 0 {
		tb.Fatalf("no migrations: %v", err)
	}
	sort.Strings(files)
	return files
}

// schemaVersions returns the rows of schema_migrations.
func schemaVersions(tb testing.TB, path string) []string {
	tb.Helper()
	db := rawDB(tb, path)
	defer db.Close()
	rows, err := db.Query(`SELECT version, applied_at FROM schema_migrations ORDER BY version`)
	if err != nil {
		tb.Fatal(err)
	}
	defer rows.Close()
	var vs []string
	for rows.Next() {
		var v int
		var at string
		if err := rows.Scan(&v, &at); err != nil {
			tb.Fatal(err)
		}
		vs = append(vs, fmt.Sprintf("%d %s", v, at))
	}
	if err := rows.Err(); err != nil {
		tb.Fatal(err)
	}
	return vs
}

func TestOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data", "llorch.db")
	s := openStore(t, path)
	if s.Path() != path {
		t.Errorf("Path() = %q, want %q", s.Path(), path)
	}
	mustCreateToken(t, s, newToken("t1", 1)) // so the -wal file exists
	for name, want := range map[string]os.FileMode{
		filepath.Dir(path): 0o700,
		path:               0o600,
		path + "-wal":      0o600,
	} {
		fi, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s: mode %o, want %o", name, got, want)
		}
	}
	if err := s.IntegrityCheck(t.Context()); err != nil {
		t.Error(err)
	}
}

func TestMigrations(t *testing.T) {
	files := migrationFiles(t)

	t.Run("reopen is a no-op", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "llorch.db")
		if err := openStore(t, path).Close(); err != nil {
			t.Fatal(err)
		}
		first := schemaVersions(t, path)
		if len(first) != len(files) {
			t.Fatalf("schema_migrations = %q, want %d rows", first, len(files))
		}
		if err := openStore(t, path).Close(); err != nil {
			t.Fatal(err)
		}
		if again := schemaVersions(t, path); !reflect.DeepEqual(again, first) {
			t.Errorf("after reopen schema_migrations = %q, want %q", again, first)
		}
	})

	t.Run("too new", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "llorch.db")
		if err := openStore(t, path).Close(); err != nil {
			t.Fatal(err)
		}
		db := rawDB(t, path)
		if _, err := db.Exec(`INSERT INTO schema_migrations (version, applied_at) VALUES (?, 'later')`, len(files)+1); err != nil {
			t.Fatal(err)
		}
		db.Close()
		s, err := store.Open(t.Context(), path)
		if err == nil {
			s.Close()
		}
		wantErr(t, err, control.ErrSchemaTooNew)
	})

	// A database left at version 1 by an old binary, holding data, is
	// migrated to head and its data still reads back.
	t.Run("from version 1", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "llorch.db")
		v1, err := os.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		db := rawDB(t, path)
		for _, q := range []string{
			`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)`,
			string(v1),
			`INSERT INTO schema_migrations VALUES (1, '2026-01-01T00:00:00Z')`,
			fmt.Sprintf(`INSERT INTO join_tokens (id, name, labels, secret_hash, created_at, expires_at, max_uses, uses)
				VALUES ('old', 'old token', '{"pool":"a"}', x'%x', %d, %d, 2, 1)`,
				hash("secret-old"), t0.UnixNano(), t0.Add(time.Hour).UnixNano()),
			fmt.Sprintf(`INSERT INTO nodes (id, name, status, labels, token_id, cert_serial, cert_not_after, enrolled_at)
				VALUES ('n-old', 'old node', 'online', '{}', 'old', 'aa', %d, %d)`,
				t0.Add(24*time.Hour).UnixNano(), t0.UnixNano()),
			fmt.Sprintf(`INSERT INTO events (time, node_id, kind, reason) VALUES
				(%[1]d, 'n-old', 'enrolled', 'enrolled with token old'),
				(%[1]d, 'n-old', 'status', 'enrolled -> online: registered'),
				(%[1]d, 'n-old', 'status', 'online -> disconnected: session lost: read: connection reset'),
				(%[1]d, 'n-old', 'status', 'disconnected -> offline')`, t0.UnixNano()),
		} {
			if _, err := db.Exec(q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		db.Close()

		s := openStore(t, path)
		if vs := schemaVersions(t, path); len(vs) != len(files) {
			t.Fatalf("schema_migrations = %q, want versions 1..%d", vs, len(files))
		}
		n := mustGetNode(t, s, "n-old")
		if n.Status != control.StatusOnline || n.TokenID != "old" || n.CertSerial != "aa" || !n.EnrolledAt.Equal(t0) {
			t.Errorf("migrated node = %+v", n)
		}
		// Status events written as text by version 1 are taken apart.
		type move struct {
			kind     control.EventKind
			from, to control.NodeStatus
			reason   string
		}
		var moves []move
		for _, e := range mustListEvents(t, s, "n-old") {
			moves = append(moves, move{e.Kind, e.From, e.To, e.Reason})
		}
		want := []move{
			{control.EventStatus, control.StatusDisconnected, control.StatusOffline, ""},
			{control.EventStatus, control.StatusOnline, control.StatusDisconnected, "session lost: read: connection reset"},
			{control.EventStatus, control.StatusEnrolled, control.StatusOnline, "registered"},
			{control.EventEnrolled, "", "", "enrolled with token old"},
		}
		if !reflect.DeepEqual(moves, want) {
			t.Errorf("migrated events:\n got %+v\nwant %+v", moves, want)
		}
		// The token's second use still works after the migration.
		if err := s.EnrollNode(t.Context(), "old", hash("secret-old"), t0, newNode("n-new")); err != nil {
			t.Fatal(err)
		}
		err = s.EnrollNode(t.Context(), "old", hash("secret-old"), t0, newNode("n-third"))
		wantErr(t, err, control.ErrTokenUsed)
		if err := s.IntegrityCheck(t.Context()); err != nil {
			t.Error(err)
		}
	})
}

func TestTokens(t *testing.T) {
	ctx := t.Context()
	s := newStore(t)
	var created []control.JoinToken
	for i := range 3 {
		tok := newToken(fmt.Sprintf("t%d", i), i+1)
		tok.CreatedAt = t0.Add(time.Duration(i) * time.Second)
		mustCreateToken(t, s, tok)
		created = append(created, tok)
	}

	got, err := s.GetToken(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, created[1]) {
		t.Errorf("GetToken = %+v, want %+v", got, created[1])
	}
	_, err = s.GetToken(ctx, "nope")
	wantErr(t, err, control.ErrNotFound)

	list, err := s.ListTokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := []control.JoinToken{created[2], created[1], created[0]}; !reflect.DeepEqual(list, want) {
		t.Errorf("ListTokens = %+v, want newest first %+v", list, want)
	}

	if err := s.CreateToken(ctx, newToken("t1", 1)); err == nil {
		t.Error("CreateToken with a duplicate ID succeeded")
	}
	bad := newToken("bad", 1)
	bad.SecretHash = []byte("short")
	wantErr(t, s.CreateToken(ctx, bad), control.ErrInvalidArgument)

	revokedAt := t0.Add(time.Minute)
	if err := s.RevokeToken(ctx, "t1", revokedAt); err != nil {
		t.Fatal(err)
	}
	if err := s.RevokeToken(ctx, "t1", revokedAt.Add(time.Hour)); err != nil {
		t.Fatalf("second revoke: %v", err)
	}
	got, err = s.GetToken(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	if !got.RevokedAt.Equal(revokedAt) {
		t.Errorf("RevokedAt = %v, want the first revocation %v", got.RevokedAt, revokedAt)
	}
	wantErr(t, s.RevokeToken(ctx, "nope", revokedAt), control.ErrNotFound)

	es := mustListEvents(t, s, "")
	if c, r := countKind(es, control.EventTokenCreated), countKind(es, control.EventTokenRevoked); c != 3 || r != 1 {
		t.Errorf("events: %d created, %d revoked; want 3 and 1: %+v", c, r, es)
	}
	if es[0].Kind != control.EventTokenRevoked || es[0].NodeID != "" || es[0].Reason != "token t1 revoked" {
		t.Errorf("newest event = %+v", es[0])
	}
}

func TestEnrollNode(t *testing.T) {
	ctx := t.Context()
	s := newStore(t)
	tok := newToken("tok", 1)
	mustCreateToken(t, s, tok)
	now := t0.Add(time.Minute)
	node := newNode("n1")
	if err := s.EnrollNode(ctx, tok.ID, tok.SecretHash, now, node); err != nil {
		t.Fatal(err)
	}

	want := node
	want.Status = control.StatusEnrolled
	want.TokenID = tok.ID
	want.EnrolledAt = now
	if got := mustGetNode(t, s, "n1"); !reflect.DeepEqual(got, want) {
		t.Errorf("GetNode = %+v, want %+v", got, want)
	}
	es := mustListEvents(t, s, "n1")
	if len(es) != 1 || es[0].Kind != control.EventEnrolled || es[0].Reason != "enrolled with token tok" || !es[0].Time.Equal(now) {
		t.Errorf("node events = %+v", es)
	}
	got, err := s.GetToken(ctx, tok.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Uses != 1 {
		t.Errorf("Uses = %d, want 1", got.Uses)
	}

	err = s.EnrollNode(ctx, tok.ID, tok.SecretHash, now, newNode("n2"))
	wantErr(t, err, control.ErrTokenUsed)
}

func TestEnrollNodeRejects(t *testing.T) {
	tok := newToken("tok", 1)
	ok := t0.Add(time.Minute)
	revoke := func(tb testing.TB, s *store.Store) {
		if err := s.RevokeToken(context.Background(), tok.ID, t0); err != nil {
			tb.Fatal(err)
		}
	}
	useUp := func(tb testing.TB, s *store.Store) {
		if err := s.EnrollNode(context.Background(), tok.ID, tok.SecretHash, ok, newNode("other")); err != nil {
			tb.Fatal(err)
		}
	}
	tests := []struct {
		name    string
		tokenID string
		hash    []byte
		now     time.Time
		node    func(control.Node) control.Node
		setup   func(testing.TB, *store.Store)
		want    error
	}{
		{name: "unknown id", tokenID: "nope", want: control.ErrTokenUnknown},
		{name: "wrong hash", hash: hash("guess"), want: control.ErrTokenUnknown},
		{name: "no hash", hash: []byte{}, want: control.ErrTokenUnknown},
		{name: "wrong hash on revoked token", hash: hash("guess"), setup: revoke, want: control.ErrTokenUnknown},
		{name: "revoked", setup: revoke, want: control.ErrTokenRevoked},
		{name: "revoked and expired", now: tok.ExpiresAt, setup: revoke, want: control.ErrTokenRevoked},
		{name: "expired", now: tok.ExpiresAt, want: control.ErrTokenExpired},
		{name: "expired and used", now: tok.ExpiresAt.Add(time.Hour), setup: useUp, want: control.ErrTokenExpired},
		{name: "used", setup: useUp, want: control.ErrTokenUsed},
		{
			name: "no serial",
			node: func(n control.Node) control.Node { n.CertSerial = ""; return n },
			want: control.ErrInvalidArgument,
		},
		{
			name:  "node already enrolled",
			node:  func(n control.Node) control.Node { n.ID = "existing"; return n },
			setup: func(tb testing.TB, s *store.Store) { mustEnroll(tb, s, newNode("existing")) },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			s := newStore(t)
			mustCreateToken(t, s, tok)
			if tt.setup != nil {
				tt.setup(t, s)
			}
			if tt.tokenID == "" {
				tt.tokenID = tok.ID
			}
			if tt.hash == nil {
				tt.hash = tok.SecretHash
			}
			if tt.now.IsZero() {
				tt.now = ok
			}
			node := newNode("n1")
			if tt.node != nil {
				node = tt.node(node)
			}
			before, err := s.GetToken(ctx, tok.ID)
			if err != nil {
				t.Fatal(err)
			}
			nodesBefore, err := s.ListNodes(ctx)
			if err != nil {
				t.Fatal(err)
			}
			eventsBefore := mustListEvents(t, s, "")

			err = s.EnrollNode(ctx, tt.tokenID, tt.hash, tt.now, node)
			if tt.want == nil && err == nil {
				t.Fatal("EnrollNode succeeded")
			}
			if tt.want != nil {
				wantErr(t, err, tt.want)
			}

			// Nothing half-written.
			after, err := s.GetToken(ctx, tok.ID)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(after, before) {
				t.Errorf("token changed: %+v, was %+v", after, before)
			}
			nodesAfter, err := s.ListNodes(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(nodesAfter, nodesBefore) {
				t.Errorf("nodes changed: %+v, were %+v", nodesAfter, nodesBefore)
			}
			if es := mustListEvents(t, s, ""); !reflect.DeepEqual(es, eventsBefore) {
				t.Errorf("events changed: %+v, were %+v", es, eventsBefore)
			}
		})
	}
}

func TestEnrollNodeConcurrent(t *testing.T) {
	tests := []struct {
		name       string
		maxUses    int
		goroutines int
		stores     int // Stores open on the same file, as separate processes would be
	}{
		{"single use", 1, 50, 1},
		{"single use, two stores", 1, 50, 2},
		{"five uses", 5, 20, 1},
		{"five uses, two stores", 5, 20, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "llorch.db")
			var stores []*store.Store
			for range tt.stores {
				stores = append(stores, openStore(t, path))
			}
			tok := newToken("tok", tt.maxUses)
			mustCreateToken(t, stores[0], tok)

			errs := make([]error, tt.goroutines)
			var wg sync.WaitGroup
			for i := range tt.goroutines {
				wg.Go(func() {
					s := stores[i%len(stores)]
					errs[i] = s.EnrollNode(t.Context(), tok.ID, tok.SecretHash, t0.Add(time.Minute), newNode(fmt.Sprint("n", i)))
				})
			}
			wg.Wait()

			ok := 0
			for i, err := range errs {
				switch {
				case err == nil:
					ok++
				case !errors.Is(err, control.ErrTokenUsed):
					t.Errorf("goroutine %d: %v", i, err)
				}
			}
			if ok != tt.maxUses {
				t.Errorf("%d enrollments succeeded, want %d", ok, tt.maxUses)
			}
			s := stores[0]
			got, err := s.GetToken(t.Context(), tok.ID)
			if err != nil {
				t.Fatal(err)
			}
			nodes, err := s.ListNodes(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			enrolled := countKind(mustListEvents(t, s, ""), control.EventEnrolled)
			if got.Uses != tt.maxUses || len(nodes) != tt.maxUses || enrolled != tt.maxUses {
				t.Errorf("uses %d, nodes %d, enrolled events %d; want %d each", got.Uses, len(nodes), enrolled, tt.maxUses)
			}
		})
	}
}

func TestDurability(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "llorch.db")
	s := openStore(t, path)
	mustEnroll(t, s, newNode("n1"))
	if err := s.RecordRenewal(ctx, "n1", "serial-n1-1", "serial-n1-2", t0.Add(48*time.Hour), t0.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	node, tokens, events := mustGetNode(t, s, "n1"), mustListTokens(t, s), mustListEvents(t, s, "")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, path)
	if got := mustGetNode(t, s, "n1"); !reflect.DeepEqual(got, node) {
		t.Errorf("node after reopen = %+v, want %+v", got, node)
	}
	if got := mustListTokens(t, s); !reflect.DeepEqual(got, tokens) {
		t.Errorf("tokens after reopen = %+v, want %+v", got, tokens)
	}
	if got := mustListEvents(t, s, ""); !reflect.DeepEqual(got, events) {
		t.Errorf("events after reopen = %+v, want %+v", got, events)
	}
	if node.NextCertSerial != "serial-n1-2" {
		t.Errorf("NextCertSerial = %q, want the renewal", node.NextCertSerial)
	}
	if err := s.IntegrityCheck(ctx); err != nil {
		t.Error(err)
	}
}

func mustListTokens(tb testing.TB, s *store.Store) []control.JoinToken {
	tb.Helper()
	ts, err := s.ListTokens(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	return ts
}

func TestSerialGate(t *testing.T) {
	ctx := t.Context()
	s := newStore(t)
	mustEnroll(t, s, newNode("n1"))
	now := t0.Add(time.Hour)
	renew := func(presented, next string) error {
		return s.RecordRenewal(ctx, "n1", presented, next, t0.Add(48*time.Hour), now)
	}

	wantErr(t, renew("serial-wrong", "s2"), control.ErrNotCurrentCert)
	if err := renew("serial-n1-1", "s2"); err != nil {
		t.Fatal(err)
	}
	n := mustGetNode(t, s, "n1")
	if n.CertSerial != "serial-n1-1" || n.NextCertSerial != "s2" {
		t.Fatalf("after renewal: current %q next %q", n.CertSerial, n.NextCertSerial)
	}
	if es := mustListEvents(t, s, "n1"); es[0].Kind != control.EventRenewed || es[0].Reason != "renewed: new serial s2" {
		t.Errorf("newest event = %+v", es[0])
	}

	// The old certificate still works until the new one is first used.
	got, err := s.PromoteSerial(ctx, "n1", "serial-n1-1")
	if err != nil || !reflect.DeepEqual(got, n) {
		t.Fatalf("PromoteSerial(current) = %+v, %v; want unchanged %+v", got, err, n)
	}
	_, err = s.PromoteSerial(ctx, "n1", "s-other")
	wantErr(t, err, control.ErrNotCurrentCert)

	got, err = s.PromoteSerial(ctx, "n1", "s2")
	if err != nil {
		t.Fatal(err)
	}
	if got.CertSerial != "s2" || got.NextCertSerial != "" || !got.CertNotAfter.Equal(t0.Add(48*time.Hour)) {
		t.Errorf("after promotion = %+v", got)
	}
	if stored := mustGetNode(t, s, "n1"); !reflect.DeepEqual(stored, got) {
		t.Errorf("stored %+v, returned %+v", stored, got)
	}
	// From now on the old serial is refused.
	_, err = s.PromoteSerial(ctx, "n1", "serial-n1-1")
	wantErr(t, err, control.ErrNotCurrentCert)
	wantErr(t, renew("serial-n1-1", "s3"), control.ErrNotCurrentCert)
	if _, err := s.PromoteSerial(ctx, "n1", "s2"); err != nil {
		t.Errorf("PromoteSerial(current) after promotion: %v", err)
	}

	// A removed node is refused, whatever it presents.
	if err := renew("s2", "s3"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RemoveNode(ctx, "n1", "decommissioned", now); err != nil {
		t.Fatal(err)
	}
	wantErr(t, renew("s2", "s4"), control.ErrNodeRemoved)
	_, err = s.PromoteSerial(ctx, "n1", "s3")
	wantErr(t, err, control.ErrNodeRemoved)
	_, err = s.PromoteSerial(ctx, "n1", "s2")
	wantErr(t, err, control.ErrNodeRemoved)

	wantErr(t, s.RecordRenewal(ctx, "nope", "a", "b", now, now), control.ErrNotFound)
	_, err = s.PromoteSerial(ctx, "nope", "a")
	wantErr(t, err, control.ErrNotFound)
}

func TestRemoveNode(t *testing.T) {
	ctx := t.Context()
	s := newStore(t)
	mustEnroll(t, s, newNode("n1"))
	if err := s.RecordRenewal(ctx, "n1", "serial-n1-1", "s2", t0.Add(48*time.Hour), t0); err != nil {
		t.Fatal(err)
	}
	removedAt := t0.Add(time.Hour)

	n, err := s.RemoveNode(ctx, "n1", "disk failure", removedAt)
	if err != nil {
		t.Fatal(err)
	}
	if n.Status != control.StatusRemoved || !n.RemovedAt.Equal(removedAt) || n.NextCertSerial != "" {
		t.Errorf("removed node = %+v", n)
	}
	again, err := s.RemoveNode(ctx, "n1", "again", removedAt.Add(time.Hour))
	if err != nil {
		t.Fatalf("second remove: %v", err)
	}
	if !reflect.DeepEqual(again, n) {
		t.Errorf("second remove = %+v, want unchanged %+v", again, n)
	}
	es := mustListEvents(t, s, "n1")
	if countKind(es, control.EventRemoved) != 1 || es[0].Reason != "disk failure" {
		t.Errorf("events = %+v, want one removal with its reason", es)
	}
	_, err = s.RemoveNode(ctx, "nope", "", removedAt)
	wantErr(t, err, control.ErrNotFound)
}

func TestSetNodeStatus(t *testing.T) {
	ctx := t.Context()
	s := newStore(t)
	mustEnroll(t, s, newNode("n1"))
	now := t0.Add(time.Hour)

	if err := s.SetNodeStatus(ctx, "n1", control.StatusOnline, "heartbeat", now); err != nil {
		t.Fatal(err)
	}
	if n := mustGetNode(t, s, "n1"); n.Status != control.StatusOnline {
		t.Errorf("status = %q", n.Status)
	}
	es := mustListEvents(t, s, "n1")
	if e := es[0]; e.Kind != control.EventStatus || e.From != control.StatusEnrolled || e.To != control.StatusOnline ||
		e.Reason != "heartbeat" || !e.Time.Equal(now) {
		t.Errorf("newest event = %+v", es[0])
	}
	if err := s.SetNodeStatus(ctx, "n1", control.StatusOnline, "heartbeat", now); err != nil {
		t.Fatal(err)
	}
	if got := len(mustListEvents(t, s, "n1")); got != len(es) {
		t.Errorf("unchanged status added an event: %d events, want %d", got, len(es))
	}

	wantErr(t, s.SetNodeStatus(ctx, "n1", "sleeping", "", now), control.ErrInvalidArgument)
	wantErr(t, s.SetNodeStatus(ctx, "n1", control.StatusRemoved, "", now), control.ErrInvalidArgument)
	wantErr(t, s.SetNodeStatus(ctx, "nope", control.StatusOnline, "", now), control.ErrNotFound)

	if _, err := s.RemoveNode(ctx, "n1", "gone", now); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.SetNodeStatus(ctx, "n1", control.StatusOnline, "late heartbeat", now), control.ErrNodeRemoved)
	if n := mustGetNode(t, s, "n1"); n.Status != control.StatusRemoved {
		t.Errorf("status after refused change = %q, want removed", n.Status)
	}
}

func TestEvents(t *testing.T) {
	ctx := t.Context()
	s := newStore(t)
	mustEnroll(t, s, newNode("a"))
	mustEnroll(t, s, newNode("b"))
	for i, nodeID := range []string{"a", "b", "", "a"} {
		if _, err := s.AddEvent(ctx, control.Event{Time: t0.Add(time.Duration(i) * time.Second), NodeID: nodeID, Kind: "test", Reason: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}

	all := mustListEvents(t, s, "")
	// 2 token_created + 2 enrolled + 4 test events.
	if len(all) != 8 {
		t.Fatalf("%d events, want 8: %+v", len(all), all)
	}
	for i := 1; i < len(all); i++ {
		if all[i].ID >= all[i-1].ID {
			t.Fatalf("events not newest first: %+v", all)
		}
	}
	var reasons []string
	for _, e := range mustListEvents(t, s, "a") {
		if e.NodeID != "a" {
			t.Errorf("ListEvents(a) returned %+v", e)
		}
		reasons = append(reasons, e.Reason)
	}
	if want := []string{"3", "0", "enrolled with token tok-a"}; !reflect.DeepEqual(reasons, want) {
		t.Errorf("reasons for a = %q, want %q", reasons, want)
	}
	two, err := s.ListEvents(ctx, "", 2)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(two, all[:2]) {
		t.Errorf("ListEvents limit 2 = %+v, want %+v", two, all[:2])
	}

	_, err = s.AddEvent(ctx, control.Event{Time: t0, NodeID: "nope", Kind: "test"})
	wantErr(t, err, control.ErrNotFound)
	_, err = s.AddEvent(ctx, control.Event{Time: t0, Kind: ""})
	wantErr(t, err, control.ErrInvalidArgument)
}

func BenchmarkEnrollNode(b *testing.B) {
	ctx := b.Context()
	s := newStore(b)
	for i := 0; b.Loop(); i++ {
		tok := newToken(fmt.Sprint("tok", i), 1)
		if err := s.CreateToken(ctx, tok); err != nil {
			b.Fatal(err)
		}
		if err := s.EnrollNode(ctx, tok.ID, tok.SecretHash, t0.Add(time.Minute), newNode(fmt.Sprint("n", i))); err != nil {
			b.Fatal(err)
		}
	}
}

// No public key enrolls twice, whatever the token: the second is refused
// and writes nothing, not even a use of its token.
func TestEnrollNodeKeyOnce(t *testing.T) {
	ctx := t.Context()
	s := newStore(t)
	mustCreateToken(t, s, newToken("tok", 2))
	mustCreateToken(t, s, newToken("other", 1))
	node := newNode("n1")
	node.EnrollKey = hash("key-1")
	if err := s.EnrollNode(ctx, "tok", hash("secret-tok"), t0, node); err != nil {
		t.Fatal(err)
	}
	if n := mustGetNode(t, s, "n1"); string(n.EnrollKey) != string(hash("key-1")) {
		t.Errorf("enroll key %x not kept", n.EnrollKey)
	}
	for _, tok := range []string{"tok", "other"} {
		again := newNode("n2-" + tok)
		again.EnrollKey = hash("key-1")
		err := s.EnrollNode(ctx, tok, hash("secret-"+tok), t0, again)
		wantErr(t, err, control.ErrKeyEnrolled)
		if got, _ := s.GetToken(ctx, tok); got.Uses != map[string]int{"tok": 1, "other": 0}[tok] {
			t.Errorf("token %s: %d uses after a refused key", tok, got.Uses)
		}
	}
}
