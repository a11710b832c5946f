"""Batched instance events: the message format, the gateway's group commit of
``instance.received``, storage's batcher of ``instance.stored`` and the indexer's handling of a
batch with one instance the index refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast

import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from services.gateway.announce import LINGER_UP_TO, OnTheWay, ReceivedAnnouncer
from services.indexer import worker as indexer_worker
from services.indexer.store import BatchResult
from services.indexer.worker import IndexerWorker
from services.storage.batch import StoredBatcher
from shared.broker import PublishFailed
from shared.messages import BadMessage, InstanceReceived, InstanceStored, batch_body, read_batch
from shared.settings import IndexerSettings


def event(n: int) -> InstanceStored:
    return InstanceStored(sop_instance_uid=f"1.2.{n}", sop_class_uid="1.2",
                          study_instance_uid="1", series_instance_uid="1.1",
                          transfer_syntax="1.2.840.10008.1.2.1",
                          object_key=f"instances/aa/{n:064d}.dcm", size=n, sha256=f"{n:064d}",
                          header={"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Ä^B"}]}})


def test_single_and_batched_bodies_read_back() -> None:
    assert read_batch(InstanceStored, event(1).to_bytes()) == [event(1)]
    assert read_batch(InstanceStored, batch_body([event(1), event(2)])) == [event(1), event(2)]


@pytest.mark.parametrize("body", [
    b"not json", b'{"v": 2, "instances": []}', b'{"v": 1, "instances": []}',
    b'{"v": 1, "instances": {}}', b'{"v": 1, "instances": [1]}',
    json.dumps({"v": 1, "instances": [event(1).to_dict()], "x": 1}).encode(),
    json.dumps({"v": 1, "instances": [{"sop_instance_uid": "1"}]}).encode(),
])
def test_bad_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(BadMessage):
        read_batch(InstanceStored, body)


async def test_events_finishing_together_share_one_message() -> None:
    sent: list[bytes] = []

    async def send(body: bytes) -> None:
        sent.append(body)

    batcher = StoredBatcher(send, max_events=32, linger=0.01)
    await asyncio.gather(*(batcher.announce(event(n)) for n in range(5)))
    assert [len(read_batch(InstanceStored, b)) for b in sent] == [5]
    await batcher.announce(event(9))  # alone: the plain one-event message
    assert json.loads(sent[-1])["sop_instance_uid"] == "1.2.9"


async def test_a_full_batch_goes_at_once_and_failures_reach_every_caller() -> None:
    sent: list[int] = []

    async def send(body: bytes) -> None:
        sent.append(len(read_batch(InstanceStored, body)))
        if len(sent) == 2:
            raise RuntimeError("no confirm")

    batcher = StoredBatcher(send, max_events=3, linger=60)  # only the size can trigger
    await asyncio.wait_for(asyncio.gather(*(batcher.announce(event(n)) for n in range(3))), 5)
    results = await asyncio.wait_for(asyncio.gather(
        *(batcher.announce(event(n)) for n in range(3, 6)), return_exceptions=True), 5)
    assert sent == [3, 3]
    assert all(isinstance(r, RuntimeError) for r in results)


class Message:
    def __init__(self) -> None:
        self.acked = self.rejected = False

    @property
    def channel(self) -> Message:
        return self

    is_closed = False

    async def ack(self) -> None:
        self.acked = True

    async def reject(self, requeue: bool = False) -> None:
        self.rejected = True


class Pool:
    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield object()


async def test_one_refused_instance_dead_letters_its_message_not_its_neighbours(
        monkeypatch: pytest.MonkeyPatch) -> None:
    indexed: set[str] = set()

    async def write_batch(_conn: object, batch: list[InstanceStored],
                          _overwrite: bool = False) -> BatchResult:
        if any(e.sop_instance_uid == "1.2.3" for e in batch):
            raise asyncpg.exceptions.CharacterNotInRepertoireError("0x00")
        indexed.update(e.sop_instance_uid for e in batch)
        return BatchResult(inserted=len(batch))

    monkeypatch.setattr(indexer_worker, "write_batch", write_batch)
    worker = IndexerWorker(IndexerSettings(batch_size=4, batch_wait=0.0), Pool(),  # type: ignore[arg-type]
                           asyncio.Event())
    poisoned, clean, single = Message(), Message(), Message()
    # stand-ins for the worker's incoming messages
    poisoned_in = cast(AbstractIncomingMessage, poisoned)
    clean_in = cast(AbstractIncomingMessage, clean)
    single_in = cast(AbstractIncomingMessage, single)
    worker.pending += [(poisoned_in, [event(1), event(2), event(3)]),
                       (clean_in, [event(4)]), (single_in, [event(5)])]
    assert [len(e) for _, e in worker.take_batch()] == [3, 1]  # whole messages, <= 4 events
    worker.pending[:0] = [(poisoned_in, [event(1), event(2), event(3)]),
                          (clean_in, [event(4)])]
    worker.stop.set()
    await asyncio.wait_for(worker.run(), 5)
    assert indexed == {"1.2.1", "1.2.2", "1.2.4", "1.2.5"}
    assert poisoned.rejected and not poisoned.acked
    assert clean.acked and single.acked


# -- the gateway's group commit of instance.received ------------------------------------------

def received(n: int) -> InstanceReceived:
    return InstanceReceived(sop_instance_uid=f"1.2.{n}", sop_class_uid="1.2",
                            study_instance_uid="1", series_instance_uid="1.1",
                            transfer_syntax="1.2.840.10008.1.2.1", size=n,
                            sha256=f"{n:064d}", spool_name=f"{n}.dcm")


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def test_events_arriving_during_a_confirm_go_together() -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    sent: list[list[str]] = []

    async def send(body: bytes) -> None:
        sent.append([e.sop_instance_uid for e in read_batch(InstanceReceived, body)])
        if len(sent) == 1:
            await gate.wait()  # the first confirm takes a while

    announcer = ReceivedAnnouncer(loop, send, max_events=16, timeout=10)
    first = asyncio.create_task(asyncio.to_thread(announcer.announce, received(0)))
    await until(lambda: bool(sent))
    others = [asyncio.create_task(asyncio.to_thread(announcer.announce, received(n)))
              for n in (1, 2, 3)]
    await until(lambda: len(announcer._pending) == 3)  # all waiting behind the first confirm
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, *others), 5)
    assert sent[0] == ["1.2.0"]
    assert sorted(sent[1]) == ["1.2.1", "1.2.2", "1.2.3"] and len(sent) == 2


async def test_a_failed_publish_fails_every_caller_of_its_message() -> None:
    async def send(body: bytes) -> None:
        raise ConnectionError("broker gone")

    announcer = ReceivedAnnouncer(asyncio.get_running_loop(), send, max_events=16, timeout=5)
    with pytest.raises(PublishFailed, match="broker gone"):
        await asyncio.to_thread(announcer.announce, received(1))


def recorder() -> tuple[list[list[str]], Callable[[bytes], Awaitable[None]]]:
    """A ``send`` that records the SOP Instance UIDs of each message, and its record."""
    sent: list[list[str]] = []

    async def send(body: bytes) -> None:
        sent.append([e.sop_instance_uid for e in read_batch(InstanceReceived, body)])

    return sent, send


def on_a_thread(*steps: Callable[[], object]) -> None:
    """Run ``steps`` in order on one new thread (OnTheWay counts per thread), and wait."""
    thread = threading.Thread(target=lambda: [step() for step in steps])
    thread.start()
    thread.join(5)


def test_on_the_way_counts_each_thread_once() -> None:
    way = OnTheWay()
    on_a_thread(way.begin, way.begin)
    assert way.count == 1
    assert way.end() is False and way.count == 1  # this thread began nothing
    on_a_thread(way.begin, way.end, way.end)
    assert way.count == 1


async def test_an_event_waits_for_the_c_stores_on_their_way_and_goes_with_them() -> None:
    sent, send = recorder()
    way = OnTheWay()
    announcer = ReceivedAnnouncer(asyncio.get_running_loop(), send, max_events=16, timeout=60,
                                  linger=30, on_the_way=way)
    began, go = threading.Event(), threading.Event()

    def second_association() -> None:  # receiving its C-STORE while the first announces
        way.begin()
        began.set()
        go.wait(5)
        announcer.announce(received(2))

    other = asyncio.create_task(asyncio.to_thread(second_association))
    await asyncio.to_thread(began.wait, 5)
    first = asyncio.create_task(asyncio.to_thread(announcer.announce, received(1)))
    await until(lambda: len(announcer._pending) == 1 or bool(sent))
    go.set()
    await asyncio.wait_for(asyncio.gather(first, other), 5)  # long before the 30 s linger
    assert sent == [["1.2.1", "1.2.2"]]
    assert way.count == 0


@pytest.mark.parametrize(("steps", "linger", "size"), [
    pytest.param(("begin",), 0.05, 1, id="a C-STORE that never arrives: the linger ends it"),
    pytest.param(("begin", "end"), 30, 1, id="a C-STORE that ended short holds nobody"),
    pytest.param(("begin",), 30, LINGER_UP_TO + 1, id="a large instance does not wait"),
])
async def test_an_event_goes_alone_when_no_company_is_coming(steps: tuple[str, ...],
                                                             linger: float, size: int) -> None:
    sent, send = recorder()
    way = OnTheWay()
    on_a_thread(*(getattr(way, step) for step in steps))  # another association's C-STORE
    announcer = ReceivedAnnouncer(asyncio.get_running_loop(), send, max_events=16, timeout=60,
                                  linger=linger, on_the_way=way)
    event = dataclasses.replace(received(1), size=size)
    await asyncio.wait_for(asyncio.to_thread(announcer.announce, event), 5)  # not 30 s
    assert sent == [["1.2.1"]]


def test_received_batches_read_back() -> None:
    assert read_batch(InstanceReceived, batch_body([received(1), received(2)])) == \
        [received(1), received(2)]
