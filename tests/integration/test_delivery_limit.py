"""A message that kills its consumer every time is parked, not redelivered forever.

RELIABILITY ("a poison message ... parked and visible, never dropped and never blocking the
queue") for the case the services' own rejects do not cover: the consumer process dies while
it holds the message (a crash, an OOM kill), so nobody ever rejects it. The broker gets it
back each time; the work queue's delivery limit (``shared/topology.py``) must then move it to
``<queue>.dead``, and the messages behind it must flow again.

Real RabbitMQ, the topology as the services declare it, on a vhost of the test's own; the
consumer is a separate process that SIGKILLs itself when it gets the poison.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from scripts.native import drop_vhost, ensure_rabbitmq, ensure_vhost
from shared import broker, topology

POISON = b"poison"

# A consumer as the services are one: takes one message at a time off the work queue, acks
# what it could handle; on the poison it dies without a word (SIGKILL: no reject, no close).
CONSUMER = """
import asyncio, os, signal, sys
import aio_pika

async def main(url, queue_name):
    conn = await aio_pika.connect(url)
    channel = await conn.channel()
    queue = await channel.get_queue(queue_name, ensure=False)
    while (msg := await queue.get(no_ack=False, fail=False)) is not None:
        if msg.body == b"poison":
            print("poison", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        await msg.ack()
        print("handled", msg.body.decode(), flush=True)
    await conn.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture()
def vhost() -> Iterator[str]:
    ensure_rabbitmq()
    name = f"minipacs_dl_{uuid.uuid4().hex[:8]}"
    ensure_vhost(name)
    yield name
    drop_vhost(name)


def url_of(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


async def _declare_and_publish(url: str, bodies: list[bytes]) -> None:
    conn = await broker.connect(url, 10, name="test-delivery-limit")
    try:
        channel = await conn.channel(publisher_confirms=True)
        exchange, _ = await topology.declare(channel)
        for body in bodies:
            await exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=topology.STORAGE.routing_keys[0])
    finally:
        await conn.close()


async def _take_all(url: str, queue_name: str) -> list[tuple[bytes, dict[str, Any]]]:
    conn = await broker.connect(url, 10, name="test-delivery-limit-dlq")
    out: list[tuple[bytes, dict[str, Any]]] = []
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        while (got := await queue.get(no_ack=False, fail=False)) is not None:
            out.append((got.body, dict(got.headers or {})))
            await got.ack()
    finally:
        await conn.close()
    return out


def test_a_message_that_kills_its_consumer_is_dead_lettered_after_the_delivery_limit(
        vhost: str) -> None:
    url = url_of(vhost)
    spec = topology.STORAGE
    asyncio.run(_declare_and_publish(url, [POISON, b"after-1", b"after-2"]))

    deaths = 0
    handled: list[str] = []
    for _ in range(spec.delivery_limit + 3):  # bounded: a broker that never parks it fails
        run = subprocess.run([sys.executable, "-c", CONSUMER, url, spec.name],
                             capture_output=True, text=True, timeout=60)
        lines = run.stdout.split()
        if run.returncode == -9:
            assert lines == ["poison"], run.stdout + run.stderr
            deaths += 1
            continue
        assert run.returncode == 0, run.stdout + run.stderr
        handled = [line for line in run.stdout.splitlines() if line.startswith("handled")]
        break

    # the broker handed the poison out once, then once per allowed return, then parked it
    assert deaths == spec.delivery_limit + 1
    # and the queue flowed again: the messages behind it were handled, in order
    assert handled == ["handled after-1", "handled after-2"]

    parked = asyncio.run(_take_all(url, spec.dead_letter_queue))
    assert [body for body, _ in parked] == [POISON]  # visible, as published, not dropped
    x_death = [dict(d) for d in parked[0][1].get("x-death") or []]
    assert [(d.get("queue"), d.get("reason")) for d in x_death] == \
        [(spec.name, "delivery_limit")], x_death
    assert asyncio.run(_take_all(url, spec.name)) == []  # nothing left behind in the work queue


def _vhosts() -> set[str]:
    out = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_drop_vhost_removes_it_and_a_missing_one_is_no_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every test stack's teardown drops its vhost: a failure to do so is named on stderr
    (a vhost left behind keeps its queues and messages), a vhost already gone is not one."""
    ensure_rabbitmq()
    name = f"minipacs_drop_{uuid.uuid4().hex[:8]}"
    ensure_vhost(name)
    assert name in _vhosts()
    drop_vhost(name)
    assert name not in _vhosts()
    drop_vhost(name)
    assert capsys.readouterr().err == ""
