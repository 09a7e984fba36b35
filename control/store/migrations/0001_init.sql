-- 0001: join tokens, nodes and the event log.
-- Times are INTEGER unix nanoseconds UTC; NULL means "never" (the zero time.Time).
-- Labels are JSON objects as TEXT. Rows are never deleted: tokens are revoked,
-- nodes are marked removed.

CREATE TABLE join_tokens (
	id          TEXT PRIMARY KEY,
	name        TEXT NOT NULL,
	labels      TEXT NOT NULL DEFAULT '{}',
	secret_hash BLOB NOT NULL,
	created_at  INTEGER NOT NULL,
	expires_at  INTEGER NOT NULL,
	max_uses    INTEGER NOT NULL CHECK (max_uses > 0),
	uses        INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
	revoked_at  INTEGER
) STRICT;

CREATE TABLE nodes (
	id                  TEXT PRIMARY KEY,
	name                TEXT NOT NULL,
	status              TEXT NOT NULL,
	labels              TEXT NOT NULL DEFAULT '{}',
	token_id            TEXT NOT NULL REFERENCES join_tokens (id),
	cert_serial         TEXT NOT NULL,
	cert_not_after      INTEGER NOT NULL,
	next_cert_serial    TEXT,
	next_cert_not_after INTEGER,
	enrolled_at         INTEGER NOT NULL,
	last_seen           INTEGER,
	draining            INTEGER NOT NULL DEFAULT 0,
	removed_at          INTEGER
) STRICT;

CREATE INDEX nodes_enrolled_at ON nodes (enrolled_at, id);

CREATE TABLE events (
	id      INTEGER PRIMARY KEY,
	time    INTEGER NOT NULL,
	node_id TEXT REFERENCES nodes (id), -- NULL for events about no node
	kind    TEXT NOT NULL,
	reason  TEXT NOT NULL
) STRICT;

CREATE INDEX events_node_id ON events (node_id, id);
