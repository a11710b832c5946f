-- The index: patient / study / series / instance, and ingest conflicts.
-- Dates and times are kept as DICOM strings (DA YYYYMMDD, TM HHMMSS.FFFFFF): C-FIND range
-- matching on well-formed values is a string comparison.
CREATE TABLE patient (
    id                   bigserial PRIMARY KEY,
    patient_id           text NOT NULL,
    issuer_of_patient_id text NOT NULL DEFAULT '',
    patient_name         text NOT NULL DEFAULT '',
    patient_birth_date   text NOT NULL DEFAULT '',
    patient_sex          text NOT NULL DEFAULT '',
    created_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (patient_id, issuer_of_patient_id)
);
CREATE INDEX patient_name_idx ON patient (patient_name text_pattern_ops);
CREATE INDEX patient_name_lower_idx ON patient (lower(patient_name) text_pattern_ops);

CREATE TABLE study (
    id                       bigserial PRIMARY KEY,
    patient_fk               bigint NOT NULL REFERENCES patient (id),
    study_instance_uid       text NOT NULL UNIQUE,
    study_date               text NOT NULL DEFAULT '',
    study_time               text NOT NULL DEFAULT '',
    accession_number         text NOT NULL DEFAULT '',
    study_id                 text NOT NULL DEFAULT '',
    referring_physician_name text NOT NULL DEFAULT '',
    study_description        text NOT NULL DEFAULT '',
    specific_character_set   text NOT NULL DEFAULT '',
    num_series               integer NOT NULL DEFAULT 0,
    num_instances            integer NOT NULL DEFAULT 0,
    created_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX study_patient_idx ON study (patient_fk);
CREATE INDEX study_date_idx ON study (study_date);
CREATE INDEX study_accession_idx ON study (accession_number);

CREATE TABLE series (
    id                  bigserial PRIMARY KEY,
    study_fk            bigint NOT NULL REFERENCES study (id),
    series_instance_uid text NOT NULL UNIQUE,
    modality            text NOT NULL DEFAULT '',
    series_number       integer,
    series_description  text NOT NULL DEFAULT '',
    series_date         text NOT NULL DEFAULT '',
    series_time         text NOT NULL DEFAULT '',
    body_part_examined  text NOT NULL DEFAULT '',
    num_instances       integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_study_idx ON series (study_fk);
CREATE INDEX series_modality_idx ON series (modality);

CREATE TABLE instance (
    id               bigserial PRIMARY KEY,
    series_fk        bigint NOT NULL REFERENCES series (id),
    sop_instance_uid text NOT NULL UNIQUE,
    sop_class_uid    text NOT NULL,
    instance_number  integer,
    transfer_syntax  text NOT NULL,
    object_key       text NOT NULL,
    size             bigint NOT NULL,
    sha256           text NOT NULL,
    calling_aet      text NOT NULL DEFAULT '',
    received_at      timestamptz,
    indexed_at       timestamptz NOT NULL DEFAULT now(),
    header           jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX instance_series_idx ON instance (series_fk);

-- Same SOP Instance UID received again with different bytes: the first copy is kept
-- (keep-first, as Orthanc and dcm4chee do), the later one is recorded here and its object
-- stays in S3 under its own content-addressed key for inspection.
CREATE TABLE ingest_conflict (
    id               bigserial PRIMARY KEY,
    sop_instance_uid text NOT NULL,
    kept_sha256      text NOT NULL,
    rejected_sha256  text NOT NULL,
    rejected_key     text NOT NULL,
    calling_aet      text NOT NULL DEFAULT '',
    received_at      timestamptz,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sop_instance_uid, rejected_sha256)
);
