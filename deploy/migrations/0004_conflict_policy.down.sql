ALTER TABLE ingest_conflict DROP COLUMN IF EXISTS policy;
