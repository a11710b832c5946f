"""nodes: remote DICOM nodes changed at run time (``python -m services.nodes``)."""
