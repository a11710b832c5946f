from __future__ import annotations

import asyncio
import logging

from services.indexer.app import run
from shared.lifecycle import check_heartbeat, heartbeat_path
from shared.logs import configure
from shared.settings import IndexerSettings


def main(argv: list[str]) -> int:
    settings = IndexerSettings.from_env()
    if "--check" in argv:
        return check_heartbeat(heartbeat_path(settings.heartbeat_file, "indexer"))
    configure(settings.log_level, "indexer")
    logging.getLogger("minipacs.indexer").info("settings: %s", settings.masked())
    asyncio.run(run(settings))
    return 0
