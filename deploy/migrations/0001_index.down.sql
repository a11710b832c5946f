DROP TABLE ingest_conflict;
DROP TABLE instance;
DROP TABLE series;
DROP TABLE study;
DROP TABLE patient;
