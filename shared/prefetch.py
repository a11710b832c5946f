"""Stored instances fetched from S3 ahead of the DICOM sender, a few at a time, in order.

The retrieve paths (the mover's C-STOREs, the gateway's C-GET) send one instance after the
other on an association; the S3 GET of the next ones runs meanwhile in a few threads. Memory
stays bounded whatever the instance size: objects up to ``in_memory`` bytes are held as one
``bytes``, larger ones go to a temp file, and at most ``depth`` objects, and beyond the first
one at most ``budget`` bytes, are fetched ahead (one 1 GiB instance ahead, not six on disk).
"""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from minio import Minio

from shared.dimse_wire import dataset_offset
from shared.s3 import download_to, read_object

IN_MEMORY = 4 * 1024 * 1024
_HEAD = 64 * 1024  # enough for any file meta group


class Stored(Protocol):
    @property
    def object_key(self) -> str: ...
    @property
    def size(self) -> int: ...


R = TypeVar("R", bound=Stored)


class Blob:
    """The dataset of one stored file (its meta group skipped), in memory or in a temp file."""

    def __init__(self, data: bytes | bytearray | None = None, path: Path | None = None) -> None:
        self.data = data
        self.path = path
        if data is not None:
            self.offset = dataset_offset(memoryview(data)[:_HEAD])
            self.length = len(data) - self.offset
        elif path is not None:
            with path.open("rb") as f:
                self.offset = dataset_offset(f.read(_HEAD))
                self.length = f.seek(0, 2) - self.offset
        else:
            raise ValueError("a Blob needs data or a path")

    def blocks(self, size: int) -> Iterator[memoryview]:
        if self.data is not None:
            view = memoryview(self.data)
            for start in range(self.offset, len(view), size):
                yield view[start:start + size]
            return
        assert self.path is not None
        buffer = bytearray(size)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.offset)
            while n := f.readinto(buffer):
                yield memoryview(buffer)[:n]

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class PlainGet:
    """GETs of whole objects over one keep-alive HTTP/1.1 connection per thread, from
    presigned URLs (SigV4 computed locally by the ``minio`` client). urllib3 and http.client
    parse every response's headers through the ``email`` package: that, not the bytes, was
    most of the mover's Python time per instance. Only for ``http://`` endpoints."""

    def __init__(self, s3: Minio, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self._local = threading.local()

    def read(self, key: str, limit: int) -> bytearray:
        url = urlsplit(self.s3.presigned_get_object(self.bucket, key, timedelta(hours=1)))
        request = (f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n"
                   ).encode("ascii")
        for attempt in (0, 1):
            conn: socket.socket | None = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = socket.create_connection((url.hostname, url.port or 80), timeout=60)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._local.conn = conn
            try:
                conn.sendall(request)
                status, fields, body = self._response(conn, key, limit)
            except OSError:
                self._drop()
                if fresh or attempt:
                    raise
                continue  # a kept-alive connection the server had closed: once more
            if fields.get("connection", "").lower() == "close":
                self._drop()
            if status == 404:
                raise FileNotFoundError(f"object {key}: not in S3 (404)")
            if status != 200:
                raise OSError(f"object {key}: S3 answered {status}: {bytes(body[:200])!r}")
            return body
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def _response(self, conn: socket.socket, key: str,
                  limit: int) -> tuple[int, dict[str, str], bytearray]:
        head = b""
        while b"\r\n\r\n" not in head:
            more = conn.recv(65536)
            if not more or len(head) > 65536:
                raise ConnectionError("S3: connection closed in the response header")
            head += more
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in lines[1:])}
        if "content-length" not in fields:
            raise ConnectionError("S3: response without Content-Length")
        length = int(fields["content-length"])
        if length > max(limit, 65536):
            self._drop()  # the body is not read: the connection is unusable
            raise ValueError(f"object {key}: {length} bytes, over the in-memory limit")
        body = bytearray(length)
        view = memoryview(body)
        got = min(len(rest), length)
        view[:got] = rest[:got]
        while got < length:
            n = conn.recv_into(view[got:])
            if not n:
                raise ConnectionError("S3: connection closed in the response body")
            got += n
        return status, fields, body


def fetcher(s3: Minio, bucket: str, tmpdir: Path, plain_http: bool,
            in_memory: int = IN_MEMORY) -> Callable[[Stored], Blob]:
    """A function fetching one stored instance into a ``Blob``; raises on S3 errors and on an
    object whose size differs from the index's. ``plain_http``: the endpoint is ``http://``
    (``PlainGet`` for objects held in memory)."""
    plain = PlainGet(s3, bucket) if plain_http else None

    def fetch(ref: Stored) -> Blob:
        if 0 < ref.size <= in_memory:
            data = (plain.read(ref.object_key, in_memory) if plain is not None
                    else read_object(s3, bucket, ref.object_key, in_memory))
            if len(data) != ref.size:
                raise OSError(f"object {ref.object_key}: {len(data)} bytes, "
                              f"the index says {ref.size}")
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
