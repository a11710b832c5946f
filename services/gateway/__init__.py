"""The DICOM gateway: a pynetdicom SCP that modalities point at."""
