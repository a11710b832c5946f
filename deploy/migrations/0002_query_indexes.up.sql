-- Indexes for C-FIND (shared/query.py). Equality on PatientID and the UIDs is served by the
-- unique indexes of 0001. A wildcard with a literal prefix ("PID12*") is also written as a range
-- with the pattern operators (~>=~ / ~<=~), which a text_pattern_ops index serves whatever the
-- database collation and even in a generic (prepared) plan.
CREATE INDEX patient_id_pattern_idx ON patient (patient_id text_pattern_ops);
CREATE INDEX study_accession_pattern_idx ON study (accession_number text_pattern_ops);
-- ModalitiesInStudy: the series of one study with a given modality.
CREATE INDEX series_study_modality_idx ON series (study_fk, modality);
