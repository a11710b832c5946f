"""The C-STORE sub-operations of one move job: instances from S3 to the destination node.

Synchronous, run in worker threads by ``worker.py``. Each instance goes out byte-for-byte as
stored (its dataset after the file's meta group), under a presentation context of its own
stored SOP class and transfer syntax (or, for a destination that takes only the other of
explicit / implicit VR little endian, converted to it: ``scu.offered``), on associations of our own
(``scu.StoreAssociation``: no pynetdicom reactor threads). Several associations to the
destination run in parallel, sharing one ``Prefetcher`` that GETs the next objects from S3
while they send. Memory stays bounded whatever the instance size (``shared.prefetch``): an
instance over 4 MiB not in the hot cache waits for its C-STORE in a temp file under ``tmpdir``,
this mover process's scratch folder (``<spool>/move/<random>/``, ``app.py``), which the
next mover to start removes if this one is killed mid-job.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from minio import Minio

from services.mover.scu import Refused, StoreAssociation, Timeouts, offered
from shared.cache import hot_cache
from shared.prefetch import Fetched, Prefetcher, fetcher
from shared.s3http import RawS3
from shared.settings import MoverSettings
from shared.suboperations import Tally, classify

log = logging.getLogger("minipacs.mover")

MAX_CONTEXTS = 128  # presentation contexts in one A-ASSOCIATE-RQ (PS3.8: odd IDs 1..255)


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
    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int


def plan_contexts(refs: Sequence[Ref]) -> list[list[Ref]]:
    """Split ``refs`` (keeping their order) into groups whose distinct (SOP class, transfer
    syntax) pairs fit in one association request (a pair takes one presentation context per
    syntax it is offered in, ``scu.offered``: two for a little endian one, three for a
    compressed or deflated one)."""
    groups: list[list[Ref]] = []
    used: list[int] = []  # presentation contexts each group's association proposes
    index: dict[tuple[str, str], int] = {}
    for ref in refs:
        pair = (ref.sop_class_uid, ref.transfer_syntax)
        if pair not in index:
            cost = len(offered(ref.transfer_syntax))
            if not groups or used[-1] + cost > MAX_CONTEXTS:
                groups.append([])
                used.append(0)
            index[pair] = len(groups) - 1
            used[-1] += cost
        groups[index[pair]].append(ref)
    return groups


class DestinationRefused(RuntimeError):
    """The destination did not accept (or could not be reached for) an association."""


class Sender:
    def __init__(self, settings: MoverSettings, s3: Minio, destination: Destination,
                 tally: Tally, cancelled: threading.Event, tmpdir: Path,
                 originator_aet: str = "", originator_message_id: int = 0,
                 prefetch_threads: int = 3, stopping: threading.Event | None = None) -> None:
        self.settings = settings
        self.destination = destination
        self.tally = tally
        self.cancelled = cancelled  # a C-CANCEL
        self.stopping = stopping or threading.Event()  # the mover hands its jobs back
        self.originator_aet = originator_aet
        self.originator_id = originator_message_id or None
        self.fetch = fetcher(s3, settings.s3_bucket, tmpdir,
                             RawS3.from_settings(settings),
                             cache=hot_cache(settings.spool_dir, settings.cache_mb))
        self.prefetch_threads = prefetch_threads
        self.timeouts = Timeouts(settings.acse_timeout, settings.dimse_timeout,
                                 settings.network_timeout)

    def run(self, refs: Sequence[Ref]) -> str:
        """Send ``refs``; returns "" or the reason the job failed as a whole (destination
        unreachable). Every instance ends up in the tally, or stays remaining when ``cancelled``
        or ``stopping`` stops it between two instances."""
        groups = plan_contexts(refs)
        for n, group in enumerate(groups):
            if self.halted():
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
        first = self._associate(contexts)  # raises DestinationRefused: nothing was sent
        parallel = max(1, min(self.settings.associations, len(group)))
        # handed back by a sending thread whose association could not be re-opened
        orphans: queue.SimpleQueue[Fetched[Ref]] = queue.SimpleQueue()
        with Prefetcher(group, self.fetch, self.prefetch_threads, 2 * parallel) as work:
            threads = [threading.Thread(target=self._drain,
                                        args=(work, orphans, contexts, None),
                                        name=f"mover-send-{i}", daemon=True)
                       for i in range(parallel - 1)]
            for t in threads:
                t.start()
            self._drain(work, orphans, contexts, first)
            for t in threads:
                t.join()
            left = work.give_back()
        # Every sending thread gave up (association lost twice): what is left failed.
        while not orphans.empty():
            item = orphans.get()
            if item.blob is not None:
                item.blob.close()
            if not self.halted():
                self.tally.record(item.ref.sop_instance_uid, "failed")
        if not self.halted():
            for ref in left:
                self.tally.record(ref.sop_instance_uid, "failed")

    def halted(self) -> bool:
        """Cancelled, or the mover is stopping: no more instances are sent."""
        return self.cancelled.is_set() or self.stopping.is_set()

    def _associate(self, contexts: list[tuple[str, str]]) -> StoreAssociation:
        d = self.destination
        try:
            return StoreAssociation.open(d.host, d.port, self.settings.gateway_aet, d.aet,
                                         contexts, self.settings.max_pdu, self.timeouts)
        except Refused as exc:
            raise DestinationRefused(f"{d.aet}@{d.host}:{d.port} {exc}") from exc

    def _drain(self, work: Prefetcher[Ref], orphans: queue.SimpleQueue[Fetched[Ref]],
               contexts: list[tuple[str, str]], assoc: StoreAssociation | None) -> None:
        retried = False
        item: Fetched[Ref] | None = None
        try:
            if assoc is None:
                try:
                    assoc = self._associate(contexts)
                except DestinationRefused as exc:
                    log.warning("extra association not opened: %s", exc)
                    return
            msg_id = 0
            while not self.halted():
                item = _take(orphans) or work.next()
                if item is None:
                    return
                if item.blob is None:
                    log.warning("instance not read from S3 for %s: %s: %s",
                                self.destination.aet, type(item.error).__name__, item.error)
                    self.tally.record(item.ref.sop_instance_uid, "failed")
                    item = None
                    continue
                if not assoc.alive:
                    if retried:
                        return
                    retried = True
                    try:
                        assoc = self._associate(contexts)
                    except DestinationRefused:
                        return
                msg_id = msg_id % 65535 + 1
                status = self._store(assoc, item, msg_id)
                item.blob.close()
                self.tally.record(item.ref.sop_instance_uid, classify(status))
                item = None
        finally:
            if item is not None:
                orphans.put(item)
            if assoc is not None:
                assoc.release()

    def _store(self, assoc: StoreAssociation, item: Fetched[Ref], msg_id: int) -> int | None:
        ref, blob = item.ref, item.blob
        assert blob is not None
        try:
            return assoc.store(msg_id, ref.sop_class_uid, ref.sop_instance_uid,
                               ref.transfer_syntax, blob, self.originator_aet,
                               self.originator_id)
        except (OSError, LookupError) as exc:  # aborted association, no accepted context
            log.warning("C-STORE of one instance to %s failed: %s: %s", self.destination.aet,
                        type(exc).__name__, exc)
            return None


def _take(orphans: queue.SimpleQueue[Fetched[Ref]]) -> Fetched[Ref] | None:
    try:
        return orphans.get_nowait()
    except queue.Empty:
        return None
