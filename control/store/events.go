package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/llorch/llorch/control"
)

// AddEvent records e and returns its ID; e.ID is ignored. e needs a Time and a
// Kind (control.ErrInvalidArgument otherwise); a NodeID that names no node is
// control.ErrNotFound.
func (s *Store) AddEvent(ctx context.Context, e control.Event) (int64, error) {
	var id int64
	err := s.write(ctx, func(tx *sql.Tx) error {
		if e.NodeID != "" {
			if _, err := getNodeTx(ctx, tx, e.NodeID); err != nil {
				return err
			}
		}
		var err error
		id, err = addEventTx(ctx, tx, e)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("add event: %w", err)
	}
	return id, nil
}

func addEventTx(ctx context.Context, tx *sql.Tx, e control.Event) (int64, error) {
	if e.Time.IsZero() || e.Kind == "" {
		return 0, fmt.Errorf("event needs a time and a kind: %w", control.ErrInvalidArgument)
	}
	res, err := tx.ExecContext(ctx, `INSERT INTO events (time, node_id, kind, from_status, to_status, reason, coalesced)
		VALUES (?, ?, ?, ?, ?, ?, ?)`,
		nanos(e.Time), sql.NullString{String: e.NodeID, Valid: e.NodeID != ""}, e.Kind, e.From, e.To, e.Reason, e.Coalesced)
	if err != nil {
		return 0, err
	}
	return res.LastInsertId()
}

// ListEvents returns up to limit events (100 when limit <= 0), newest first:
// those of node nodeID, or all when nodeID is empty.
func (s *Store) ListEvents(ctx context.Context, nodeID string, limit int) ([]control.Event, error) {
	if limit <= 0 {
		limit = 100
	}
	query, args := `SELECT `+eventColumns+` FROM events ORDER BY id DESC LIMIT ?`, []any{limit}
	if nodeID != "" {
		query, args = `SELECT `+eventColumns+` FROM events WHERE node_id = ? ORDER BY id DESC LIMIT ?`,
			[]any{nodeID, limit}
	}
	es, err := s.queryEvents(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	return es, nil
}

// ListEventsAfter returns up to limit events with an ID above afterID, oldest
// first: those of node nodeID, or all when nodeID is empty. Following the
// event log is calling it with the last ID seen.
func (s *Store) ListEventsAfter(ctx context.Context, nodeID string, afterID int64, limit int) ([]control.Event, error) {
	if limit <= 0 {
		limit = 100
	}
	query, args := `SELECT `+eventColumns+` FROM events WHERE id > ? ORDER BY id LIMIT ?`, []any{afterID, limit}
	if nodeID != "" {
		query, args = `SELECT `+eventColumns+` FROM events WHERE node_id = ? AND id > ? ORDER BY id LIMIT ?`,
			[]any{nodeID, afterID, limit}
	}
	es, err := s.queryEvents(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("list events: %w", err)
	}
	return es, nil
}

const eventColumns = `id, time, node_id, kind, from_status, to_status, reason, coalesced`

func (s *Store) queryEvents(ctx context.Context, query string, args ...any) ([]control.Event, error) {
	return queryAll(ctx, s, scanEvent, query, args...)
}

func scanEvent(row scanner) (control.Event, error) {
	var (
		e    control.Event
		t    sql.NullInt64
		node sql.NullString
	)
	if err := row.Scan(&e.ID, &t, &node, &e.Kind, &e.From, &e.To, &e.Reason, &e.Coalesced); err != nil {
		return control.Event{}, err
	}
	e.Time, e.NodeID = fromNanos(t), node.String
	return e, nil
}

// pruneBatch bounds the events one pruning transaction deletes, so that the
// one writer is never held for long.
const pruneBatch = 5000

// PruneEvents deletes the events recorded before olderThan, and the oldest
// beyond the newest keep (keep <= 0: no bound on the count), in batches,
// and returns how many it deleted. The database file does not shrink: its
// free pages are reused, so it stops growing.
func (s *Store) PruneEvents(ctx context.Context, olderThan time.Time, keep int) (int, error) {
	total := 0
	for {
		var n int64
		err := s.write(ctx, func(tx *sql.Tx) error {
			res, err := tx.ExecContext(ctx, `DELETE FROM events WHERE id IN (SELECT id FROM events WHERE time < ? ORDER BY id LIMIT ?)`,
				nanos(olderThan), pruneBatch)
			if err != nil {
				return err
			}
			if n, err = res.RowsAffected(); err != nil || n > 0 || keep <= 0 {
				return err
			}
			// Nothing too old left: bound the count. The newest keep are
			// those from the keep-th newest ID up.
			var floor int64
			err = tx.QueryRowContext(ctx, `SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?`, keep-1).Scan(&floor)
			if errors.Is(err, sql.ErrNoRows) {
				return nil
			}
			if err != nil {
				return err
			}
			res, err = tx.ExecContext(ctx, `DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id < ? ORDER BY id LIMIT ?)`, floor, pruneBatch)
			if err != nil {
				return err
			}
			n, err = res.RowsAffected()
			return err
		})
		if err != nil {
			return total, fmt.Errorf("prune events: %w", err)
		}
		total += int(n)
		if n == 0 {
			return total, nil
		}
	}
}

// CountEvents is the number of events recorded.
func (s *Store) CountEvents(ctx context.Context) (int, error) {
	var n int
	err := s.read(ctx, func(tx *sql.Tx) error {
		return tx.QueryRowContext(ctx, `SELECT count(*) FROM events`).Scan(&n)
	})
	if err != nil {
		return 0, fmt.Errorf("count events: %w", err)
	}
	return n, nil
}
