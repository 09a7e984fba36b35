-- 0003: status events carry the move as columns, not as text in the reason
-- ("<from> -> <to>: <why>" until now), and a flapping node's moves can be
-- summed up in one event (coalesced: how many moves it stands for).
ALTER TABLE events ADD COLUMN from_status TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN to_status TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN coalesced INTEGER NOT NULL DEFAULT 0;

-- Take the old text apart once: from, then to, then the reason alone.
UPDATE events SET
	from_status = substr(reason, 1, instr(reason, ' -> ') - 1),
	reason = substr(reason, instr(reason, ' -> ') + 4)
WHERE kind = 'status' AND instr(reason, ' -> ') > 0;
UPDATE events SET
	to_status = CASE WHEN instr(reason, ': ') > 0 THEN substr(reason, 1, instr(reason, ': ') - 1) ELSE reason END,
	reason = CASE WHEN instr(reason, ': ') > 0 THEN substr(reason, instr(reason, ': ') + 2) ELSE '' END
WHERE kind = 'status' AND from_status != '';

CREATE INDEX events_time ON events (time);
