"""Crash points: a fault test kills a process at an exact step of its work
(``MINIPACS_CRASH_AT=storage.uploaded``), where a ``kill -9`` from outside lands wherever the
process happens to be. The process sends itself SIGKILL, as a power cut or the OOM killer
would: no cleanup, no ack, no reply. For tests only: unset, nothing is armed and the wrapped
steps run as they are; an unknown name is a settings error, so a typo cannot pass unseen."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import ParamSpec, TypeVar

log = logging.getLogger("minipacs.crash")

POINTS = {
    "gateway.confirmed": "the broker confirmed a received instance; its C-STORE response not sent",
    "storage.taken": "an instance.received message taken; nothing done with it yet",
    "storage.uploaded": "an instance is in S3; its instance.stored event not published",
    "storage.announced": "instance.stored confirmed by the broker; instance.received not acked",
    "storage.acked": "an instance.received message acked (others may be in flight)",
    "indexer.taken": "a batch taken; nothing written yet",
    "indexer.committed": "a batch committed to PostgreSQL; its messages not acked",
    "indexer.acked": "a batch's messages acked (others may be in flight)",
}

P = ParamSpec("P")
R = TypeVar("R")


def parse(spec: str) -> frozenset[str]:
    """The armed points of ``MINIPACS_CRASH_AT`` (comma-separated); ``ValueError`` names an
    unknown one."""
    names = frozenset(name.strip() for name in spec.split(",") if name.strip())
    unknown = sorted(names - POINTS.keys())
    if unknown:
        raise ValueError(f"unknown crash point(s) {', '.join(unknown)}; known: "
                         + ", ".join(sorted(POINTS)))
    return names


def reached(armed: frozenset[str], name: str) -> None:
    """Kill this process if ``name`` is armed."""
    if name not in armed:
        return
    log.warning("crash point %s reached (%s): killing this process", name, POINTS[name])
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def after(armed: frozenset[str], name: str, step: Callable[P, R]) -> Callable[P, R]:
    """``step``, then the crash point ``name``; ``step`` itself when ``name`` is not armed."""
    if name not in armed:
        return step

    def step_then_crash(*args: P.args, **kwargs: P.kwargs) -> R:
        result = step(*args, **kwargs)
        reached(armed, name)
        return result

    return step_then_crash
