from __future__ import annotations

import logging
import os
import sys

from services.gateway.app import run
from services.gateway.workers import supervise, worker_number
from shared.lifecycle import service_main, settings_or_exit
from shared.settings import GatewaySettings


def main(argv: list[str]) -> int:
    worker = worker_number()
    if not worker and "--check" not in argv:
        settings = settings_or_exit(GatewaySettings, "gateway")
        if settings.gateway_processes > 1:
            return supervise(settings)
    status = service_main(f"gateway.{worker}" if worker else "gateway", argv, GatewaySettings,
                          run)
    if "--check" in argv:
        return status
    # Established associations have finished and everything is closed. What may be left are
    # pynetdicom threads of connections that never sent an A-ASSOCIATE-RQ, blocked until their
    # ACSE timeout; they are not daemon threads, so exit without waiting for them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
