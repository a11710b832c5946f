"""minipacs common package: settings, message schemas, queue topology, DICOM mapping, keys."""
