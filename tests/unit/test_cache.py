"""The hot cache (``shared/cache.py``) on the real filesystem, and the prefetcher reading it."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest

from shared import cache as cache_mod
from shared.cache import HotCache, entry_name
from shared.keys import object_key
from shared.prefetch import fetcher


def _key(data: bytes) -> str:
    return object_key(hashlib.sha256(data).hexdigest())


def _spooled(tmp: Path, data: bytes) -> Path:
    path = tmp / f"spooled-{hashlib.sha256(data).hexdigest()[:8]}.dcm"
    path.write_bytes(data)
    return path


def test_entry_names_come_only_from_our_object_keys() -> None:
    data = b"x"
    assert entry_name(_key(data)) == f"{hashlib.sha256(data).hexdigest()}.dcm"
    for bad in ("instances/../../etc/passwd", "../x.dcm", "instances/ab/" + "g" * 64 + ".dcm",
                "instances/ab/" + "a" * 64 + ".dcm/..", "", "/" + "a" * 64 + ".dcm",
                "instances/ab/" + "a" * 64 + ".dcm\n"):
        assert entry_name(bad) is None, bad


def test_adopted_file_is_served_with_the_index_size_only(tmp_path: Path) -> None:
    hot = HotCache(tmp_path / "cache", 64 * 1024 * 1024).create()
    data = os.urandom(5000)
    spooled = _spooled(tmp_path, data)
    assert hot.adopt(spooled, _key(data), len(data))
    assert not spooled.exists()  # moved, not copied
    assert hot.read(_key(data), len(data)) == data
    # a size that disagrees with the index is a miss, and the entry is dropped
    assert hot.read(_key(data), len(data) + 1) is None
    assert hot.read(_key(data), len(data)) is None


def test_a_foreign_key_is_not_adopted_and_the_file_stays(tmp_path: Path) -> None:
    hot = HotCache(tmp_path / "cache", 64 * 1024 * 1024).create()
    spooled = _spooled(tmp_path, b"abc")
    assert not hot.adopt(spooled, "instances/../../x.dcm", 3)
    assert spooled.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_off_when_zero(tmp_path: Path) -> None:
    hot = HotCache(tmp_path / "cache", 0).create()
    spooled = _spooled(tmp_path, b"abc")
    assert not hot.adopt(spooled, _key(b"abc"), 3)
    hot.keep(_key(b"abc"), b"abc")
    assert hot.read(_key(b"abc"), 3) is None
    assert not (tmp_path / "cache").exists()


def test_objects_large_beside_the_cache_are_not_kept(tmp_path: Path) -> None:
    hot = HotCache(tmp_path / "cache", 80 * 1024).create()  # takes objects up to 10 KiB
    big, small = os.urandom(11 * 1024), os.urandom(9 * 1024)
    hot.keep(_key(big), big)
    hot.keep(_key(small), small)
    assert hot.read(_key(big), len(big)) is None
    assert hot.read(_key(small), len(small)) == small


def test_nothing_is_added_when_the_disk_is_nearly_full(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    hot = HotCache(tmp_path / "cache", 64 * 1024 * 1024).create()
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda _p: real._replace(free=cache_mod.MIN_FREE + 100))
    spooled = _spooled(tmp_path, os.urandom(1000))
    assert not hot.adopt(spooled, _key(spooled.read_bytes()), 1000)
    assert spooled.exists()


def test_trim_evicts_the_least_recently_used_first(tmp_path: Path) -> None:
    hot = HotCache(tmp_path / "cache", 3 * 8192).create()
    blobs = [os.urandom(8192) for _ in range(5)]
    now = time.time()
    for age, data in zip((500, 400, 300, 200, 100), blobs, strict=True):
        path = tmp_path / "cache" / str(entry_name(_key(data)))
        path.write_bytes(data)  # as storage's adopt() leaves them
        os.utime(path, (now - age, now - age))
    # a hit on the oldest makes it the most recently used (hits refresh after TOUCH_AFTER)
    assert hot.read(_key(blobs[0]), 8192) == blobs[0]
    stray = tmp_path / "cache" / ".dead.tmp"
    stray.write_bytes(b"half")
    os.utime(stray, (now - 7200, now - 7200))
    assert hot.trim() == 3  # blobs 1 and 2, and the stray temp file
    assert {n for n, d in enumerate(blobs) if hot.read(_key(d), 8192)} == {0, 3, 4}


def test_trim_holds_what_it_evicts_in_memory_not_the_whole_cache(tmp_path: Path) -> None:
    """A full cache of small instances holds 100,000 files and more: a trim that listed them
    all grew the process's resident memory by megabytes at each trim (storage's RSS stepped up
    as the cache filled). Only the entries to evict may be held."""
    files, size = 4000, 100
    hot = HotCache(tmp_path / "cache", (files - 20) * size).create()
    now = time.time()
    for n in range(files):
        path = tmp_path / "cache" / f"{n:064x}.dcm"
        path.write_bytes(b"x" * size)
        os.utime(path, (now - files + n, now - files + n))  # entry 0 the least recently used
    tracemalloc.start()
    try:
        removed = hot.trim()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert removed == 20
    assert sorted(p.name for p in (tmp_path / "cache").iterdir())[0] == f"{20:064x}.dcm"
    assert peak < 100_000, f"trim held {peak} bytes for {files} files"  # listing all: ~1 MB


def test_the_fetcher_reads_the_cache_first_and_keeps_what_s3_gave(tmp_path: Path) -> None:
    """No S3 here: a cached object is served without touching it (the client would fail), an
    uncached one goes to it (and fails)."""
    from minio import Minio

    from shared.s3http import RawS3

    hot = HotCache(tmp_path / "cache", 64 * 1024 * 1024).create()
    meta_and_data = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"
    data = meta_and_data + os.urandom(3000)
    hot.keep(_key(data), data)
    unreachable = Minio("127.0.0.1:9", access_key="a", secret_key="b", secure=False)
    raw = RawS3("127.0.0.1", 9, "bucket", "a", "b", "us-east-1", timeout=2)
    fetch = fetcher(unreachable, "bucket", tmp_path, raw, cache=hot)

    class Ref:
        def __init__(self, key: str, size: int) -> None:
            self.object_key, self.size = key, size

    blob = fetch(Ref(_key(data), len(data)))
    assert blob.data == data
    other = os.urandom(100)
    with pytest.raises(OSError):  # nothing listens on port 9
        fetch(Ref(_key(other), len(other)))


def test_a_large_cached_object_is_streamed_from_the_cache_and_stays_there(
        tmp_path: Path) -> None:
    """Objects over the in-memory limit are sent from the cache file itself; closing the
    blob after the send must not delete the entry (it would for a temp file from S3)."""
    from minio import Minio

    from shared.s3http import RawS3

    hot = HotCache(tmp_path / "cache", 64 * 1024 * 1024).create()
    data = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00" + os.urandom(5000)
    hot.keep(_key(data), data)
    raw = RawS3("127.0.0.1", 9, "bucket", "a", "b", "us-east-1", timeout=2)
    fetch = fetcher(Minio("127.0.0.1:9", access_key="a", secret_key="b", secure=False),
                    "bucket", tmp_path, raw, in_memory=1024, cache=hot)

    class Ref:
        object_key, size = _key(data), len(data)

    blob = fetch(Ref())
    assert blob.data is None and blob.path is not None
    assert b"".join(bytes(b) for b in blob.blocks(777)) == data[blob.offset:]
    blob.close()
    assert hot.read(_key(data), len(data)) == data


def test_a_large_cached_object_evicted_after_the_fetch_is_still_sent_whole(
        tmp_path: Path) -> None:
    """The fetch opens the cache file and the blob reads through that descriptor: a trim (of
    any process) evicting the entry between the prefetch and the send takes nothing away.
    (The blob used to open the file by name at send time: FileNotFoundError, which the C-GET
    took for a lost association.)"""
    from minio import Minio

    from shared.s3http import RawS3

    hot = HotCache(tmp_path / "cache", 64 * 1024 * 1024).create()
    data = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00" + os.urandom(5000)
    hot.keep(_key(data), data)
    raw = RawS3("127.0.0.1", 9, "bucket", "a", "b", "us-east-1", timeout=2)
    fetch = fetcher(Minio("127.0.0.1:9", access_key="a", secret_key="b", secure=False),
                    "bucket", tmp_path, raw, in_memory=1024, cache=hot)

    class Ref:
        object_key, size = _key(data), len(data)

    blob = fetch(Ref())
    assert blob.path is not None
    hot.max_bytes = 1
    assert hot.trim() == 1 and not blob.path.exists()  # evicted by the trim
    assert b"".join(bytes(b) for b in blob.blocks(777)) == data[blob.offset:]
    assert b"".join(bytes(b) for b in blob.blocks(4096)) == data[blob.offset:]  # again
    blob.close()
    with pytest.raises(ValueError):
        next(blob.blocks(777))


def test_a_temp_file_blob_removed_after_the_fetch_is_read_whole_and_close_forgets_it(
        tmp_path: Path) -> None:
    from shared.prefetch import Blob

    data = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00" + os.urandom(3000)
    path = tmp_path / "retrieve-x.dcm"
    path.write_bytes(data)
    blob = Blob(path=path)
    path.unlink()  # a sweeper, say
    assert blob.length == len(data) - blob.offset
    assert b"".join(bytes(b) for b in blob.blocks(1000)) == data[blob.offset:]
    blob.close()
    blob.close()  # twice: nothing left to close or remove
