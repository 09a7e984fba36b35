package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/llorch/llorch/control"
)

// SetNodeStatuses applies several status changes in one transaction, each
// with its event, as SetNodeStatus does for one. Removed nodes and changes to
// the status a node already has are skipped; a missing node is
// control.ErrNotFound and nothing is written.
func (s *Store) SetNodeStatuses(ctx context.Context, changes []control.StatusChange, now time.Time) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		for _, c := range changes {
			err := setNodeStatusTx(ctx, tx, c, now)
			if err != nil && !isRemoved(err) {
				return fmt.Errorf("node %s: %w", c.NodeID, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("set node statuses: %w", err)
	}
	return nil
}

func isRemoved(err error) bool { return errors.Is(err, control.ErrNodeRemoved) }

// SetDraining marks a node draining or not, records an EventDrained or
// EventUndrained with the reason, and returns the node. Setting what is
// already set records nothing. Errors wrap control.ErrNotFound or
// control.ErrNodeRemoved.
func (s *Store) SetDraining(ctx context.Context, id string, draining bool, reason string, now time.Time) (control.Node, error) {
	var n control.Node
	err := s.write(ctx, func(tx *sql.Tx) error {
		var err error
		if n, err = getNodeTx(ctx, tx, id); err != nil {
			return err
		}
		if n.Status == control.StatusRemoved {
			return control.ErrNodeRemoved
		}
		if n.Draining == draining {
			return nil
		}
		if _, err := tx.ExecContext(ctx, `UPDATE nodes SET draining = ? WHERE id = ?`, draining, id); err != nil {
			return err
		}
		kind := control.EventUndrained
		if draining {
			kind = control.EventDrained
		}
		if _, err := addEventTx(ctx, tx, control.Event{Time: now, NodeID: id, Kind: kind, Reason: reason}); err != nil {
			return err
		}
		n.Draining = draining
		return nil
	})
	if err != nil {
		return control.Node{}, fmt.Errorf("set draining: %w", err)
	}
	return n, nil
}

// UpdateLastSeen records when nodes were last heard from, in one transaction
// and without events: liveness flushes it in batches, never per heartbeat.
// A time older than the stored one is ignored; unknown IDs are skipped.
func (s *Store) UpdateLastSeen(ctx context.Context, seen map[string]time.Time) error {
	if len(seen) == 0 {
		return nil
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		stmt, err := tx.PrepareContext(ctx, `UPDATE nodes SET last_seen = ? WHERE id = ? AND (last_seen IS NULL OR last_seen < ?)`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for id, t := range seen {
			if _, err := stmt.ExecContext(ctx, t.UnixNano(), id, t.UnixNano()); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("update last seen: %w", err)
	}
	return nil
}
