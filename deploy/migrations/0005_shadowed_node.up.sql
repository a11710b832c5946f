-- A node added at run time (source = 'api') keeps its place when MINIPACS_NODES has an entry of
-- the same name: the gateway's seeding keeps that entry here instead, so that deleting the
-- run-time node puts the MINIPACS_NODES one back at once, not at the next gateway start.
-- {"aet": ..., "host": ..., "port": ..., "allow": [...]}, or NULL.
ALTER TABLE remote_node ADD COLUMN settings_node jsonb;
