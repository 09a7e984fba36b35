-- 0002: why a node last changed status, shown by `control node show`.
ALTER TABLE nodes ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
