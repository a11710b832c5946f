from __future__ import annotations

import asyncio
import logging
import os
import sys

from services.gateway.app import run
from shared.lifecycle import check_heartbeat, heartbeat_path
from shared.logs import configure
from shared.settings import GatewaySettings


def main(argv: list[str]) -> int:
    settings = GatewaySettings.from_env()
    if "--check" in argv:
        return check_heartbeat(heartbeat_path(settings.heartbeat_file, "gateway"))
    configure(settings.log_level, "gateway")
    logging.getLogger("minipacs.gateway").info("settings: %s", settings.masked())
    asyncio.run(run(settings))
    # Established associations have finished and everything is closed. What may be left are
    # pynetdicom threads of connections that never sent an A-ASSOCIATE-RQ, blocked until their
    # ACSE timeout; they are not daemon threads, so exit without waiting for them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
