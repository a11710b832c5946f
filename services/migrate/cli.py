from __future__ import annotations

import logging

import asyncpg

from services.migrate.core import downgrade, upgrade
from shared.lifecycle import StartupFailed, retry_until, settings_or_exit
from shared.logs import configure
from shared.settings import Common

log = logging.getLogger("minipacs.migrate")


async def main(argv: list[str]) -> int:
    settings = settings_or_exit(Common, "migrate")
    configure(settings.log_level, "migrate")
    command = argv[0] if argv else "up"

    async def attempt() -> asyncpg.Connection:
        return await asyncpg.connect(settings.database_url, timeout=5)

    try:
        conn = await retry_until("PostgreSQL", attempt, settings.startup_timeout)
    except StartupFailed as exc:
        log.error("%s", exc)
        return 1
    try:
        if command == "up":
            done = await upgrade(conn)
            log.info("applied migrations %s", done or "none (up to date)")
        elif command == "down":
            done = await downgrade(conn, int(argv[1]) if len(argv) > 1 else 0)
            log.info("reverted migrations %s", done or "none")
        else:
            print("usage: python -m services.migrate [up|down [target]]")
            return 2
    finally:
        await conn.close()
    return 0
