package store

import (
	"context"
	"database/sql"
	"fmt"

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
