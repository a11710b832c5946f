"""One-shot migration command: ``python -m services.migrate [up|down|status]``."""
