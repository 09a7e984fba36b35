// Package store owns the control plane's SQLite database, DATA/llorch.db: join
// tokens, enrolled nodes with their certificate serials, and the event log.
// Every read and write of that file goes through a Store; nothing else opens
// it. Writes are serialized through one connection, each in a BEGIN IMMEDIATE
// transaction with synchronous=FULL, so a method that returned nil has been
// fsynced. Reads use a separate pool of query-only connections.
//
// Errors wrap the sentinels of package control (control.ErrNotFound,
// control.ErrTokenUsed, ...); test them with errors.Is.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/llorch/llorch/control"
	"modernc.org/sqlite" // also registers the "sqlite" driver
)

// Store is the control plane's database. It is safe for concurrent use.
type Store struct {
	path   string
	writer *sql.DB // one connection: SQLite has one writer anyway
	reader *sql.DB // query_only connections
}

// readers is the size of the read pool.
const readers = 4

// pragma is a setting applied to every connection through the DSN and read
// back at Open.
type pragma struct{ name, value string }

var (
	writerPragmas = []pragma{
		{"busy_timeout", "5000"},
		{"journal_mode", "wal"},
		{"synchronous", "2"}, // FULL: an acknowledged commit survives power loss
		{"foreign_keys", "1"},
	}
	readerPragmas = []pragma{
		{"busy_timeout", "5000"},
		{"foreign_keys", "1"},
		{"query_only", "1"},
	}
)

// Open opens the database at path, creating it (mode 0600, parent directory
// 0700) if missing, and migrates it to the newest schema. It fails with an
// error wrapping control.ErrSchemaTooNew if the database was written by a
// newer binary.
func Open(ctx context.Context, path string) (*Store, error) {
	s, err := open(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	return s, nil
}

func open(ctx context.Context, path string) (_ *Store, err error) {
	if path == "" {
		return nil, fmt.Errorf("empty path: %w", control.ErrInvalidArgument)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	// SQLite creates files 0644; create it first so the database, and the
	// -wal and -shm files SQLite derives from it, are 0600.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}

	s := &Store{path: path}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if s.writer, err = openDB(ctx, path, writerPragmas, "_txlock=immediate"); err != nil {
		return nil, fmt.Errorf("writer: %w", err)
	}
	s.writer.SetMaxOpenConns(1)
	if err := s.migrate(ctx); err != nil {
		return nil, err
	}
	// The reader pool opens after the writer has put the file in WAL mode:
	// journal_mode is a property of the file, and query_only connections
	// cannot change it.
	if s.reader, err = openDB(ctx, path, readerPragmas); err != nil {
		return nil, fmt.Errorf("reader: %w", err)
	}
	s.reader.SetMaxOpenConns(readers)
	s.reader.SetMaxIdleConns(readers)
	return s, nil
}

// openDB opens a pool whose connections all run pragmas, and checks on one
// connection that they took effect.
func openDB(ctx context.Context, path string, pragmas []pragma, extra ...string) (*sql.DB, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	q := url.Values{}
	for _, p := range pragmas {
		q.Add("_pragma", p.name+"("+p.value+")")
	}
	query := strings.Join(append([]string{q.Encode()}, extra...), "&")
	dsn := (&url.URL{Scheme: "file", Path: abs, RawQuery: query}).String()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	for _, p := range pragmas {
		var got string
		if err := db.QueryRowContext(ctx, "PRAGMA "+p.name).Scan(&got); err != nil {
			db.Close()
			return nil, fmt.Errorf("read pragma %s: %w", p.name, err)
		}
		if !strings.EqualFold(got, p.value) {
			db.Close()
			return nil, fmt.Errorf("pragma %s is %q, want %q", p.name, got, p.value)
		}
	}
	return db, nil
}

// Close closes the database. Acknowledged writes are already on disk.
func (s *Store) Close() error {
	var errs []error
	for _, db := range []*sql.DB{s.reader, s.writer} {
		if db != nil {
			errs = append(errs, db.Close())
		}
	}
	return errors.Join(errs...)
}

// Path returns the database file path.
func (s *Store) Path() string { return s.path }

// IntegrityCheck runs PRAGMA integrity_check and returns an error unless it
// says ok.
func (s *Store) IntegrityCheck(ctx context.Context) error {
	var problems []string
	err := s.read(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, "PRAGMA integrity_check")
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var line string
			if err := rows.Scan(&line); err != nil {
				return err
			}
			problems = append(problems, line)
		}
		return rows.Err()
	})
	if err != nil {
		return fmt.Errorf("integrity check: %w", err)
	}
	if len(problems) != 1 || problems[0] != "ok" {
		return fmt.Errorf("integrity check: %s", strings.Join(problems, "; "))
	}
	return nil
}

// write runs fn in a write transaction (BEGIN IMMEDIATE, through the DSN's
// _txlock) and commits it if fn returns nil.
func (s *Store) write(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		return storageError(err)
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return storageError(err)
	}
	return storageError(tx.Commit())
}

// sqliteFull is SQLITE_FULL, the primary result code for a full disk.
const sqliteFull = 13

// storageError marks a full disk as control.ErrStorageFull, so callers can
// say so instead of "internal error"; the transaction was rolled back and
// nothing was written.
func storageError(err error) error {
	var se *sqlite.Error
	if errors.As(err, &se) && se.Code()&0xff == sqliteFull {
		return fmt.Errorf("%w: %v", control.ErrStorageFull, err)
	}
	return err
}

// read runs fn in a read transaction, so it sees one snapshot.
func (s *Store) read(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.reader.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer tx.Rollback()
	return fn(tx)
}

// scanner is a *sql.Row or *sql.Rows.
type scanner interface{ Scan(dest ...any) error }

// queryAll runs a read-only query and scans every row with scan.
func queryAll[T any](ctx context.Context, s *Store, scan func(scanner) (T, error), query string, args ...any) ([]T, error) {
	var out []T
	err := s.read(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, query, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			v, err := scan(rows)
			if err != nil {
				return err
			}
			out = append(out, v)
		}
		return rows.Err()
	})
	return out, err
}

// nanos stores a time; the zero time is NULL.
func nanos(t time.Time) sql.NullInt64 {
	if t.IsZero() {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: t.UnixNano(), Valid: true}
}

// fromNanos reads a time stored by nanos.
func fromNanos(n sql.NullInt64) time.Time {
	if !n.Valid {
		return time.Time{}
	}
	return time.Unix(0, n.Int64).UTC()
}

func encodeLabels(labels map[string]string) (string, error) {
	if len(labels) == 0 {
		return "{}", nil
	}
	b, err := json.Marshal(labels)
	return string(b), err
}

// decodeLabels returns nil for no labels.
func decodeLabels(s string) (map[string]string, error) {
	var labels map[string]string
	if err := json.Unmarshal([]byte(s), &labels); err != nil {
		return nil, fmt.Errorf("decode labels: %w", err)
	}
	if len(labels) == 0 {
		return nil, nil
	}
	return labels, nil
}
