from __future__ import annotations

import asyncio
import logging

from services.mover.app import run
from shared.lifecycle import check_heartbeat, heartbeat_path
from shared.logs import configure
from shared.settings import MoverSettings


def main(argv: list[str]) -> int:
    settings = MoverSettings.from_env()
    if "--check" in argv:
        return check_heartbeat(heartbeat_path(settings.heartbeat_file, "mover"))
    configure(settings.log_level, "mover")
    logging.getLogger("minipacs.mover").info("settings: %s", settings.masked())
    asyncio.run(run(settings))
    return 0
