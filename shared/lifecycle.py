"""Start-up retries, SIGTERM handling and heartbeats shared by every service."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
S = TypeVar("S")
log = logging.getLogger("minipacs.lifecycle")

EX_CONFIG = 78  # sysexits.h: a configuration error, which restarting will not cure


class StartupFailed(RuntimeError):
    """The service cannot start: a dependency (PostgreSQL, RabbitMQ, S3) did not answer within
    the start-up timeout, or its spool directory is unusable. ``service_main`` logs it as one
    ERROR line and exits 1."""


async def retry_until(
    what: str, attempt: Callable[[], Awaitable[T]], timeout: float,  # noqa: ASYNC109
    first_delay: float = 0.2,
) -> T:
    """Call ``attempt`` until it succeeds or ``timeout`` seconds have passed (bounded backoff);
    then ``StartupFailed``, naming ``what`` and the last error."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise StartupFailed(f"gave up waiting for {what} after {timeout:.0f} s: "
                                    f"{type(exc).__name__}: {exc}") from exc
            log.warning("waiting for %s: %s; retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def stop_event() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT (the compose and Ctrl-C way to stop us)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def heartbeat(path: str, stop: asyncio.Event, healthy: Callable[[], bool],
                    every: float = 2.0) -> None:
    """Touch ``path`` while ``healthy()``; ``--check`` reads its age (for compose healthchecks)."""
    if not path:
        await stop.wait()
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    while not stop.is_set():
        if healthy():
            p.touch()  # noqa: ASYNC240 - a tiny metadata write every few seconds
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


def heartbeat_path(configured: str, service: str) -> str:
    return configured or f"/tmp/minipacs-{service}.alive"  # noqa: S108 - a liveness marker


def heartbeat_fresh(path: str, max_age: float = 15.0) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime <= max_age
    except OSError:
        return False


def check_heartbeat(path: str, max_age: float = 15.0) -> int:
    """Exit status for ``python -m services.X --check``: 0 when the heartbeat is fresh."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        print(f"unhealthy: no heartbeat at {path}")
        return 1
    if age > max_age:
        print(f"unhealthy: heartbeat is {age:.0f}s old")
        return 1
    print("healthy")
    return 0


def settings_or_exit(settings_type: type[S], name: str) -> S:
    """``settings_type.from_env()``; a value it cannot use ends the process with one line on
    stderr naming the variable (no traceback) and exit status ``EX_CONFIG``."""
    from shared.settings import SettingsError

    try:
        return settings_type.from_env()  # type: ignore[attr-defined, no-any-return]
    except SettingsError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG) from None


def service_main(name: str, argv: list[str], settings_type: type[Any],
                 run: Callable[[Any], Coroutine[Any, Any, None]]) -> int:
    """The whole ``__main__`` of a service: ``--check`` for health, else configure logging, log
    the (masked) settings and run until SIGTERM / Ctrl-C."""
    from shared.logs import configure

    settings = settings_or_exit(settings_type, name)
    if "--check" in argv:
        return check_heartbeat(heartbeat_path(settings.heartbeat_file, name))
    configure(settings.log_level, name)
    logging.getLogger(f"minipacs.{name}").info("settings: %s", settings.masked())
    try:
        asyncio.run(run(settings))
    except StartupFailed as exc:  # its own line says what and why; a traceback adds nothing
        logging.getLogger(f"minipacs.{name}").error("%s", exc)
        return 1
    return 0
