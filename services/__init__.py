"""minipacs services: each sub-package is one process (``python -m services.<name>``)."""
