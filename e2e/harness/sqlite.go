package harness

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"strings"

	_ "modernc.org/sqlite" // the driver the control plane uses
)

// DBCheck is what IntegrityCheck found in a copy of the database.
type DBCheck struct {
	Integrity string // "ok", or the problems PRAGMA integrity_check lists
	Tokens    int
	Nodes     int
	Events    int
	Dir       string // where the copy is
}

// IntegrityCheck copies the database (and its WAL) out of a container
// (running, stopped or killed) into dir, opens the copy read-only (so the
// WAL is read, never checkpointed into the copy's file) and runs
// PRAGMA integrity_check. Copy out of a container whose control plane is
// not running (killed or stopped) or the copy may be torn.
func (s *Suite) IntegrityCheck(ctx context.Context, containerID, dbPath, dir string) (DBCheck, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return DBCheck{}, err
	}
	files, err := s.CopyOut(ctx, containerID, dir, dbPath, dbPath+"-wal", dbPath+"-shm")
	if err != nil {
		return DBCheck{}, err
	}
	if len(files) == 0 {
		return DBCheck{}, fmt.Errorf("no database at %s", dbPath)
	}
	db, err := sql.Open("sqlite", "file:"+files[0]+"?mode=ro")
	if err != nil {
		return DBCheck{}, err
	}
	defer db.Close()
	res := DBCheck{Dir: dir}
	rows, err := db.QueryContext(ctx, "PRAGMA integrity_check")
	if err != nil {
		return res, fmt.Errorf("integrity_check: %w", err)
	}
	var lines []string
	for rows.Next() {
		var l string
		if err := rows.Scan(&l); err != nil {
			rows.Close()
			return res, err
		}
		lines = append(lines, l)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return res, err
	}
	res.Integrity = strings.Join(lines, "; ")
	for table, n := range map[string]*int{"join_tokens": &res.Tokens, "nodes": &res.Nodes, "events": &res.Events} {
		if err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+table).Scan(n); err != nil {
			return res, fmt.Errorf("count %s: %w", table, err)
		}
	}
	return res, nil
}
