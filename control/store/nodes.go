package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/llorch/llorch/control"
)

const nodeColumns = `id, name, status, labels, token_id, cert_serial, next_cert_serial, cert_not_after,
	enrolled_at, last_seen, draining, removed_at, status_reason, enroll_key_sha256`

// EnrollNode claims one use of the token and records the node, in one
// transaction. The token must exist, its stored hash equal secretHash, and it
// must be unrevoked, unexpired at now and not used up; otherwise the error
// wraps control.ErrTokenUnknown (no such token, or the hash differs),
// ErrTokenRevoked, ErrTokenExpired or ErrTokenUsed, checked in that order, and
// nothing is written. A node.EnrollKey that enrolled a node before is
// control.ErrKeyEnrolled (a unique index makes sure), and nothing is written.
//
// The node row takes node's ID, Name, Labels, EnrollKey, CertSerial and
// CertNotAfter; Status defaults to control.StatusEnrolled; TokenID is
// tokenID and EnrolledAt is now. The node needs an ID, a serial and a
// not-after (control.ErrInvalidArgument otherwise).
func (s *Store) EnrollNode(ctx context.Context, tokenID string, secretHash []byte, now time.Time, node control.Node) error {
	err := s.write(ctx, func(tx *sql.Tx) error { return enrollNodeTx(ctx, tx, tokenID, secretHash, now, node) })
	if err != nil {
		return fmt.Errorf("enroll node: %w", err)
	}
	return nil
}

func enrollNodeTx(ctx context.Context, tx *sql.Tx, tokenID string, secretHash []byte, now time.Time, node control.Node) error {
	if node.ID == "" || node.CertSerial == "" || node.CertNotAfter.IsZero() || now.IsZero() {
		return fmt.Errorf("node needs an ID, a certificate serial and not-after, and a time: %w", control.ErrInvalidArgument)
	}
	// The claim: a single conditional UPDATE, so concurrent enrollments can
	// never use a token more than max_uses times.
	res, err := tx.ExecContext(ctx, `UPDATE join_tokens SET uses = uses + 1
		WHERE id = ? AND secret_hash = ? AND revoked_at IS NULL AND expires_at > ? AND uses < max_uses`,
		tokenID, secretHash, now.UnixNano())
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return claimError(ctx, tx, tokenID, secretHash, now)
	}
	if node.EnrollKey != nil {
		var other string
		err := tx.QueryRowContext(ctx, `SELECT id FROM nodes WHERE enroll_key_sha256 = ?`, node.EnrollKey).Scan(&other)
		switch {
		case err == nil:
			return fmt.Errorf("%w (node %s)", control.ErrKeyEnrolled, other)
		case !errors.Is(err, sql.ErrNoRows):
			return err
		}
	}
	if node.Status == "" {
		node.Status = control.StatusEnrolled
	}
	labels, err := encodeLabels(node.Labels)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO nodes (id, name, status, labels, token_id, cert_serial, cert_not_after, enrolled_at, enroll_key_sha256)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		node.ID, node.Name, node.Status, labels, tokenID, node.CertSerial, nanos(node.CertNotAfter), nanos(now), node.EnrollKey); err != nil {
		return err
	}
	_, err = addEventTx(ctx, tx, control.Event{Time: now, NodeID: node.ID, Kind: control.EventEnrolled, Reason: "enrolled with token " + tokenID})
	return err
}

// claimError says why the claim of tokenID changed no row.
func claimError(ctx context.Context, tx *sql.Tx, tokenID string, secretHash []byte, now time.Time) error {
	t, err := getTokenTx(ctx, tx, tokenID)
	switch {
	case errors.Is(err, control.ErrNotFound):
		return control.ErrTokenUnknown
	case err != nil:
		return err
	}
	if err := t.Claimable(secretHash, now); err != nil {
		return err
	}
	return fmt.Errorf("token %q: claim changed no row, yet the token looks usable", tokenID)
}

// GetNode returns the node, or an error wrapping control.ErrNotFound.
func (s *Store) GetNode(ctx context.Context, id string) (control.Node, error) {
	var n control.Node
	err := s.read(ctx, func(tx *sql.Tx) (err error) {
		n, err = getNodeTx(ctx, tx, id)
		return err
	})
	if err != nil {
		return control.Node{}, fmt.Errorf("get node: %w", err)
	}
	return n, nil
}

func getNodeTx(ctx context.Context, tx *sql.Tx, id string) (control.Node, error) {
	n, err := scanNode(tx.QueryRowContext(ctx, `SELECT `+nodeColumns+` FROM nodes WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return control.Node{}, fmt.Errorf("node %q: %w", id, control.ErrNotFound)
	}
	return n, err
}

// ListNodes returns every node, removed ones included, in enrollment order.
func (s *Store) ListNodes(ctx context.Context) ([]control.Node, error) {
	ns, err := queryAll(ctx, s, scanNode, `SELECT `+nodeColumns+` FROM nodes ORDER BY enrolled_at, id`)
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	return ns, nil
}

// RemoveNode marks the node removed, which is terminal: status removed,
// RemovedAt now, no next serial, and an EventRemoved with reason. Removing a
// removed node returns it unchanged and records nothing. A missing node is
// control.ErrNotFound.
func (s *Store) RemoveNode(ctx context.Context, id, reason string, now time.Time) (control.Node, error) {
	var n control.Node
	err := s.write(ctx, func(tx *sql.Tx) (err error) {
		n, err = removeNodeTx(ctx, tx, id, reason, now)
		return err
	})
	if err != nil {
		return control.Node{}, fmt.Errorf("remove node: %w", err)
	}
	return n, nil
}

func removeNodeTx(ctx context.Context, tx *sql.Tx, id, reason string, now time.Time) (control.Node, error) {
	n, err := getNodeTx(ctx, tx, id)
	if err != nil || n.Status == control.StatusRemoved {
		return n, err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE nodes SET status = ?, status_reason = ?, removed_at = ?, next_cert_serial = NULL,
		next_cert_not_after = NULL WHERE id = ?`, control.StatusRemoved, reason, nanos(now), id); err != nil {
		return control.Node{}, err
	}
	if _, err := addEventTx(ctx, tx, control.Event{Time: now, NodeID: id, Kind: control.EventRemoved, Reason: reason}); err != nil {
		return control.Node{}, err
	}
	return getNodeTx(ctx, tx, id)
}

// RecordRenewal records newSerial (valid until notAfter) as the node's next
// certificate, if presentedSerial is its current one, and records an
// EventRenewed. Errors wrap control.ErrNotFound, control.ErrNodeRemoved, or
// control.ErrNotCurrentCert when presentedSerial is not the current serial.
func (s *Store) RecordRenewal(ctx context.Context, nodeID, presentedSerial, newSerial string, notAfter, now time.Time) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		return recordRenewalTx(ctx, tx, nodeID, presentedSerial, newSerial, notAfter, now)
	})
	if err != nil {
		return fmt.Errorf("record renewal: %w", err)
	}
	return nil
}

func recordRenewalTx(ctx context.Context, tx *sql.Tx, nodeID, presentedSerial, newSerial string, notAfter, now time.Time) error {
	if newSerial == "" || notAfter.IsZero() {
		return fmt.Errorf("renewal needs a serial and a not-after: %w", control.ErrInvalidArgument)
	}
	n, err := getNodeTx(ctx, tx, nodeID)
	switch {
	case err != nil:
		return err
	case n.Status == control.StatusRemoved:
		return control.ErrNodeRemoved
	case n.CertSerial != presentedSerial:
		return control.ErrNotCurrentCert
	}
	if _, err := tx.ExecContext(ctx, `UPDATE nodes SET next_cert_serial = ?, next_cert_not_after = ? WHERE id = ?`,
		newSerial, nanos(notAfter), nodeID); err != nil {
		return err
	}
	_, err = addEventTx(ctx, tx, control.Event{Time: now, NodeID: nodeID, Kind: control.EventRenewed, Reason: "renewed: new serial " + newSerial})
	return err
}

// PromoteSerial is called on the first use of a renewed certificate: if
// serial is the node's next serial it becomes the current one, and the old
// certificate is refused from then on. If serial is already current the node
// is returned unchanged. Errors wrap control.ErrNotFound,
// control.ErrNodeRemoved, or control.ErrNotCurrentCert for any other serial.
func (s *Store) PromoteSerial(ctx context.Context, nodeID, serial string) (control.Node, error) {
	var n control.Node
	err := s.write(ctx, func(tx *sql.Tx) (err error) {
		n, err = promoteSerialTx(ctx, tx, nodeID, serial)
		return err
	})
	if err != nil {
		return control.Node{}, fmt.Errorf("promote serial: %w", err)
	}
	return n, nil
}

func promoteSerialTx(ctx context.Context, tx *sql.Tx, nodeID, serial string) (control.Node, error) {
	n, err := getNodeTx(ctx, tx, nodeID)
	switch {
	case err != nil:
		return control.Node{}, err
	case n.Status == control.StatusRemoved:
		return control.Node{}, control.ErrNodeRemoved
	case serial != "" && serial == n.CertSerial:
		return n, nil
	case serial == "" || serial != n.NextCertSerial:
		return control.Node{}, control.ErrNotCurrentCert
	}
	if _, err := tx.ExecContext(ctx, `UPDATE nodes SET cert_serial = next_cert_serial, cert_not_after = next_cert_not_after,
		next_cert_serial = NULL, next_cert_not_after = NULL WHERE id = ?`, nodeID); err != nil {
		return control.Node{}, err
	}
	return getNodeTx(ctx, tx, nodeID)
}

// SetNodeStatus sets the node's status and records an event of kind
// "status" with the move (From, To) and reason; setting the status it already
// has records nothing. It refuses a removed node (control.ErrNodeRemoved) and
// StatusRemoved or an unknown status (control.ErrInvalidArgument: removal goes
// through RemoveNode). A missing node is control.ErrNotFound.
func (s *Store) SetNodeStatus(ctx context.Context, id string, status control.NodeStatus, reason string, now time.Time) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		return setNodeStatusTx(ctx, tx, control.StatusChange{NodeID: id, Status: status, Reason: reason}, now)
	})
	if err != nil {
		return fmt.Errorf("set node status: %w", err)
	}
	return nil
}

// setNodeStatusTx applies one change: the status, and the event unless the
// change is quiet. A summary of coalesced moves is recorded even when the
// status is unchanged.
func setNodeStatusTx(ctx context.Context, tx *sql.Tx, c control.StatusChange, now time.Time) error {
	switch c.Status {
	case control.StatusEnrolled, control.StatusOnline, control.StatusDisconnected, control.StatusOffline, control.StatusUnknown:
	default:
		return fmt.Errorf("status %q: %w", c.Status, control.ErrInvalidArgument)
	}
	n, err := getNodeTx(ctx, tx, c.NodeID)
	switch {
	case err != nil:
		return err
	case n.Status == control.StatusRemoved:
		return control.ErrNodeRemoved
	case n.Status == c.Status && c.Coalesced == 0:
		return nil
	}
	if n.Status != c.Status {
		if _, err := tx.ExecContext(ctx, `UPDATE nodes SET status = ?, status_reason = ? WHERE id = ?`, c.Status, c.Reason, c.NodeID); err != nil {
			return err
		}
	}
	if c.Quiet {
		return nil
	}
	e := control.Event{Time: now, NodeID: c.NodeID, Kind: control.EventStatus, From: n.Status, To: c.Status, Reason: c.Reason}
	if c.Coalesced > 0 {
		e.From, e.Coalesced = c.From, c.Coalesced
	}
	_, err = addEventTx(ctx, tx, e)
	return err
}

func scanNode(row scanner) (control.Node, error) {
	var (
		n                                         control.Node
		labels                                    string
		next                                      sql.NullString
		notAfter, enrolledAt, lastSeen, removedAt sql.NullInt64
	)
	if err := row.Scan(&n.ID, &n.Name, &n.Status, &labels, &n.TokenID, &n.CertSerial, &next, &notAfter,
		&enrolledAt, &lastSeen, &n.Draining, &removedAt, &n.StatusReason, &n.EnrollKey); err != nil {
		return control.Node{}, err
	}
	var err error
	if n.Labels, err = decodeLabels(labels); err != nil {
		return control.Node{}, err
	}
	n.NextCertSerial = next.String
	n.CertNotAfter, n.EnrolledAt = fromNanos(notAfter), fromNanos(enrolledAt)
	n.LastSeen, n.RemovedAt = fromNanos(lastSeen), fromNanos(removedAt)
	return n, nil
}
