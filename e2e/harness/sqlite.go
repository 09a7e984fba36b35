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

	// The rows as the file holds them (not as a restarted control plane
	// would show them), for checks of what a crash left.
	TokenRows []DBToken
	NodeRows  []DBNode
	// EventKinds counts the events of each kind.
	EventKinds map[string]int
}

// DBToken is a join_tokens row.
type DBToken struct {
	ID, Name      string
	MaxUses, Uses int
	Revoked       bool
}

// DBNode is a nodes row, with the number of its enrolled events.
type DBNode struct {
	ID, Name, Status, TokenID string
	EnrolledEvents            int
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
	if err := readRows(ctx, db, &res); err != nil {
		return res, err
	}
	return res, nil
}

func readRows(ctx context.Context, db *sql.DB, res *DBCheck) error {
	rows, err := db.QueryContext(ctx, `SELECT id, name, max_uses, uses, revoked_at IS NOT NULL FROM join_tokens ORDER BY id`)
	if err != nil {
		return fmt.Errorf("read join_tokens: %w", err)
	}
	for rows.Next() {
		var t DBToken
		if err := rows.Scan(&t.ID, &t.Name, &t.MaxUses, &t.Uses, &t.Revoked); err != nil {
			rows.Close()
			return fmt.Errorf("read join_tokens: %w", err)
		}
		res.TokenRows = append(res.TokenRows, t)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read join_tokens: %w", err)
	}
	rows, err = db.QueryContext(ctx, `SELECT n.id, n.name, n.status, n.token_id,
		(SELECT count(*) FROM events e WHERE e.node_id = n.id AND e.kind = 'enrolled') FROM nodes n ORDER BY n.id`)
	if err != nil {
		return fmt.Errorf("read nodes: %w", err)
	}
	for rows.Next() {
		var n DBNode
		if err := rows.Scan(&n.ID, &n.Name, &n.Status, &n.TokenID, &n.EnrolledEvents); err != nil {
			rows.Close()
			return fmt.Errorf("read nodes: %w", err)
		}
		res.NodeRows = append(res.NodeRows, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read nodes: %w", err)
	}
	rows, err = db.QueryContext(ctx, `SELECT kind, count(*) FROM events GROUP BY kind`)
	if err != nil {
		return fmt.Errorf("count events by kind: %w", err)
	}
	defer rows.Close()
	res.EventKinds = map[string]int{}
	for rows.Next() {
		var kind string
		var n int
		if err := rows.Scan(&kind, &n); err != nil {
			return fmt.Errorf("count events by kind: %w", err)
		}
		res.EventKinds[kind] = n
	}
	return rows.Err()
}
