"""Broker connection losses: the health tracker (logs, flapping, healthy()), our URL defaults,
the indexer surviving acks on a channel that died, and the cuttable proxy staying a plain pipe
outside a cut (it used to end any connection whose server side was quiet for 5 s)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from aiormq.exceptions import ChannelInvalidStateError
from yarl import URL

from services.indexer import worker as indexer_worker
from services.indexer.store import BatchResult
from services.indexer.worker import IndexerWorker
from shared import broker
from shared.broker import FLAP_LIMIT, FLAP_WINDOW, BrokerHealth, robust_url
from shared.messages import InstanceStored
from shared.settings import IndexerSettings
from tests.proxy import CuttableProxy


class Callbacks:
    def __init__(self) -> None:
        self.items: list[Callable[..., Any]] = []

    def add(self, cb: Callable[..., Any]) -> None:
        self.items.append(cb)

    def __call__(self, *args: Any) -> None:
        for cb in self.items:
            cb(self, *args)


class FakeConnection:
    def __init__(self) -> None:
        self.close_callbacks = Callbacks()
        self.reconnect_callbacks = Callbacks()
        self.is_closed = False
        self.close_called = False


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracked() -> tuple[FakeConnection, BrokerHealth, Clock]:
    conn, clock = FakeConnection(), Clock()
    return conn, BrokerHealth(conn, "test", clock=clock), clock  # type: ignore[arg-type]


def test_loss_and_recovery_are_logged_and_reflected(caplog: pytest.LogCaptureFixture) -> None:
    conn, health, clock = tracked()
    assert health.healthy()
    conn.close_callbacks(ConnectionResetError("reset by peer"))
    assert not health.healthy()
    conn.close_callbacks(ConnectionRefusedError("refused"))  # a failed attempt while down
    assert len(health.losses) == 1
    assert health.last_error == "ConnectionRefusedError: refused"
    clock.now += 2.5
    conn.reconnect_callbacks()
    assert health.healthy()
    text = caplog.text
    assert "RabbitMQ connection lost (ConnectionResetError: reset by peer)" in text
    assert "RabbitMQ connection restored after 2.5s" in text


def test_a_connection_that_keeps_dropping_is_unhealthy(caplog: pytest.LogCaptureFixture) -> None:
    conn, health, clock = tracked()
    for _ in range(FLAP_LIMIT):
        conn.close_callbacks(ConnectionResetError("reset"))
        clock.now += 5
        conn.reconnect_callbacks()
    assert not health.healthy()  # connected right now, but it was lost 3 times in a minute
    assert "keeps dropping" in caplog.text
    clock.now += FLAP_WINDOW
    assert health.healthy()  # quiet for a window: healthy again


def test_closing_it_ourselves_is_not_a_loss(caplog: pytest.LogCaptureFixture) -> None:
    conn, health, _ = tracked()
    conn.close_called = True
    conn.close_callbacks(asyncio.CancelledError())
    assert not health.losses
    assert "lost" not in caplog.text
    assert not health.healthy()


def test_our_heartbeat_and_reconnect_interval_unless_the_url_sets_them() -> None:
    url = URL(robust_url("amqp://guest:guest@127.0.0.1:5672/%2F"))
    assert url.query["heartbeat"] == str(broker.HEARTBEAT)
    assert url.query["reconnect_interval"] == str(broker.RECONNECT_INTERVAL)
    assert url.raw_path == "/%2F"
    own = URL(robust_url("amqp://u:p%40ss@h:5672/v?heartbeat=30"))
    assert own.query["heartbeat"] == "30"
    assert own.password == "p@ss"


# -- the indexer after the broker connection dropped ---------------------------------------

class Channel:
    def __init__(self) -> None:
        self.is_closed = False


class Message:
    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self.acked = False

    @property
    def channel(self) -> Channel:
        if self._channel.is_closed:
            raise ChannelInvalidStateError
        return self._channel

    async def ack(self) -> None:
        self.channel  # noqa: B018 - raises like aio-pika's when the channel is closed
        self.acked = True


class Pool:
    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        yield object()


def stored(n: int) -> InstanceStored:
    return InstanceStored(sop_instance_uid=f"1.2.{n}", sop_class_uid="1.2",
                          study_instance_uid="1", series_instance_uid="1.1",
                          transfer_syntax="1.2.840.10008.1.2.1",
                          object_key=f"instances/aa/{n:064d}.dcm", size=1, sha256=f"{n:064d}",
                          calling_aet="X", received_at="", header={})


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_indexer_goes_on_when_acks_are_lost_with_the_channel(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    written: list[list[str]] = []
    old, new = Channel(), Channel()

    async def write_batch(_conn: object, batch: list[InstanceStored],
                          _overwrite: bool = False) -> BatchResult:
        written.append([m.sop_instance_uid for m in batch])
        old.is_closed = True  # the connection drops while the transaction commits
        return BatchResult(inserted=len(batch))

    monkeypatch.setattr(indexer_worker, "write_batch", write_batch)
    stop = asyncio.Event()
    settings = IndexerSettings(batch_size=2, batch_wait=0.0)
    worker = IndexerWorker(settings, Pool(), stop)  # type: ignore[arg-type]
    first = [Message(old) for _ in range(2)]
    for i, m in enumerate(first):
        worker.pending.append((m, [stored(i)]))  # type: ignore[arg-type]
    held = Message(old)  # still held when its channel dies: redelivered, not written
    worker.pending.append((held, [stored(9)]))  # type: ignore[arg-type]
    runner = asyncio.create_task(worker.run())
    worker.wake.set()
    await until(lambda: not worker.pending and len(written) == 1)
    redelivered = Message(new)
    worker.pending.append((redelivered, [stored(9)]))  # type: ignore[arg-type]
    worker.wake.set()
    await until(lambda: redelivered.acked)
    stop.set()
    await asyncio.wait_for(runner, 5)  # the writer did not die on the lost acks
    assert written == [["1.2.0", "1.2.1"], ["1.2.9"]]
    assert not any(m.acked for m in first) and not held.acked
    assert redelivered.acked
    assert "could not be acked" in caplog.text
    assert "delivered on a closed channel" in caplog.text


async def test_indexer_writes_a_batch_again_whole_after_a_deadlock(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A transaction PostgreSQL rolled back (deadlock, serialization failure) says nothing
    about the data: the same batch is written again whole, not split apart as if one of its
    instances were bad (which could end with good instances dead-lettered)."""
    written: list[list[str]] = []

    async def write_batch(_conn: object, batch: list[InstanceStored],
                          _overwrite: bool = False) -> BatchResult:
        written.append([m.sop_instance_uid for m in batch])
        if len(written) == 1:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return BatchResult(inserted=len(batch))

    monkeypatch.setattr(indexer_worker, "write_batch", write_batch)
    stop = asyncio.Event()
    worker = IndexerWorker(IndexerSettings(batch_size=2, batch_wait=0.0), Pool(),  # type: ignore[arg-type]
                           stop)
    messages = [Message(Channel()) for _ in range(2)]
    for i, m in enumerate(messages):
        worker.pending.append((m, [stored(i)]))  # type: ignore[arg-type]
    runner = asyncio.create_task(worker.run())
    worker.wake.set()
    await until(lambda: all(m.acked for m in messages))
    stop.set()
    await asyncio.wait_for(runner, 5)
    assert written == [["1.2.0", "1.2.1"], ["1.2.0", "1.2.1"]]
    assert "PostgreSQL rolled the batch back (DeadlockDetectedError)" in caplog.text


# -- the proxy --------------------------------------------------------------------------------

def echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(
                lambda: c.recv(1024), b"")], daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_proxy_pipes_stay_open_while_quiet_and_cut_resets_them() -> None:
    server, port = echo_server()
    proxy = CuttableProxy(port).start()
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        # No socket of an established pipe may carry a timeout: a quiet server side would
        # otherwise end the connection (it did, after create_connection's 5 s).
        assert all(s.gettimeout() is None for s in proxy._sockets)
        proxy.cut()
        assert client.recv(16) == b""  # reset / closed
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
        proxy.restore()
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        again.sendall(b"pong")
        assert again.recv(16) == b"pong"
        client.close()
        again.close()
    finally:
        proxy.close()
        server.close()
