"""The storage consumer. Order per message (each step idempotent, so redelivery is safe):

1. the spool file behind the message -> S3 under its content hash (large ones: skipped if
   already there; small ones are simply put again, same key, same bytes)
2. verify size and SHA-256, read the header as DICOM JSON
3. publish ``instance.stored`` and wait for the broker's confirm (events of instances that
   finish together share one message: ``batch.py``)
4. move the spool file into the hot cache (``shared/cache.py``) or remove it, then ack

A redelivery after step 4 finds no spool file but the verified object: step 3 was already
confirmed, so it only acks. Transient failures (S3 or broker down) are retried in place with
backoff, so they don't use up the queue's delivery limit; unreadable messages and lost spool
files are dead-lettered.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from aio_pika.abc import AbstractIncomingMessage
from minio import Minio

from services.storage.batch import StoredBatcher
from shared import crash, s3
from shared.broker import Publisher, PublishFailed, delivered_on_live_channel, settle
from shared.cache import HotCache, hot_cache
from shared.dicom import InvalidInstance, header_json
from shared.ingest import recover
from shared.keys import object_key
from shared.messages import BadMessage, InstanceReceived, InstanceStored, read_batch
from shared.s3http import RawS3
from shared.settings import StorageSettings
from shared.spool import Spool

log = logging.getLogger("minipacs.storage")


# Below this size a duplicate is cheaper to upload again (same key, same bytes) than every new
# instance is to check for first with a HEAD request; above it, check first.
PRECHECK_MIN_SIZE = 4 * 1024 * 1024
# Files up to this size are read into memory once, for both the upload and the header (bounded:
# ``concurrency`` of them at a time); larger ones are streamed.
IN_MEMORY_MAX = 4 * 1024 * 1024


class Permanent(Exception):
    """This message can never succeed: dead-letter it."""


def unconfirmed_age(settings: StorageSettings) -> float:
    """How old a ``.pending`` marker must be before the sweeper announces its file again:
    ``unconfirmed_after``, and well past any confirm a live gateway may still be waiting for
    (after ``confirm_timeout`` it stops waiting and leaves the file as it is)."""
    return max(settings.unconfirmed_after, 2 * settings.confirm_timeout)


@dataclass
class StorageWorker:
    settings: StorageSettings
    spool: Spool
    s3: Minio
    publisher: Publisher
    stop: asyncio.Event
    batcher: StoredBatcher = field(init=False)
    raw: RawS3 | None = field(init=False)  # PUTs without the minio client (http:// endpoints)
    cache: HotCache = field(init=False)
    stored_count: int = 0
    stored_bytes: int = 0

    def __post_init__(self) -> None:
        self.raw = RawS3.from_settings(self.settings)
        self.cache = hot_cache(self.settings.spool_dir, self.settings.cache_mb)
        self.crash = crash.parse(self.settings.crash_at)
        self.batcher = StoredBatcher(
            lambda body: self.publisher.publish_body(body, InstanceStored.routing_key),
            self.settings.announce_batch, self.settings.stored_linger_ms / 1000)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """One ``instance.received`` message: one event, or a batch from the gateway. Its
        events are stored side by side; the message is acked when all are stored, dead-lettered
        if one can never be (replaying it is idempotent: the others are found stored)."""
        crash.reached(self.crash, "storage.taken")
        try:
            events = read_batch(InstanceReceived, message.body)
            keys = [object_key(event.sha256) for event in events]
        except (BadMessage, ValueError) as exc:
            log.error("dead-lettering unreadable message %s: %s", message.message_id, exc)
            await settle(message, "reject")
            return
        outcomes = await asyncio.gather(*(self.handle_event(message, event, key)
                                          for event, key in zip(events, keys, strict=True)))
        if "requeue" in outcomes:
            await settle(message, "requeue")
        elif "permanent" in outcomes:
            await settle(message, "reject")
        else:
            crash.reached(self.crash, "storage.announced")
            if not await settle(message, "ack"):
                log.warning("%d instance(s) stored, but the ack was lost with the broker "
                            "connection: the redelivery will find them stored", len(events))
            crash.reached(self.crash, "storage.acked")

    async def handle_event(self, message: AbstractIncomingMessage, received: InstanceReceived,
                           key: str) -> str:
        """"stored", "permanent" (dead-letter) or "requeue" (stopping, or the connection that
        delivered it is gone). Transient failures are retried here, with backoff."""
        delay = 0.5
        while True:
            try:
                await self.store(received, key)
            except Permanent as exc:
                log.error("dead-lettering obj=%s from %s: %s", received.sha256[:12],
                          received.calling_aet, exc)
                return "permanent"
            except Exception as exc:
                if self.stop.is_set() or not delivered_on_live_channel(message):
                    return "requeue"
                log.warning("obj=%s not stored yet (%s: %s); retrying in %.1fs",
                            received.sha256[:12], type(exc).__name__, exc, delay)
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 10.0)
                continue
            return "stored"

    async def store(self, received: InstanceReceived, key: str) -> None:
        started = time.perf_counter()
        bucket = self.settings.s3_bucket
        path = self.spool.path_of(received.spool_name)
        existing: int | None = None
        if path is None or received.size >= PRECHECK_MIN_SIZE:
            existing = await asyncio.to_thread(s3.stored_size, self.s3, bucket, key,
                                               received.sha256)
        if path is None:
            if existing == received.size:
                log.info("obj=%s already stored and announced (redelivery)", received.sha256[:12])
                return
            raise Permanent("spool file is gone and the object is not in S3")
        header = await asyncio.to_thread(self._put_and_read_header, path, key, received,
                                         existing != received.size)
        crash.reached(self.crash, "storage.uploaded")
        await self.batcher.announce(received.stored(key, header))
        if not self.cache.adopt(path, key, received.size):
            self.spool.remove(received.spool_name)
        self.stored_count += 1
        self.stored_bytes += received.size
        log.debug("obj=%s stored %d bytes%s (%.1f ms)", received.sha256[:12], received.size,
                 "" if existing != received.size else " (already in S3)",
                 (time.perf_counter() - started) * 1000)

    def _put_and_read_header(self, path: Path, key: str, received: InstanceReceived,
                             upload: bool) -> dict[str, Any]:
        """The upload (unless the object is already there) and the header, in one worker-thread
        hop. A file up to ``IN_MEMORY_MAX`` is read once and both use those bytes."""
        if received.size <= IN_MEMORY_MAX:
            data = path.read_bytes()
            if upload:
                self._put(io.BytesIO(data), key, received)
            source: Path | BinaryIO = io.BytesIO(data)
        else:
            if upload:
                with path.open("rb") as fp:
                    self._put(fp, key, received)
            source = path
        try:
            return header_json(source)
        except Exception as exc:
            raise Permanent(f"header unreadable: {type(exc).__name__}") from exc

    def _put(self, fp: BinaryIO, key: str, received: InstanceReceived) -> None:
        try:
            s3.put_verified(self.s3, self.settings.s3_bucket, key, fp, received.size,
                            received.sha256, self.settings.part_size, self.raw)
        except s3.VerifyFailed as exc:
            raise Permanent(str(exc)) from exc

    async def report_forever(self, every: float = 10.0) -> None:
        """One INFO line per ``every`` seconds with work done (per instance: DEBUG; the gateway
        already logs each received instance at INFO)."""
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), every)
            except TimeoutError:
                pass
            if self.stored_count:
                log.info("stored %d instances (%.1f MB) in the last %.0f s", self.stored_count,
                         self.stored_bytes / 1e6, every)
                self.stored_count = self.stored_bytes = 0

    async def recover_unconfirmed(self) -> int:
        """Re-announce the ready files whose publish the broker never answered (the gateway
        stopped, or got no confirm in time: ``shared/spool.py``). Returns how many were
        announced."""
        announced = 0
        age = unconfirmed_age(self.settings)
        for item in await asyncio.to_thread(self.spool.unconfirmed, age):
            try:
                message = await asyncio.to_thread(recover, self.spool, item)
            except InvalidInstance as exc:
                # checked by the gateway before it was spooled: the disk changed it since
                log.error("unconfirmed spool file %s no longer reads as a DICOM instance "
                          "(%s): moved to rejected/", item.name, exc.reason)
                self.spool.reject(item.name)
                self.spool.settle(item.marker)
                continue
            try:
                await self.publisher.publish(message)
            except PublishFailed as exc:
                log.warning("unconfirmed spool file %s not announced yet (%s); the next sweep "
                            "tries again", item.name, exc)
                break
            self.spool.settle(item.marker)
            announced += 1
            log.warning("spool file %s (obj=%s): its publish was never confirmed (the gateway "
                        "stopped, or got no answer): announced again", item.name,
                        message.sha256[:12])
        return announced

    async def sweep_forever(self) -> None:
        """Every minute, or every ``sweep_after`` / ``unconfirmed_after`` seconds if shorter:
        remove abandoned staging files, re-announce unconfirmed ready files, trim the hot
        cache."""
        every = max(1.0, min(60.0, self.settings.sweep_after, self.settings.unconfirmed_after))
        while not self.stop.is_set():
            try:
                removed = await asyncio.to_thread(self.spool.sweep, self.settings.sweep_after)
                if removed:
                    log.info("spool sweeper removed %d abandoned files", removed)
                await self.recover_unconfirmed()
                evicted = await asyncio.to_thread(self.cache.trim)
                if evicted:
                    log.info("hot cache: evicted %d files", evicted)
            except Exception:  # the next round tries again; a dead sweeper would be silent
                log.exception("spool sweeper / cache trim failed; trying again in %.0f s", every)
            try:
                await asyncio.wait_for(self.stop.wait(), every)
            except TimeoutError:
                pass
