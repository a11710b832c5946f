"""The hot cache: local copies of recently stored or retrieved instances, for C-MOVE and C-GET.

S3 stays the archive of record; this is a disposable second copy on the spool's disk, the way
Orthanc serves from its own storage directory. Storage moves each spool file into it once the
object is verified in S3 and announced (a rename on the same filesystem: no extra write), and
the retrieve paths (the gateway's C-GET, the mover) read from it first, falling back to S3 and
keeping what they fetched. A cold read costs the S3 store's GET; a hot one a local file read.

Entries are named by the object's SHA-256 (from its object key: never a tag value), checked
against the index's size on every read, and evicted oldest-used first once the cache holds more
than ``max_bytes`` (any process may trim; a missing file just means a miss). Losing the folder
loses nothing: everything in it is in S3. ``MINIPACS_CACHE_MB=0`` turns it off.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

log = logging.getLogger("minipacs.cache")

_KEY = re.compile(r"instances/[0-9a-f]{2}/([0-9a-f]{64})\.dcm")  # fullmatch
_ENTRY = re.compile(r"[0-9a-f]{64}\.dcm")
TOUCH_AFTER = 60.0  # s: a hit refreshes an entry's last use at most this often
MIN_FREE = 1024 ** 3  # bytes the spool's disk keeps free: below, nothing is added


def entry_name(object_key: str) -> str | None:
    """The cache file name of an object key, or None for a key that is not one of ours."""
    match = _KEY.fullmatch(object_key)
    return f"{match.group(1)}.dcm" if match else None


@dataclass
class HotCache:
    root: Path
    max_bytes: int
    _added: int = 0  # bytes added by this process since its last trim
    _trimming: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def create(self) -> HotCache:
        if self.enabled:
            self.root.mkdir(parents=True, exist_ok=True)
        return self

    def _accepts(self, size: int) -> bool:
        """Worth keeping: on, the object small beside the cache, and the disk not nearly full
        (the spool, on the same disk, comes first)."""
        if not self.enabled or size > self.max_bytes // 8:
            return False
        try:
            return shutil.disk_usage(self.root).free - size > MIN_FREE
        except OSError:
            return False

    def adopt(self, path: Path, object_key: str, size: int) -> bool:
        """Move ``path`` (a verified copy of ``object_key``, on the same filesystem) into the
        cache; False (``path`` left alone) when the cache does not take it."""
        name = entry_name(object_key)
        if name is None or not self._accepts(size):
            return False
        try:
            os.replace(path, self.root / name)
        except OSError as exc:
            log.debug("not cached: %s", exc)
            return False
        self._note(size)
        return True

    def keep(self, object_key: str, data: bytes | bytearray) -> None:
        """Store fetched bytes (already checked against the index's size)."""
        name = entry_name(object_key)
        if name is None or not self._accepts(len(data)):
            return
        tmp = self.root / f".{uuid.uuid4().hex}.tmp"
        try:
            with tmp.open("wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        except OSError as exc:
            log.debug("not cached: %s", exc)
            tmp.unlink(missing_ok=True)
            return
        self._note(len(data))

    def path(self, object_key: str, size: int) -> Path | None:
        """The cached file of ``object_key`` if it is there with the index's ``size``."""
        if not self.enabled:
            return None
        name = entry_name(object_key)
        if name is None:
            return None
        path = self.root / name
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size != size:
            path.unlink(missing_ok=True)
            return None
        if time.time() - st.st_mtime > TOUCH_AFTER:
            try:
                os.utime(path)
            except OSError:
                return None
        return path

    def read(self, object_key: str, size: int) -> bytes | None:
        path = self.path(object_key, size)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:  # evicted between the check and the read
            return None
        return data if len(data) == size else None

    def _note(self, size: int) -> None:
        self._added += size
        if self._added > self.max_bytes // 16 and self._trimming.acquire(blocking=False):
            self._added = 0
            threading.Thread(target=self._trim_and_release, name="cache-trim",
                             daemon=True).start()

    def _trim_and_release(self) -> None:
        try:
            self.trim()
        finally:
            self._trimming.release()

    def trim(self) -> int:
        """Evict least recently used entries until the cache holds at most ``max_bytes``;
        also removes temp files left by a crash. Returns the number of files removed.

        Memory stays proportional to what is evicted, not to what the cache holds (up to
        ``max_bytes`` of small instances, 100,000 files and more): a first pass only adds up
        the sizes, and a second, if the cache is over its size, keeps the oldest entries that
        cover the excess in a heap."""
        if not self.root.is_dir():
            return 0
        removed = 0
        total = 0
        stale = time.time() - 3600
        for entry, st in _entries(self.root):
            if _ENTRY.fullmatch(entry.name):
                total += st.st_size
            elif st.st_mtime < stale:  # a temp file of a write that never finished
                removed += _unlink(entry.path)
        excess = total - self.max_bytes
        if excess <= 0:
            return removed
        oldest: list[tuple[float, int, str]] = []  # a heap, the newest of them on top
        held = 0
        for entry, st in _entries(self.root):
            if not _ENTRY.fullmatch(entry.name):
                continue
            heapq.heappush(oldest, (-st.st_mtime, st.st_size, entry.path))
            held += st.st_size
            while held - oldest[0][1] >= excess:  # enough without the newest of them
                held -= heapq.heappop(oldest)[1]
        return removed + sum(_unlink(path) for _, _, path in oldest)


def _entries(root: Path) -> Iterator[tuple[os.DirEntry[str], os.stat_result]]:
    """The files in ``root`` with their ``stat`` (those gone meanwhile are skipped)."""
    with os.scandir(root) as it:
        for entry in it:
            try:
                yield entry, entry.stat()
            except OSError:
                continue


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
    except OSError:
        return 0
    return 1


@cache
def hot_cache(spool_dir: Path, cache_mb: int) -> HotCache:
    """The process's cache for these settings (one object, so one trim at a time)."""
    return HotCache(spool_dir / "cache", cache_mb * 1024 * 1024).create()
