from __future__ import annotations

import asyncio
import logging

from services.storage.app import run
from shared.lifecycle import check_heartbeat, heartbeat_path
from shared.logs import configure
from shared.settings import StorageSettings


def main(argv: list[str]) -> int:
    settings = StorageSettings.from_env()
    if "--check" in argv:
        return check_heartbeat(heartbeat_path(settings.heartbeat_file, "storage"))
    configure(settings.log_level, "storage")
    logging.getLogger("minipacs.storage").info("settings: %s", settings.masked())
    asyncio.run(run(settings))
    return 0
