-- 0004: the public key a node enrolled with (SHA-256 of its
-- SubjectPublicKeyInfo), so that no key enrolls twice, not even with a
-- multi-use token. Nodes enrolled before have none.
ALTER TABLE nodes ADD COLUMN enroll_key_sha256 BLOB;
CREATE UNIQUE INDEX nodes_enroll_key ON nodes (enroll_key_sha256) WHERE enroll_key_sha256 IS NOT NULL;
