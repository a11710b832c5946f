"""The spool's commit on a real filesystem: hashed here, or with the digest the gateway took
while writing the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.spool import Spool


def _incoming(spool: Spool, data: bytes) -> Path:
    path = spool.incoming / "received.tmp"
    path.write_bytes(data)
    return path


def test_commit_hashes_the_file_when_no_digest_is_given(tmp_path: Path) -> None:
    spool = Spool(tmp_path).create()
    data = b"DICM" * 100_000
    spooled = spool.commit(_incoming(spool, data))
    assert (spooled.sha256, spooled.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert spool.path_of(spooled.name) is not None
    assert spool.path_of(spooled.name).read_bytes() == data  # type: ignore[union-attr]
    assert not list(spool.incoming.iterdir())


def test_commit_takes_the_writers_digest_without_reading_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path).create()
    data = b"x" * 1000
    digest = ("ab" * 32, len(data))  # not the real hash: proves it is not recomputed
    spooled = spool.commit(_incoming(spool, data), digest)
    assert (spooled.sha256, spooled.size) == digest


def test_commit_refuses_a_file_whose_size_is_not_what_was_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path).create()
    path = _incoming(spool, b"x" * 1000)
    with pytest.raises(OSError, match="1000 bytes, 1001 were written"):
        spool.commit(path, (hashlib.sha256(b"").hexdigest(), 1001))
    assert path.exists()  # not moved into ready/: nothing was announced
    assert not list(spool.ready.iterdir())
