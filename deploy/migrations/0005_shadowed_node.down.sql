ALTER TABLE remote_node DROP COLUMN IF EXISTS settings_node;
