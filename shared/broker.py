"""RabbitMQ connection and confirmed publishing (publisher confirms + mandatory routing)."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from shared import topology
from shared.lifecycle import retry_until
from shared.messages import _Message

log = logging.getLogger("minipacs.broker")


class PublishFailed(RuntimeError):
    """The broker did not confirm the message in time (or returned it as unroutable)."""


async def connect(url: str, timeout: float) -> AbstractRobustConnection:  # noqa: ASYNC109
    async def attempt() -> AbstractRobustConnection:
        return await aio_pika.connect_robust(url, timeout=5, client_properties={
            "connection_name": "minipacs"})

    return await retry_until("RabbitMQ", attempt, timeout)


class Publisher:
    """Publishes persistent messages and returns only once the broker has confirmed them."""

    def __init__(self, connection: AbstractRobustConnection, confirm_timeout: float) -> None:
        self._connection = connection
        self._timeout = confirm_timeout
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def open(self) -> None:
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchange, _ = await topology.declare(self._channel)

    @property
    def ready(self) -> bool:
        return (
            self._channel is not None
            and not self._channel.is_closed
            and not self._connection.is_closed
        )

    async def publish(self, message: _Message, headers: dict[str, str] | None = None) -> None:
        if self._exchange is None:
            raise PublishFailed("publisher is not open")
        amqp = aio_pika.Message(
            message.to_bytes(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            headers=headers or {},  # type: ignore[arg-type]
        )
        try:
            await asyncio.wait_for(
                self._exchange.publish(amqp, message.routing_key, mandatory=True),
                self._timeout,
            )
        except TimeoutError as exc:
            raise PublishFailed(f"no publisher confirm within {self._timeout}s") from exc
        except Exception as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
