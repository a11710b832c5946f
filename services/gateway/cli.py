from __future__ import annotations

import asyncio
import logging

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
    return 0
