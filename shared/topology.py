"""The one place that declares exchanges, queues, bindings, dead-lettering and delivery limits.

Every work queue is a durable quorum queue with a delivery limit; a message that fails that
many times (or is rejected as unreadable) is dead-lettered to ``<queue>.dead``, a durable
queue that the RabbitMQ management dashboard shows with its depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

EXCHANGE = "minipacs"
DEAD_LETTER_EXCHANGE = "minipacs.dead"


@dataclass(frozen=True)
class QueueSpec:
    name: str
    routing_keys: tuple[str, ...]
    delivery_limit: int = 5

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.name}.dead"

    def arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": self.name,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


STORAGE = QueueSpec("storage.instances", ("instance.received",))
INDEXER = QueueSpec("indexer.instances", ("instance.stored",))
MOVER = QueueSpec("mover.jobs", ("move.requested",), delivery_limit=3)
COMMITMENTS = QueueSpec("mover.commitments", ("commitment.requested",))
QUEUES: tuple[QueueSpec, ...] = (STORAGE, INDEXER, MOVER, COMMITMENTS)

# Per-process notifications, each to a server-named exclusive queue (see ``declare_listener``).
MOVE_PROGRESS = "move.progress"  # mover -> the gateway relaying pending C-MOVE responses
MOVE_CANCEL = "move.cancel"      # gateway / api -> every mover


async def declare(channel: AbstractChannel) -> tuple[AbstractExchange, dict[str, AbstractQueue]]:
    """Declare the whole topology (idempotent). Returns the main exchange and queues by name."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queues: dict[str, AbstractQueue] = {}
    for spec in QUEUES:
        dlq = await channel.declare_queue(
            spec.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dead, routing_key=spec.name)
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments())
        for key in spec.routing_keys:
            await queue.bind(exchange, routing_key=key)
        queues[spec.name] = queue
    return exchange, queues


async def declare_listener(channel: AbstractChannel, routing_key: str) -> AbstractQueue:
    """A server-named, exclusive, auto-delete queue bound to ``routing_key`` on the main
    exchange, for notifications that only matter to a running process (move progress, cancel
    requests). It goes away with its connection; nothing in it needs to outlive the process."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=routing_key)
    return queue
