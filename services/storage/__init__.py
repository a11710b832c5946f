"""storage: consumes ``instance.received``, puts the bytes into S3, emits ``instance.stored``."""
