"""Logging, configured once per process.

Levels: the standard ones plus TRACE (5), which also turns on pynetdicom's own DIMSE/PDU
dumps, the equivalent of DCMTK's ``-ll trace``. Patient identifiers are only logged at DEBUG.
"""

from __future__ import annotations

import logging
import sys

TRACE = 5
logging.addLevelName(TRACE, "TRACE")


def configure(level: str, service: str) -> None:
    name = level.upper()
    numeric = TRACE if name == "TRACE" else logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)-5s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # pynetdicom logs every PDU at DEBUG and a lot at INFO: only show it when tracing.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if numeric <= TRACE else logging.WARNING)
    for noisy in ("aio_pika", "aiormq", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # the minio client's own retries: our "waiting for S3" / "not stored yet" lines say it once
    logging.getLogger("urllib3").setLevel(logging.ERROR)
