"""The C-STORE sub-operations of one move job: instances from S3 to the destination node.

Synchronous (pynetdicom is), run in worker threads by ``worker.py``. Each instance goes out
byte-for-byte as stored: its object is streamed from S3 to a temp file and sent with
pynetdicom's chunked sending, under a presentation context of its own stored SOP class and
transfer syntax (no conversion). Several associations to the destination run in parallel.
Memory stays bounded whatever the instance size.
"""

from __future__ import annotations

import logging
import queue
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from minio import Minio
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association

from shared.s3 import download_to
from shared.settings import MoverSettings

log = logging.getLogger("minipacs.mover")

MAX_CONTEXTS = 128  # presentation contexts in one A-ASSOCIATE-RQ (PS3.8: odd IDs 1..255)
_WARNING = frozenset({0x0001, 0x0107, 0x0116})


class Ref(Protocol):
    """What the sender needs of an instance (``shared.query.InstanceRef`` has it)."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def transfer_syntax(self) -> str: ...
    @property
    def object_key(self) -> str: ...


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int


def classify(status: int | None) -> str:
    """A C-STORE response status -> "completed", "warning" or "failed" (PS3.4 C.4.2.1.4)."""
    if status is None:
        return "failed"
    if status == 0x0000:
        return "completed"
    if status in _WARNING or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failed"


def plan_contexts(refs: Sequence[Ref]) -> list[list[Ref]]:
    """Split ``refs`` (keeping their order) into groups whose distinct (SOP class, transfer
    syntax) pairs fit in one association request."""
    groups: list[list[Ref]] = []
    seen: list[set[tuple[str, str]]] = []
    index: dict[tuple[str, str], int] = {}
    for ref in refs:
        pair = (ref.sop_class_uid, ref.transfer_syntax)
        if pair not in index:
            if not groups or len(seen[-1]) >= MAX_CONTEXTS:
                groups.append([])
                seen.append(set())
            index[pair] = len(groups) - 1
            seen[-1].add(pair)
        groups[index[pair]].append(ref)
    return groups


@dataclass
class Tally:
    """Sub-operation counts, shared by the sending threads; ``on_change`` is called (from a
    sending thread) after each update."""

    remaining: int
    on_change: Callable[[], None] = lambda: None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, uid: str, outcome: str) -> None:
        with self._lock:
            self.remaining -= 1
            if outcome == "completed":
                self.completed += 1
            elif outcome == "warning":
                self.warning += 1
            else:
                self.failed += 1
                self.failed_uids.append(uid)
        self.on_change()

    def snapshot(self) -> tuple[int, int, int, int, list[str]]:
        with self._lock:
            return (self.remaining, self.completed, self.failed, self.warning,
                    list(self.failed_uids))


class DestinationRefused(RuntimeError):
    """The destination did not accept (or could not be reached for) an association."""


class Sender:
    def __init__(self, settings: MoverSettings, s3: Minio, destination: Destination,
                 tally: Tally, cancelled: threading.Event, originator_aet: str = "",
                 originator_message_id: int = 0) -> None:
        self.settings = settings
        self.s3 = s3
        self.destination = destination
        self.tally = tally
        self.cancelled = cancelled
        self.originator_aet = originator_aet or None
        self.originator_id = originator_message_id or None
        self.tmpdir = Path(tempfile.gettempdir())
        _config.STORE_SEND_CHUNKED_DATASET = True  # send files from disk, never whole in RAM
        self.ae = AE(ae_title=settings.gateway_aet)
        self.ae.acse_timeout = settings.acse_timeout
        self.ae.dimse_timeout = settings.dimse_timeout
        self.ae.network_timeout = settings.network_timeout

    def run(self, refs: Sequence[Ref]) -> str:
        """Send ``refs``; returns "" or the reason the job failed as a whole (destination
        unreachable). Every instance ends up in the tally, or stays remaining on cancel."""
        groups = plan_contexts(refs)
        for n, group in enumerate(groups):
            if self.cancelled.is_set():
                return ""
            try:
                self._send_group(group)
            except DestinationRefused as exc:
                for rest in groups[n:]:
                    for ref in rest:
                        self.tally.record(ref.sop_instance_uid, "failed")
                return str(exc)
        return ""

    # -- one group of instances over up to ``associations`` parallel associations ---------
    def _send_group(self, group: list[Ref]) -> None:
        contexts = sorted({(r.sop_class_uid, r.transfer_syntax) for r in group})
        work: queue.SimpleQueue[Ref] = queue.SimpleQueue()
        for ref in group:
            work.put(ref)
        first = self._associate(contexts)  # raises DestinationRefused: nothing was sent
        extra = max(0, min(self.settings.associations, len(group)) - 1)
        threads = [threading.Thread(target=self._drain, args=(work, contexts, None),
                                    name=f"mover-send-{i}", daemon=True) for i in range(extra)]
        for t in threads:
            t.start()
        self._drain(work, contexts, first)
        for t in threads:
            t.join()
        # Every sending thread gave up (association lost twice): what is left failed.
        if not self.cancelled.is_set():
            while True:
                try:
                    ref = work.get_nowait()
                except queue.Empty:
                    break
                self.tally.record(ref.sop_instance_uid, "failed")

    def _associate(self, contexts: list[tuple[str, str]]) -> Association:
        d = self.destination
        cxs = [build_context(sop_class, [ts]) for sop_class, ts in contexts]
        try:
            assoc = self.ae.associate(d.host, d.port, contexts=cxs, ae_title=d.aet,
                                      max_pdu=self.settings.max_pdu)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DestinationRefused(f"cannot associate with {d.aet}@{d.host}:{d.port}: "
                                     f"{exc}") from exc
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else (
                "aborted the association" if assoc.is_aborted else "is not reachable")
            raise DestinationRefused(f"{d.aet}@{d.host}:{d.port} {why}")
        raw = getattr(assoc.dul.socket, "socket", None)
        if isinstance(raw, socket.socket):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc

    def _drain(self, work: queue.SimpleQueue[Ref], contexts: list[tuple[str, str]],
               assoc: Association | None) -> None:
        retried = False
        try:
            if assoc is None:
                try:
                    assoc = self._associate(contexts)
                except DestinationRefused as exc:
                    log.warning("extra association not opened: %s", exc)
                    return
            msg_id = 0
            while not self.cancelled.is_set():
                try:
                    ref = work.get_nowait()
                except queue.Empty:
                    return
                if not assoc.is_established:
                    if retried:
                        work.put(ref)
                        return
                    retried = True
                    try:
                        assoc = self._associate(contexts)
                    except DestinationRefused:
                        work.put(ref)
                        return
                msg_id = msg_id % 65535 + 1
                self.tally.record(ref.sop_instance_uid, classify(self._store(assoc, ref, msg_id)))
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()

    def _store(self, assoc: Association, ref: Ref, msg_id: int) -> int | None:
        try:
            with tempfile.NamedTemporaryFile(dir=self.tmpdir, prefix="mover-",
                                             suffix=".dcm") as tmp:
                download_to(self.s3, self.settings.s3_bucket, ref.object_key, tmp)
                status = assoc.send_c_store(Path(tmp.name), msg_id=msg_id,
                                            originator_aet=self.originator_aet,
                                            originator_id=self.originator_id)
        except Exception as exc:  # S3 error, no accepted context, aborted association
            log.warning("C-STORE of one instance to %s failed: %s: %s", self.destination.aet,
                        type(exc).__name__, exc)
            return None
        value = getattr(status, "Status", None)
        return int(value) if value is not None else None
