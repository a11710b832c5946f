"""Stored instances fetched from S3 ahead of the DICOM sender, a few at a time, in order.

The retrieve paths (the mover's C-STOREs, the gateway's C-GET) send one instance after the
other on an association; the S3 GET of the next ones runs meanwhile in a few threads. Memory
stays bounded whatever the instance size: objects up to ``in_memory`` bytes are held as one
``bytes``, larger ones go to a temp file, and at most ``depth`` objects, and beyond the first
one at most ``budget`` bytes, are fetched ahead (one 1 GiB instance ahead, not six on disk).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Generic, Protocol, TypeVar

from minio import Minio

from shared.cache import HotCache
from shared.dimse_wire import dataset_offset
from shared.s3 import download_to, read_object
from shared.s3http import RawS3

IN_MEMORY = 4 * 1024 * 1024
_HEAD = 64 * 1024  # enough for any file meta group


class Stored(Protocol):
    @property
    def object_key(self) -> str: ...
    @property
    def size(self) -> int: ...


R = TypeVar("R", bound=Stored)


class Blob:
    """The dataset of one stored file (its meta group skipped), in memory or in a file (a temp
    file, deleted by ``close()``, unless ``owned`` is False: a hot-cache entry).

    A file is opened here and read through that descriptor until ``close()``: once fetched it
    stays readable whole even if its name goes meanwhile (a hot-cache entry evicted by any
    process's trim, a temp file removed by a sweeper). Opened by name at send time instead, a
    C-GET lost such an instance half-way (the gateway took it for a lost association) and a
    C-MOVE aborted its association."""

    def __init__(self, data: bytes | bytearray | None = None, path: Path | None = None,
                 owned: bool = True) -> None:
        self.data = data
        self.path = path
        self.owned = owned
        self._file: BinaryIO | None = None
        if data is not None:
            self.offset = dataset_offset(memoryview(data)[:_HEAD])
            self.length = len(data) - self.offset
        elif path is not None:
            f = path.open("rb", buffering=0)
            try:
                self.offset = dataset_offset(os.pread(f.fileno(), _HEAD, 0))
                self.length = os.fstat(f.fileno()).st_size - self.offset
            except BaseException:
                f.close()
                raise
            self._file = f
        else:
            raise ValueError("a Blob needs data or a path")

    def blocks(self, size: int) -> Iterator[memoryview]:
        if self.data is not None:
            view = memoryview(self.data)
            for start in range(self.offset, len(view), size):
                yield view[start:start + size]
            return
        if self._file is None:
            raise ValueError("the blob is closed")
        fd = self._file.fileno()
        buffer = bytearray(size)
        position, end = self.offset, self.offset + self.length
        while position < end:  # positional reads: the descriptor's offset is never moved
            n = os.preadv(fd, [memoryview(buffer)[:min(size, end - position)]], position)
            if not n:
                return  # shorter than it was: the sender finds the dataset ended early
            position += n
            yield memoryview(buffer)[:n]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None and self.owned:
            self.path.unlink(missing_ok=True)


def fetcher(s3: Minio, bucket: str, tmpdir: Path, raw: RawS3 | None,
            in_memory: int = IN_MEMORY, cache: HotCache | None = None) -> Callable[[Stored], Blob]:
    """A function fetching one stored instance into a ``Blob``; raises on S3 errors and on an
    object whose size differs from the index's. ``raw``: objects held in memory are read
    through it (an ``http://`` endpoint), not through the minio client. ``cache``: read from
    it first, and keep there what was read from S3."""

    def fetch(ref: Stored) -> Blob:
        if cache is not None and cache.enabled:
            if 0 < ref.size <= in_memory:
                hot = cache.read(ref.object_key, ref.size)
                if hot is not None:
                    return Blob(data=hot)
            elif (path := cache.path(ref.object_key, ref.size)) is not None:
                try:
                    blob = Blob(path=path, owned=False)  # open from now on, evicted or not
                except OSError:  # evicted meanwhile: read it from S3
                    pass
                else:
                    if blob.offset + blob.length == ref.size:
                        return blob
                    blob.close()  # replaced meanwhile by something else: read it from S3
        if 0 < ref.size <= in_memory:
            data = (raw.get(ref.object_key, in_memory) if raw is not None
                    else read_object(s3, bucket, ref.object_key, in_memory))
            if len(data) != ref.size:
                raise OSError(f"object {ref.object_key}: {len(data)} bytes, "
                              f"the index says {ref.size}")
            if cache is not None:
                cache.keep(ref.object_key, data)
            return Blob(data=data)
        with tempfile.NamedTemporaryFile(dir=tmpdir, prefix="retrieve-", suffix=".dcm",
                                         delete=False) as tmp:
            path = Path(tmp.name)
            try:
                download_to(s3, bucket, ref.object_key, tmp)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return Blob(path=path)

    return fetch


@dataclass
class Fetched(Generic[R]):
    ref: R
    blob: Blob | None
    error: BaseException | None = None


class Prefetcher(Generic[R]):
    """``next()`` gives the fetched instances in the order of ``refs`` (thread-safe, so several
    sending threads can share one); up to ``depth`` (and ``budget`` bytes) are being fetched
    ahead by ``threads`` threads. ``close()`` stops fetching and deletes what was fetched but
    not taken."""

    def __init__(self, refs: Sequence[R], fetch: Callable[[R], Blob], threads: int = 3,
                 depth: int = 6, budget: int = 64 * 1024 * 1024) -> None:
        self._refs = refs
        self._fetch = fetch
        self._depth = max(1, depth)
        self._budget = budget
        self._ahead_bytes = 0
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="s3-prefetch")
        self._ahead: list[Future[Blob]] = []
        self._submitted = 0
        self._lock = threading.Lock()
        self._closed = False

    def _top_up(self) -> None:
        while (not self._closed and self._submitted < len(self._refs)
               and len(self._ahead) < self._depth
               and (not self._ahead or self._ahead_bytes < self._budget)):
            ref = self._refs[self._submitted]
            self._ahead.append(self._pool.submit(self._fetch, ref))
            self._ahead_bytes += ref.size
            self._submitted += 1

    def next(self) -> Fetched[R] | None:
        """The next instance (blob or the fetch error), or None when all were handed out."""
        with self._lock:
            self._top_up()
            if not self._ahead:
                return None
            future = self._ahead.pop(0)
            ref = self._refs[self._submitted - len(self._ahead) - 1]
            self._ahead_bytes -= ref.size
            self._top_up()
        try:
            return Fetched(ref, future.result())
        except Exception as exc:  # counted by the caller as a failed sub-operation
            return Fetched(ref, None, exc)

    def give_back(self) -> list[R]:
        """Stop: the refs not handed out yet (fetched blobs are deleted)."""
        with self._lock:
            self._closed = True
            rest = list(self._refs[self._submitted - len(self._ahead):])
            ahead, self._ahead = self._ahead, []
            self._ahead_bytes = 0
            self._submitted = len(self._refs)
        for future in ahead:
            future.cancel()
            if not future.cancelled():
                try:
                    future.result().close()
                except Exception:  # noqa: S110 - a failed fetch holds nothing
                    pass
        return rest

    def close(self) -> None:
        self.give_back()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
