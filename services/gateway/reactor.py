"""pynetdicom's two threads per association wait for work instead of polling every millisecond.

pynetdicom 3.0 runs, for every association, a DUL thread and an association thread, and each
loops with ``time.sleep(0.001)`` when there is nothing to do: measured here, four idle
associations cost the gateway 22 % of a core, and a modality that keeps its association open
costs as much as one that sends. This module gives each of those sleeps something to wait on:

- the DUL thread waits in ``select`` on its socket and on a wake-up socket that is written
  whenever something is queued for it (a PDU to send, a state machine event) or it is killed;
- the association thread waits on an ``Event`` set whenever a DIMSE message or an A-RELEASE /
  A-ABORT primitive is queued for it, or the DUL thread ends (its teardown waits on it too).

Each wait lasts until the first of the timers that loop checks (ARTIM, network idle) is due,
and at most ``MAX_WAIT``: an association that stays open without traffic (a modality keeping
its association) wakes each of its threads about once a second (pynetdicom's own loops: a
thousand times).
Setting the DUL's kill flag wakes it too (``kill_dul``, ``stop_dul``), so tearing an
association down does not wait for a timeout. And when the DUL thread ends, whatever waits on
its queue for the association (an acceptor waiting for its A-ASSOCIATE-RQ) stops waiting:
a connection closed before it associates frees its association slot at once (``_UserQueue``).
Nothing else in pynetdicom changes: the shims replace ``time.sleep`` on those two threads only
(every other caller sleeps as before), and the DUL's queues.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
import time as _time
from collections.abc import Callable
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.timer import Timer

from services.gateway.announce import on_the_way

MAX_WAIT = 1.0  # s: the longest wait when no timer is due sooner
# Set on a DUL while another thread owns its socket (the gateway's C-GET, ``retrieve.py``):
# the DUL then waits for its wake-up socket only. Watching a socket it may not read would
# return at once for every PDU the owner has not read yet: a busy loop.
SOCKET_TAKEN = "_minipacs_socket_taken"
REACTOR_PAUSE = 0.001  # s: what pynetdicom's reactor loops sleep when idle

_local = threading.local()  # .wait: this thread's replacement for time.sleep, if any


class _TimeShim:
    """The ``time`` module as pynetdicom's ``dul`` and ``association`` modules see it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        # Only the reactors' idle pause (1 ms) waits for work; pynetdicom's other sleeps
        # (teardown, pausing a reactor) keep their meaning.
        wait: Callable[[float], None] | None = getattr(_local, "wait", None)
        if wait is None or seconds != REACTOR_PAUSE:
            _time.sleep(seconds)
        else:
            wait(seconds)


class _WakingQueue(queue.Queue[Any]):
    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _UserQueue(_WakingQueue):
    """The DUL's queue of primitives for the association (``to_user_queue``), which stops
    waiting once the DUL thread has ended: nothing will be put on it any more.

    pynetdicom's acceptor waits on it for the A-ASSOCIATE-RQ for the whole ACSE timeout
    (``receive_pdu(wait=True, timeout=acse_timeout)``). A connection closed (FIN or RST)
    before sending one ends the DUL thread at once (PS3.8 AA-5 puts nothing on the queue), but
    the association thread, which pynetdicom counts against ``maximum_associations``, waited
    on: a TCP health check held an association slot for 30 s. Once ended, a ``get`` that
    would wait raises ``queue.Empty`` as a timeout would, so the thread ends and closes the
    socket now. A silent connection that stays open still waits for the ACSE timeout."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__(wake)
        self.ended = False

    def end(self) -> None:
        with self.not_empty:
            self.ended = True
            self.not_empty.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else _time.monotonic() + timeout
        with self.not_empty:
            while not self._qsize():
                left = None if deadline is None else deadline - _time.monotonic()
                if not block or self.ended or (left is not None and left <= 0):
                    raise queue.Empty
                self.not_empty.wait(left)
            item = self._get()
            self.not_full.notify()
            return item


class _Wakers:
    """Per association: the DUL's wake-up socket pair and the association thread's Event."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.assoc_event = threading.Event()

    def wake_dul(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self.writer.send(b"\0")

    def wake_assoc(self) -> None:
        self.assoc_event.set()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _wakers(assoc: Association) -> _Wakers:
    wakers: _Wakers = assoc.__dict__.setdefault("_minipacs_wakers", _Wakers())
    return wakers


def wake_dul(assoc: Association) -> None:
    """Make the association's DUL thread look at its socket again (after a take-over)."""
    wakers = assoc.__dict__.get("_minipacs_wakers")
    if isinstance(wakers, _Wakers):
        wakers.wake_dul()


def connection_lost(assoc: Association) -> bool:
    """The association's DUL thread has ended: its connection is gone (closed or reset by the
    peer, aborted). pynetdicom's ``is_established`` says so only once the association thread is
    back in its loop, which it is not while a handler runs on it (a C-MOVE relaying the mover's
    progress): such a handler asks this instead, so the slot is not held until it ends."""
    return assoc.dul.ident is not None and not assoc.dul.is_alive()


def until_due(*timers: Timer) -> float:
    """Seconds until the first of the running ``timers`` expires, at most ``MAX_WAIT``."""
    wait = MAX_WAIT
    for timer in timers:
        if timer.timeout is not None and timer._start_time is not None \
                and timer._end_time is None:
            wait = min(wait, timer.remaining)
    return max(wait, 0.0)


def _dul_wait(dul: DULServiceProvider, wakers: _Wakers) -> Callable[[float], None]:
    def wait(_seconds: float) -> None:
        if dul._kill_thread:
            return
        watched: list[Any] = [wakers.reader]
        raw = getattr(dul.socket, "socket", None)
        if raw is not None and raw.fileno() >= 0 and dul.__dict__.get(SOCKET_TAKEN) is None:
            watched.append(raw)
        try:
            ready, _, _ = select.select(watched, [], [],
                                        until_due(dul.artim_timer, dul._idle_timer))
        except (OSError, ValueError):  # the socket closed under us: the loop will see it
            return
        if wakers.reader in ready:
            with contextlib.suppress(OSError):
                while wakers.reader.recv(4096):
                    pass

    return wait


def _assoc_wait(assoc: Association, wakers: _Wakers) -> Callable[[float], None]:
    def wait(_seconds: float) -> None:
        wakers.assoc_event.wait(until_due(assoc.dul._idle_timer))
        wakers.assoc_event.clear()

    return wait


_dul_init = DULServiceProvider.__init__
_dul_run = DULServiceProvider.run_reactor
_dul_kill = DULServiceProvider.kill_dul
_dul_stop = DULServiceProvider.stop_dul
_dimse_init = _dimse.DIMSEServiceProvider.__init__
_assoc_run = Association._run_reactor
_installed = False


def _new_dul_init(self: DULServiceProvider, assoc: Association) -> None:
    _dul_init(self, assoc)
    wakers = _wakers(assoc)
    self.event_queue = _WakingQueue(wakers.wake_dul)
    self.to_provider_queue = _WakingQueue(wakers.wake_dul)
    self.to_user_queue = _UserQueue(wakers.wake_assoc)


def _new_dul_run(self: DULServiceProvider) -> None:
    wakers = _wakers(self.assoc)
    _local.wait = _dul_wait(self, wakers)
    try:
        _dul_run(self)
    finally:
        _local.wait = None
        on_the_way.end()  # a C-STORE this thread was reading, if the thread ends inside it
        if isinstance(self.to_user_queue, _UserQueue):
            self.to_user_queue.end()  # an acceptor still waiting for its A-ASSOCIATE-RQ stops
        wakers.wake_assoc()  # the association thread checks whether the DUL is still alive
        wakers.close()


def _new_dul_kill(self: DULServiceProvider) -> None:
    _dul_kill(self)
    _wakers(self.assoc).wake_dul()


def _new_dul_stop(self: DULServiceProvider) -> bool:
    """pynetdicom's ``stop_dul`` (the association's teardown), which sets the kill flag without
    waking the DUL thread: it would then see it only when its wait ends."""
    if self.state_machine.current_state != "Sta1":
        return False
    self._kill_thread = True
    _wakers(self.assoc).wake_dul()
    return bool(_dul_stop(self))


def _new_dimse_init(self: Any, assoc: Association) -> None:
    _dimse_init(self, assoc)
    self.msg_queue = _WakingQueue(_wakers(assoc).wake_assoc)


def _new_assoc_run(self: Association) -> None:
    _local.wait = _assoc_wait(self, _wakers(self))
    try:
        _assoc_run(self)
    finally:
        _local.wait = None


def install() -> None:
    """Process-wide (the gateway's AE is the only one in its process)."""
    global _installed
    if _installed:
        return
    _dul.time = _TimeShim()  # type: ignore[attr-defined,assignment]
    _association.time = _TimeShim()  # type: ignore[attr-defined,assignment]
    DULServiceProvider.__init__ = _new_dul_init  # type: ignore[method-assign]
    DULServiceProvider.run_reactor = _new_dul_run  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _new_dul_kill  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = _new_dul_stop  # type: ignore[method-assign]
    _dimse.DIMSEServiceProvider.__init__ = _new_dimse_init  # type: ignore[method-assign]
    Association._run_reactor = _new_assoc_run  # type: ignore[method-assign]
    _installed = True
