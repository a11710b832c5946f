DROP INDEX IF EXISTS series_study_modality_idx;
DROP INDEX IF EXISTS study_accession_pattern_idx;
DROP INDEX IF EXISTS patient_id_pattern_idx;
