-- Which policy settled each conflict: 'keep-first' (the later copy is the one recorded here) or
-- 'overwrite' (MINIPACS_OVERWRITE_INSTANCES: the copy received last was indexed, the one it
-- replaced is recorded here). kept_sha256 is the copy the index held after the conflict.
ALTER TABLE ingest_conflict ADD COLUMN policy text NOT NULL DEFAULT 'keep-first';
