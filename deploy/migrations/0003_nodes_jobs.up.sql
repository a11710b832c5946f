-- Remote DICOM nodes (the run-time editable form of Orthanc's DicomModalities) and move jobs.
-- remote_node: seeded from MINIPACS_NODES at gateway start (source = 'settings'); nodes added
-- at run time (source = 'api') are never overwritten by the seeding. Only nodes in this table
-- are C-MOVE destinations.
CREATE TABLE remote_node (
    name       text PRIMARY KEY,
    aet        text NOT NULL CHECK (length(aet) BETWEEN 1 AND 16 AND aet !~ '[\\[:cntrl:]]'),
    host       text NOT NULL CHECK (host <> ''),
    port       integer NOT NULL CHECK (port > 0 AND port < 65536),
    allow      text[] NOT NULL DEFAULT '{echo,store,find,move,get}'
               CHECK (allow <@ ARRAY['echo', 'store', 'find', 'move', 'get']),
    source     text NOT NULL DEFAULT 'api' CHECK (source IN ('settings', 'api')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX remote_node_aet_idx ON remote_node (aet);

-- One row per move job (a C-MOVE, or "send this to node X" from the API or routing rules).
-- Written only by the mover. Counts follow PS3.4 C.4.2: remaining / completed / failed /
-- warning sub-operations.
CREATE TABLE move_job (
    id                uuid PRIMARY KEY,
    origin            text NOT NULL CHECK (origin IN ('c-move', 'api', 'routing')),
    requested_by_aet  text NOT NULL DEFAULT '',
    requested_by_host text NOT NULL DEFAULT '',
    level             text NOT NULL,
    identifier        jsonb NOT NULL DEFAULT '{}',
    destination       text NOT NULL,
    destination_aet   text NOT NULL DEFAULT '',
    state             text NOT NULL
                      CHECK (state IN ('running', 'done', 'failed', 'canceled', 'expired')),
    total             integer NOT NULL DEFAULT 0,
    remaining         integer NOT NULL DEFAULT 0,
    completed         integer NOT NULL DEFAULT 0,
    failed            integer NOT NULL DEFAULT 0,
    warning           integer NOT NULL DEFAULT 0,
    failed_uids       text[] NOT NULL DEFAULT '{}',
    error             text NOT NULL DEFAULT '',
    requested_at      timestamptz,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX move_job_recent_idx ON move_job (started_at DESC);
CREATE INDEX move_job_active_idx ON move_job (state) WHERE state = 'running';
