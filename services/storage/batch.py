"""Announcing stored instances in batches: the ``instance.stored`` events of instances that
finish at about the same time go out as one message (one publish, one broker confirm, one
delivery to the indexer for all of them).

Each caller still waits for the confirm of the message carrying its own event before it
removes its spool file and acks: batching changes the cost, not the order of the steps.
Under light load a batch is a single event, sent as the plain one-event message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shared.messages import InstanceStored, batch_body

Send = Callable[[bytes], Awaitable[None]]


class StoredBatcher:
    def __init__(self, send: Send, max_events: int, linger: float) -> None:
        self._send = send
        self._max = max_events
        self._linger = linger
        self._events: list[tuple[InstanceStored, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def announce(self, event: InstanceStored) -> None:
        """Returns once the message carrying ``event`` is confirmed; raises what sending it
        raised otherwise."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._events.append((event, future))
        if len(self._events) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._flush)
        await asyncio.shield(future)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events, self._events = self._events, []
        if events:
            task = asyncio.create_task(self._publish(events))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish(self, events: list[tuple[InstanceStored, asyncio.Future[None]]]) -> None:
        body = batch_body([event for event, _ in events])
        try:
            await self._send(body)
        except Exception as exc:
            for _, future in events:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in events:
            if not future.done():
                future.set_result(None)
