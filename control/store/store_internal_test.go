package store

import (
	"database/sql"
	"errors"
	"path/filepath"
	"testing"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

func openTestStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(t.Context(), filepath.Join(t.TempDir(), "llorch.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// Open reads the pragmas back on one connection of each pool; this pins their
// values, checks every connection of the read pool, and that query_only holds.
func TestPragmas(t *testing.T) {
	ctx := t.Context()
	s := openTestStore(t)
	check := func(conn *sql.Conn, want []pragma) {
		t.Helper()
		for _, p := range want {
			var got string
			if err := conn.QueryRowContext(ctx, "PRAGMA "+p.name).Scan(&got); err != nil {
				t.Fatal(err)
			}
			if got != p.value {
				t.Errorf("%s = %q, want %q", p.name, got, p.value)
			}
		}
	}
	w, err := s.writer.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	check(w, []pragma{{"journal_mode", "wal"}, {"synchronous", "2"}, {"foreign_keys", "1"}, {"busy_timeout", "5000"}})
	w.Close()
	var held []*sql.Conn // held at once, so each is a distinct connection
	for range readers {
		r, err := s.reader.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, r)
		check(r, []pragma{{"journal_mode", "wal"}, {"query_only", "1"}, {"foreign_keys", "1"}, {"busy_timeout", "5000"}})
	}
	for _, r := range held {
		r.Close()
	}
	if _, err := s.reader.ExecContext(ctx, `DELETE FROM events`); err == nil {
		t.Error("a write through the read pool succeeded")
	}
}

// A write transaction must take the write lock at BEGIN, so another writer
// fails at once (with busy_timeout 0) while it is open, before it has run a
// statement.
func TestWriteTxIsImmediate(t *testing.T) {
	ctx := t.Context()
	s := openTestStore(t)
	other, err := sql.Open("sqlite", s.Path()+"?_pragma=busy_timeout(0)")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	const write = `CREATE TABLE IF NOT EXISTS scratch (x)`

	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = other.ExecContext(ctx, write)
	var serr *sqlite.Error
	if !errors.As(err, &serr) || serr.Code()&0xff != sqlite3.SQLITE_BUSY {
		t.Errorf("write while a store tx is open: %v, want SQLITE_BUSY", err)
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	if _, err := other.ExecContext(ctx, write); err != nil {
		t.Errorf("write after the store tx ended: %v", err)
	}
}
