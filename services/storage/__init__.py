"""storage: consumes ``instance.received``, puts the bytes into S3, verifies, emits ``instance.stored``."""
