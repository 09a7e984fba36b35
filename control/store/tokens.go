package store

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/llorch/llorch/control"
)

const tokenColumns = `id, name, labels, secret_hash, created_at, expires_at, max_uses, uses, revoked_at`

// CreateToken stores a new join token and records an EventTokenCreated. Uses
// and RevokedAt are ignored: a new token is unused and live. It needs an ID, a
// SHA-256 SecretHash, CreatedAt, ExpiresAt and MaxUses >= 1
// (control.ErrInvalidArgument otherwise).
func (s *Store) CreateToken(ctx context.Context, t control.JoinToken) error {
	if err := s.write(ctx, func(tx *sql.Tx) error { return createTokenTx(ctx, tx, t) }); err != nil {
		return fmt.Errorf("create token: %w", err)
	}
	return nil
}

func createTokenTx(ctx context.Context, tx *sql.Tx, t control.JoinToken) error {
	if t.ID == "" || len(t.SecretHash) != sha256.Size || t.CreatedAt.IsZero() || t.ExpiresAt.IsZero() || t.MaxUses < 1 {
		return fmt.Errorf("token needs an ID, a SHA-256 hash, times and max uses: %w", control.ErrInvalidArgument)
	}
	labels, err := encodeLabels(t.Labels)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO join_tokens (id, name, labels, secret_hash, created_at, expires_at, max_uses)
		VALUES (?, ?, ?, ?, ?, ?, ?)`,
		t.ID, t.Name, labels, t.SecretHash, nanos(t.CreatedAt), nanos(t.ExpiresAt), t.MaxUses); err != nil {
		return err
	}
	_, err = addEventTx(ctx, tx, control.Event{Time: t.CreatedAt, Kind: control.EventTokenCreated, Reason: "token " + t.ID + " created"})
	return err
}

// GetToken returns the token, or an error wrapping control.ErrNotFound.
func (s *Store) GetToken(ctx context.Context, id string) (control.JoinToken, error) {
	var t control.JoinToken
	err := s.read(ctx, func(tx *sql.Tx) (err error) {
		t, err = getTokenTx(ctx, tx, id)
		return err
	})
	if err != nil {
		return control.JoinToken{}, fmt.Errorf("get token: %w", err)
	}
	return t, nil
}

func getTokenTx(ctx context.Context, tx *sql.Tx, id string) (control.JoinToken, error) {
	row := tx.QueryRowContext(ctx, `SELECT `+tokenColumns+` FROM join_tokens WHERE id = ?`, id)
	t, err := scanToken(row)
	if errors.Is(err, sql.ErrNoRows) {
		return control.JoinToken{}, fmt.Errorf("token %q: %w", id, control.ErrNotFound)
	}
	return t, err
}

// ListTokens returns every token, newest first.
func (s *Store) ListTokens(ctx context.Context) ([]control.JoinToken, error) {
	ts, err := queryAll(ctx, s, scanToken, `SELECT `+tokenColumns+` FROM join_tokens ORDER BY created_at DESC, id DESC`)
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	return ts, nil
}

// RevokeToken sets the token's RevokedAt to now and records an
// EventTokenRevoked. Revoking a revoked token changes nothing and returns nil.
// A missing token is control.ErrNotFound.
func (s *Store) RevokeToken(ctx context.Context, id string, now time.Time) error {
	if err := s.write(ctx, func(tx *sql.Tx) error { return revokeTokenTx(ctx, tx, id, now) }); err != nil {
		return fmt.Errorf("revoke token: %w", err)
	}
	return nil
}

func revokeTokenTx(ctx context.Context, tx *sql.Tx, id string, now time.Time) error {
	res, err := tx.ExecContext(ctx, `UPDATE join_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL`, nanos(now), id)
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		_, err := getTokenTx(ctx, tx, id) // nil: already revoked
		return err
	}
	_, err = addEventTx(ctx, tx, control.Event{Time: now, Kind: control.EventTokenRevoked, Reason: "token " + id + " revoked"})
	return err
}

func scanToken(row scanner) (control.JoinToken, error) {
	var (
		t                           control.JoinToken
		labels                      string
		created, expires, revokedAt sql.NullInt64
	)
	if err := row.Scan(&t.ID, &t.Name, &labels, &t.SecretHash, &created, &expires, &t.MaxUses, &t.Uses, &revokedAt); err != nil {
		return control.JoinToken{}, err
	}
	var err error
	if t.Labels, err = decodeLabels(labels); err != nil {
		return control.JoinToken{}, err
	}
	t.CreatedAt, t.ExpiresAt, t.RevokedAt = fromNanos(created), fromNanos(expires), fromNanos(revokedAt)
	return t, nil
}
