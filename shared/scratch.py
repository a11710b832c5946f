"""Scratch folders: temp files of one process under the spool, removed once it is gone.

``<spool>/retrieve/`` holds what a C-GET fetches from S3 ahead of sending it (objects over the
4 MiB held in memory, ``shared.prefetch``). Each file is deleted once sent, but a gateway
killed mid-C-GET (SIGKILL, out of memory, power) never gets to, and its files stayed for ever.
Now each gateway process keeps its files in a folder of its own, ``retrieve/<random>/``, and
holds an exclusive ``flock`` on ``retrieve/<random>.lock`` for as long as it lives. The kernel
drops that lock when the process ends, however it ends, so any process tells a dead owner's
folder from a live one without guessing from ages or process ids: ``sweep`` removes the
folders whose lock it can take, never one in use. Every gateway sweeps at start-up and then
every minute, so with several gateway processes (``MINIPACS_GATEWAY_PROCESSES``) or replicas
on one spool, the leftovers of one that died go within a minute, whichever are left.

The mover does the same under ``<spool>/move/`` for the instances of a C-MOVE waiting for
their C-STORE (``services/mover/app.py``): every mover sweeps that folder at start-up and
every minute.

Files directly in ``retrieve/`` (the layout before these folders) are removed once an hour
old; names the gateway does not write are left alone.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

log = logging.getLogger("minipacs.spool")

LOCK = ".lock"
_OWNED = re.compile(r"[0-9a-f]{32}")  # a scratch folder's name (and its lock file's stem)
_OLD_LAYOUT = re.compile(r"retrieve-.*\.dcm")  # temp files written straight into retrieve/
STARTING = 60.0  # s: a lock file younger than this may be its process's, before its flock
OLD_AFTER = 3600.0  # s: a file of the old layout this old is no C-GET's any more
SWEEP_EVERY = 60.0  # s between two sweeps by a running process


class Scratch:
    """This process's folder under ``parent``: ``open()`` makes it and takes its lock,
    ``close()`` removes it (at a clean stop; after a crash, ``sweep`` does)."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self.path = parent  # the folder itself once opened
        self._lock: int | None = None

    def open(self) -> Scratch:
        self.parent.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        lock = os.open(self.parent / f"{name}{LOCK}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # blocking: a sweep may hold it for a moment, seeing it young, before we do
            fcntl.flock(lock, fcntl.LOCK_EX)
            (self.parent / name).mkdir()  # after the lock: a folder never exists unlocked
        except BaseException:
            os.close(lock)
            raise
        self._lock = lock
        self.path = self.parent / name
        return self

    def close(self) -> None:
        if self._lock is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        (self.parent / f"{self.path.name}{LOCK}").unlink(missing_ok=True)
        os.close(self._lock)
        self._lock = None

    def __enter__(self) -> Scratch:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep(parent: Path) -> int:
    """Remove the folders under ``parent`` whose process has ended (their lock is free), and
    files of the old layout an hour old. Returns the number of files removed."""
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return 0
    removed = 0
    stems: set[str] = set()
    for entry in entries:
        name = entry.name
        stem = name[:-len(LOCK)] if name.endswith(LOCK) else name
        if _OWNED.fullmatch(stem):
            stems.add(stem)
        elif _OLD_LAYOUT.fullmatch(name):
            removed += _remove_if_old(entry)
    for stem in sorted(stems):
        try:
            removed += _sweep_one(parent, stem)
        except OSError as exc:  # one we may not remove must not stop the rest
            log.warning("scratch sweeper could not remove %s: %s", parent / stem,
                        exc.strerror or exc)
    return removed


def sweep_and_say(parent: Path, what: str) -> None:
    """``sweep``, and one INFO line "removed N <what>" when it removed anything."""
    removed = sweep(parent)
    if removed:
        log.info("removed %d %s", removed, what)


async def sweep_forever(parent: Path, what: str) -> None:
    """``sweep_and_say`` every ``SWEEP_EVERY`` s, until cancelled: with several processes on
    one spool, the others remove a killed one's files without waiting for its restart."""
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        try:
            await asyncio.to_thread(sweep_and_say, parent, what)
        except Exception:  # the next round tries again; a dead sweeper would be silent
            log.exception("sweeping %s failed; trying again in %.0f s", parent, SWEEP_EVERY)


def _sweep_one(parent: Path, stem: str) -> int:
    folder, lock_path = parent / stem, parent / f"{stem}{LOCK}"
    try:
        lock: int | None = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        lock = None  # a folder without its lock: what a sweep that stopped half-way leaves
    try:
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its process is alive
        if not folder.is_dir():
            # a lock alone: a process that died before its folder, or one starting right now
            # (its lock file made, its flock not taken yet): only an old one goes
            if lock is None or time.time() - os.fstat(lock).st_mtime < STARTING:
                return 0
            lock_path.unlink(missing_ok=True)
            return 0
        files = sum(len(names) for _, _, names in os.walk(folder))
        shutil.rmtree(folder)
        lock_path.unlink(missing_ok=True)  # last: a folder never outlives its lock unswept
        return files
    finally:
        if lock is not None:
            os.close(lock)


def _remove_if_old(entry: os.DirEntry[str]) -> int:
    try:
        if (entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < time.time() - OLD_AFTER):
            os.unlink(entry.path)
            return 1
    except FileNotFoundError:
        pass
    return 0
