"""Staging garbage collection on a real directory: ``Spool.sweep`` (``shared/spool.py``) and the
storage service's ``sweep_forever`` loop (``services/storage/worker.py``).

What the code promises: the sweeper removes files older than the sweep age from ``incoming/``
(transfers that were cut off) and ``rejected/`` (files whose message the broker never
confirmed); it never looks into ``ready/``, whose files are the claim checks of messages that
are (or may still be) queued, however old they are. File ages are set with ``os.utime``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection

from services.storage.worker import StorageWorker
from shared import broker, s3
from shared.lifecycle import StartupFailed
from shared.settings import StorageSettings
from shared.spool import Spool

HOUR = 3600.0


def aged(path: Path, seconds: float, data: bytes = b"partial dataset") -> Path:
    """``path`` with ``data``, its modification time ``seconds`` in the past."""
    path.write_bytes(data)
    when = time.time() - seconds
    os.utime(path, (when, when))
    return path


def ready_file(spool: Spool, seconds: float, data: bytes) -> str:
    """A file committed to ``ready/`` the way the gateway does it (the name an
    ``instance.received`` message carries), made ``seconds`` old."""
    staged = spool.incoming / f"tmp{uuid.uuid4().hex}.dcm"
    staged.write_bytes(data)
    spooled = spool.commit(staged)
    assert spooled.sha256 == hashlib.sha256(data).hexdigest()
    name = spooled.name
    spool.settle(spooled.marker)  # the broker confirmed its message
    path = spool.ready / name
    when = time.time() - seconds
    os.utime(path, (when, when))
    return name


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").create()


def test_sweep_removes_stale_staging_files_and_keeps_fresh_ones(spool: Spool) -> None:
    stale = [aged(spool.incoming / "tmpcut1.dcm", 2 * HOUR),
             aged(spool.incoming / "tmpcut2.dcm", HOUR + 60),
             aged(spool.rejected / "unconfirmed.dcm", 2 * HOUR)]
    fresh = [aged(spool.incoming / "tmpreceiving.dcm", HOUR - 60),
             aged(spool.incoming / "tmpjustnow.dcm", 0),
             aged(spool.rejected / "rescuable.dcm", 60)]

    assert spool.sweep(HOUR) == len(stale)

    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in fresh), [p for p in fresh if not p.exists()]
    # a fresh reject can still be rescued by storage if its message turns up after all
    assert spool.path_of("rescuable.dcm") == spool.rejected / "rescuable.dcm"
    # nothing left to do: a second pass removes nothing more
    assert spool.sweep(HOUR) == 0
    assert sorted(p.name for p in spool.incoming.iterdir()) == ["tmpjustnow.dcm",
                                                                "tmpreceiving.dcm"]


def test_an_entry_the_sweep_cannot_remove_does_not_stop_it(spool: Spool) -> None:
    """A directory someone made in ``incoming/`` (``unlink`` refuses it) is left alone, and
    the stale files beside it are still removed."""
    odd = spool.incoming / "a-directory"
    odd.mkdir()
    when = time.time() - 2 * HOUR
    os.utime(odd, (when, when))
    stale = [aged(spool.incoming / f"tmpcut{n}.dcm", 2 * HOUR) for n in range(3)]

    assert spool.sweep(HOUR) == len(stale)

    assert [p for p in stale if p.exists()] == []
    assert odd.is_dir()


def test_sweep_never_removes_ready_files_that_messages_reference(spool: Spool) -> None:
    """However old, a ``ready/`` file is a claim check a queued message may still hold (storage
    was down for a day, say): the sweeper leaves it, and storage still finds it by name."""
    contents = {ready_file(spool, age, f"instance {age}".encode()): f"instance {age}"
                for age in (30 * 24 * HOUR, 2 * HOUR, 0)}
    aged(spool.incoming / "tmpcut.dcm", 2 * HOUR)

    assert spool.sweep(HOUR) == 1
    assert spool.sweep(0) == 0  # even "everything older than now" spares ready/

    assert sorted(p.name for p in spool.ready.iterdir()) == sorted(contents)
    for name, data in contents.items():
        path = spool.path_of(name)
        assert path == spool.ready / name
        assert path.read_text() == data
    assert not any(spool.incoming.iterdir())


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` without blocking the event loop; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)



async def test_storage_sweeper_collects_staging_leftovers_and_spares_ready(
        spool: Spool, connection: AbstractRobustConnection) -> None:
    """The storage service's own loop, with its settings' sweep age: it sweeps as soon as it
    starts, leaves fresh and ready files alone, and stops when told to."""
    settings = StorageSettings.from_env({}, spool_dir=spool.root, sweep_after=HOUR,
                                        s3_endpoint="127.0.0.1:9", cache_mb=1)
    stop = asyncio.Event()
    worker = StorageWorker(settings, spool, s3.client(settings),
                           broker.Publisher(connection, 10), stop)
    stale = [aged(spool.incoming / "tmpcut.dcm", 2 * HOUR),
             aged(spool.rejected / "unconfirmed.dcm", 2 * HOUR)]
    fresh = [aged(spool.incoming / "tmpreceiving.dcm", 60),
             aged(spool.rejected / "rescuable.dcm", 60)]
    referenced = ready_file(spool, 2 * HOUR, b"a queued instance")

    sweeper = asyncio.create_task(worker.sweep_forever())
    try:
        await eventually(lambda: not any(p.exists() for p in stale), 10,
                         "the sweeper removing stale staging files")
        assert all(p.exists() for p in fresh)
        assert spool.path_of(referenced) == spool.ready / referenced
        assert not sweeper.done()  # still running, waiting for its next round
    finally:
        stop.set()
        await asyncio.wait_for(sweeper, 10)
    assert sweeper.exception() is None


def test_create_probes_the_spool_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool").create()
    assert all(d.is_dir() for d in (spool.incoming, spool.ready, spool.rejected))
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []


def test_a_spool_that_cannot_be_created_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    afile = tmp_path / "not-a-directory"
    afile.write_text("x")
    with pytest.raises(StartupFailed, match=r"spool directory .* is not usable: "
                                             r"NotADirectoryError"):
        Spool(afile / "spool").create()
