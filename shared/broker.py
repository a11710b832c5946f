"""RabbitMQ connection and confirmed publishing (publisher confirms + mandatory routing).

``connect`` opens an aio-pika robust connection: after a loss it reconnects by itself and
restores channels, QoS, the declared topology and the consumers. What we add around it:

- a short AMQP heartbeat, so a silent peer (half-open TCP connection, hung broker or proxy) is
  given up after ``(HEARTBEAT + 1) * 3`` s instead of aiormq's default of about three minutes;
  aio-pika's restore after a reconnect has no timeout of its own, this is what bounds it;
- a quicker reconnect interval than aio-pika's 5 s;
- :class:`BrokerHealth` on every connection: it logs each loss and recovery, logs an ERROR
  while the broker stays unreachable or while the connection keeps dropping, and answers
  ``healthy()`` for the service's heartbeat file, so ``--check`` reports a connection that
  cannot recover instead of it looping silently.

``heartbeat=`` and ``reconnect_interval=`` in the AMQP URL's query override our defaults.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from weakref import WeakKeyDictionary

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ConsumerTag,
)
from aiormq.exceptions import AMQPError
from yarl import URL

from shared import topology
from shared.lifecycle import retry_until
from shared.messages import _Message

log = logging.getLogger("minipacs.broker")

HEARTBEAT = 10            # s; a broker silent for (HEARTBEAT + 1) * 3 s is given up
RECONNECT_INTERVAL = 2.0  # s between aio-pika's reconnection attempts
HANDSHAKE_TIMEOUT = 10.0  # s for TCP connect + AMQP handshake of one attempt
DOWN_REPORT_EVERY = 30.0  # s between ERROR lines while the broker stays unreachable
FLAP_WINDOW = 60.0        # s; FLAP_LIMIT losses within this window mean the connection keeps
FLAP_LIMIT = 3            # dropping: reported (ERROR, unhealthy), not retried quietly


class PublishFailed(RuntimeError):
    """The broker did not confirm the message. ``refused``: it certainly did not take it (a
    ``basic.nack``, returned as unroutable, or never sent); otherwise the message may still be
    in the queue (no confirm in time, the connection lost mid-publish)."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


def robust_url(url: str) -> str:
    """``url`` with our heartbeat and reconnect interval unless it sets its own."""
    parsed = URL(url)
    defaults = {"heartbeat": str(HEARTBEAT), "reconnect_interval": str(RECONNECT_INTERVAL)}
    missing = {k: v for k, v in defaults.items() if k not in parsed.query}
    return str(parsed.update_query(missing)) if missing else url


class BrokerHealth:
    """Follows one robust connection: logs losses and recoveries, and says whether it is usable
    now (connected with its channels restored, and not dropping over and over)."""

    def __init__(self, connection: AbstractRobustConnection, name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.name = name
        self._clock = clock
        self.up = True  # made right after a successful connect
        self.down_since: float | None = None
        self.losses: deque[float] = deque()
        self.last_error = ""
        self._report: asyncio.TimerHandle | None = None
        connection.close_callbacks.add(self._on_close)
        connection.reconnect_callbacks.add(self._on_reconnect)

    # aio-pika calls these with the connection first
    def _on_close(self, _sender: object, exc: BaseException | None = None) -> None:
        self.lost(exc)

    def _on_reconnect(self, _sender: object) -> None:
        self.restored()

    @property
    def closing(self) -> bool:
        return self.connection.is_closed or self.connection.close_called

    def _trim(self, now: float) -> None:
        while self.losses and now - self.losses[0] > FLAP_WINDOW:
            self.losses.popleft()

    def lost(self, exc: BaseException | None) -> None:
        """The connection closed, or a reconnection attempt failed."""
        if self.closing:  # we closed it: nothing to report
            self._cancel_report()
            return
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self.last_error = f"{type(exc).__name__}: {exc}"
        if not self.up:
            return  # another failed attempt while already down: the periodic report covers it
        now = self._clock()
        self.up = False
        self.down_since = now
        self.losses.append(now)
        self._trim(now)
        if len(self.losses) >= FLAP_LIMIT:
            log.error("%s: RabbitMQ connection lost again (%d times in %.0fs; %s): it keeps "
                      "dropping after reconnecting; reporting unhealthy", self.name,
                      len(self.losses), FLAP_WINDOW, self.last_error or "no error given")
        else:
            log.warning("%s: RabbitMQ connection lost (%s); reconnecting", self.name,
                        self.last_error or "no error given")
        self._schedule_report()

    def restored(self) -> None:
        """aio-pika reconnected and restored channels, QoS, topology and consumers."""
        self._cancel_report()
        if self.up:
            return
        down = self._clock() - (self.down_since or self._clock())
        self.up = True
        self.down_since = None
        log.warning("%s: RabbitMQ connection restored after %.1fs (channels, queues and "
                    "consumers re-declared)", self.name, down)

    def healthy(self) -> bool:
        if self.closing or not self.up:
            return False
        self._trim(self._clock())
        return len(self.losses) < FLAP_LIMIT

    def _schedule_report(self) -> None:
        self._cancel_report()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._report = loop.call_later(DOWN_REPORT_EVERY, self._report_down)

    def _cancel_report(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._report = None

    def _report_down(self) -> None:
        self._report = None
        if self.up or self.closing or self.down_since is None:
            return
        log.error("%s: RabbitMQ unreachable for %.0fs (last error: %s); still retrying",
                  self.name, self._clock() - self.down_since, self.last_error or "none")
        self._schedule_report()


_health: WeakKeyDictionary[AbstractRobustConnection, BrokerHealth] = WeakKeyDictionary()


def health(connection: AbstractRobustConnection) -> BrokerHealth:
    """The :class:`BrokerHealth` following ``connection`` (made by ``connect``)."""
    found = _health.get(connection)
    if found is None:
        found = _health[connection] = BrokerHealth(connection, "minipacs")
    return found


async def connect(url: str, timeout: float,  # noqa: ASYNC109
                  name: str = "minipacs") -> AbstractRobustConnection:
    """A robust connection, retried for ``timeout`` seconds at start-up; ``name`` shows in the
    RabbitMQ dashboard and in our log lines about the connection."""
    target = robust_url(url)

    async def attempt() -> AbstractRobustConnection:
        return await aio_pika.connect_robust(target, timeout=HANDSHAKE_TIMEOUT,
                                             client_properties={"connection_name": name})

    connection = await retry_until("RabbitMQ", attempt, timeout)
    _health[connection] = BrokerHealth(connection, name)
    return connection


async def cancel_consumer(queue: AbstractQueue, tag: ConsumerTag,
                          timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Stop consuming at shutdown. While the broker is away aio-pika would wait for the
    reconnection: give up after ``timeout`` (the broker requeues what we did not ack)."""
    try:
        await asyncio.wait_for(queue.cancel(tag), timeout)
    except Exception as exc:
        log.warning("could not cancel the consumer on %s (%s: %s); the broker requeues what "
                    "was not acked", queue.name, type(exc).__name__, exc)


def log_task_failure(what: str) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback for a message handler task: an exception that escaped it is logged
    (one that comes from a lost channel means the message will be redelivered)."""

    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, (aio_pika.exceptions.ChannelInvalidStateError, ConnectionError)):
            log.warning("%s: could not settle a message, its channel is gone (%s); the broker "
                        "redelivers it", what, type(exc).__name__)
        else:
            log.error("%s failed", what, exc_info=exc)

    return done


RENEW_EVERY = 1.0  # seconds between two renewals of a publishing channel after refusals
_PERSISTENT_JSON = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json")


class Publisher:
    """Publishes persistent messages and returns only once the broker has confirmed them."""

    def __init__(self, connection: AbstractRobustConnection, confirm_timeout: float) -> None:
        self._connection = connection
        self._timeout = confirm_timeout
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._renewed = -RENEW_EVERY
        self._renewal: asyncio.Task[None] | None = None

    async def _new_channel(self) -> AbstractChannel:
        return await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def open(self) -> None:
        self._channel = await self._new_channel()
        self._exchange, _ = await topology.declare(self._channel)

    def _renew_after_refusal(self) -> None:
        """After a ``basic.nack``, publish on a fresh channel from then on.

        A quorum queue over its length limit (``reject-publish``) refuses publishes, and the
        channel remembers that until the queue tells it the limit is clear. RabbitMQ 3.10 never
        does when the limit itself is removed (a policy cleared while the queue is over it):
        that channel then refuses every publish for good, a new one does not. At most one
        renewal per ``RENEW_EVERY`` seconds, so a queue that stays full causes no churn."""
        now = time.monotonic()
        if self._renewal is not None or now - self._renewed < RENEW_EVERY:
            return
        self._renewed = now
        self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        try:
            fresh = await self._new_channel()
        except Exception as exc:
            log.warning("could not open a new publishing channel after a refusal (%s: %s)",
                        type(exc).__name__, exc)
            return
        finally:
            self._renewal = None
        old, self._channel = self._channel, fresh
        log.info("publishing on a new channel after the broker refused a message")
        if old is not None:
            # confirms still due on the old channel arrive within the confirm timeout
            await asyncio.sleep(self._timeout)
            try:
                await old.close()
            except Exception as exc:
                log.debug("closing the old publishing channel: %s: %s", type(exc).__name__, exc)

    @property
    def ready(self) -> bool:
        return (
            self._channel is not None
            and not self._channel.is_closed
            and health(self._connection).healthy()
        )

    async def publish(self, message: _Message, headers: dict[str, str] | None = None) -> None:
        await self.publish_body(message.to_bytes(), message.routing_key, headers)

    async def publish_body(self, body: bytes, routing_key: str,
                           headers: dict[str, str] | None = None) -> None:
        # Straight to aiormq with prebuilt properties: aio-pika's Message and Exchange layers
        # and a wait_for task per message were a tenth of the gateway's CPU per instance.
        if self._channel is None or self._exchange is None:
            raise PublishFailed("publisher is not open", refused=True)
        properties = _PERSISTENT_JSON if not headers else aiormq.spec.Basic.Properties(
            delivery_mode=2, content_type="application/json", headers=dict(headers))
        try:
            if self._channel.is_closed:
                raise PublishFailed("the publishing channel is closed", refused=True)
            # The plain Channel's accessor: the robust one waits for a reconnection, and a
            # publish must fail fast instead (the modality gets 0xA700 and retries).
            channel = await aio_pika.Channel.get_underlay_channel(self._channel)  # type: ignore[arg-type]
            await channel.basic_publish(body, exchange=topology.EXCHANGE,
                                        routing_key=routing_key,
                                        properties=properties, mandatory=True,
                                        timeout=self._timeout)
        except PublishFailed:
            raise
        except TimeoutError as exc:
            raise PublishFailed(f"no publisher confirm within {self._timeout}s") from exc
        except aiormq.exceptions.DeliveryError as exc:
            if not isinstance(exc, aiormq.exceptions.PublishError):  # a nack, not a return
                self._renew_after_refusal()
            raise PublishFailed(f"{type(exc).__name__}: {exc}", refused=True) from exc
        except Exception as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc


# ---- consumers ---------------------------------------------------------------------------------

# An ack / reject / nack after the delivery channel died (ChannelInvalidStateError is a
# RuntimeError), or while the connection is being torn down.
_SETTLE_ERRORS = (AMQPError, RuntimeError, ConnectionError)


def delivered_on_live_channel(message: AbstractIncomingMessage) -> bool:
    """False when the channel that delivered ``message`` is closed: it can no longer be acked,
    and the broker has put it back in the queue for redelivery."""
    try:
        return not message.channel.is_closed
    except _SETTLE_ERRORS:
        return False


async def settle(message: AbstractIncomingMessage, how: str) -> bool:
    """``ack`` / ``reject`` (no requeue) / ``requeue`` a message; False when its channel is gone
    (the broker redelivers it: every consumer is idempotent, so nothing is lost or doubled)."""
    try:
        if how == "ack":
            await message.ack()
        elif how == "reject":
            await message.reject(requeue=False)
        else:
            await message.nack(requeue=True)
    except _SETTLE_ERRORS as exc:
        log.debug("could not %s a message (%s: %s)", how, type(exc).__name__, exc)
        return False
    return True
