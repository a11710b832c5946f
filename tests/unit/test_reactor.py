"""The DUL thread's wait (``services/gateway/reactor.py``) on real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom.timer import Timer

from services.gateway import reactor


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def endless(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits capped at an hour: a wait that is not woken, or not ended by a due timer, makes
    the test miss its deadline instead of ending by the cap."""
    monkeypatch.setattr(reactor, "MAX_WAIT", 3600.0)


def _dul(sock: socket.socket, artim: Timer | None = None) -> Any:
    """What the wait reads of a DUL: its kill flag, socket and timers (ARTIM not running, a
    network idle timer that never expires)."""
    idle = Timer(None)
    idle.start()
    return SimpleNamespace(_kill_thread=False, socket=SimpleNamespace(socket=sock),
                           artim_timer=artim or Timer(30), _idle_timer=idle)


def _finishes(work: Callable[[], object], deadline: float = 20.0) -> bool:
    """``work`` ran to its end within ``deadline`` seconds (run in a daemon thread, so a wait
    that never ends does not hold the test run)."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(deadline)
    return not thread.is_alive()


def _returns_at_once(wait: Callable[[float], None], times: int = 20) -> bool:
    """``times`` waits all returned (none waited for its hour-long cap)."""
    def waits() -> None:
        for _ in range(times):
            wait(reactor.REACTOR_PAUSE)

    return _finishes(waits)


def test_until_due_is_the_first_running_timer_capped() -> None:
    assert reactor.until_due() == reactor.MAX_WAIT
    assert reactor.until_due(Timer(0.2)) == reactor.MAX_WAIT  # not started
    assert reactor.until_due(Timer(None)) == reactor.MAX_WAIT  # never expires
    running, stopped, expired, far = Timer(0.2), Timer(0.1), Timer(0.0), Timer(600)
    for timer in (running, stopped, expired, far):
        timer.start()
    stopped.stop()
    assert 0 < reactor.until_due(running, stopped, far) <= 0.2
    assert reactor.until_due(stopped, far) == reactor.MAX_WAIT
    assert reactor.until_due(running, expired) == 0.0


def test_the_wait_ends_when_the_artim_timer_is_due(
        pair: tuple[socket.socket, socket.socket], endless: None) -> None:
    """A connection that never sends its A-ASSOCIATE-RQ is closed when ARTIM expires: the DUL
    thread must look at the timer then, not at the end of its longest wait."""
    ours, _ = pair
    artim = Timer(0.05)
    artim.start()
    wakers = reactor._Wakers()
    try:
        wait = reactor._dul_wait(_dul(ours, artim), wakers)

        def until_expired() -> None:
            while not artim.expired:
                wait(reactor.REACTOR_PAUSE)

        assert _finishes(until_expired)
    finally:
        wakers.close()


def test_stopping_the_dul_wakes_its_thread(pair: tuple[socket.socket, socket.socket],
                                           endless: None) -> None:
    """pynetdicom's teardown (``stop_dul`` in state Sta1) sets the kill flag and waits for the
    DUL thread to end: the thread, waiting on an idle socket, is woken rather than timing out."""
    ours, _ = pair
    assoc = SimpleNamespace()
    wakers = reactor._wakers(assoc)  # type: ignore[arg-type]
    dul = _dul(ours)
    wait = reactor._dul_wait(dul, wakers)

    def loop() -> None:
        while not dul._kill_thread:
            wait(reactor.REACTOR_PAUSE)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    dul.assoc = assoc
    dul.is_alive = thread.is_alive
    dul._run_loop_delay = reactor.REACTOR_PAUSE
    dul.state_machine = SimpleNamespace(current_state="Sta6")
    try:
        assert reactor._new_dul_stop(dul) is False  # established: not stopped
        assert thread.is_alive()
        dul.state_machine.current_state = "Sta1"
        stopped: list[bool] = []
        assert _finishes(lambda: stopped.append(reactor._new_dul_stop(dul)))
        assert stopped == [True]
        assert not thread.is_alive()
    finally:
        dul._kill_thread = True
        wakers.wake_dul()
        thread.join(5)
        wakers.close()


def test_the_wait_returns_when_its_socket_has_a_pdu(
        pair: tuple[socket.socket, socket.socket], endless: None) -> None:
    ours, peer = pair
    peer.send(b"\x04\x00")  # a PDU is waiting: the DUL must go and read it
    wakers = reactor._Wakers()
    try:
        assert _returns_at_once(reactor._dul_wait(_dul(ours), wakers))
    finally:
        wakers.close()


def test_the_wait_ignores_a_socket_another_thread_has_taken(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """While the C-GET's thread owns the socket, a response waiting on it must not wake the DUL
    thread: it cannot read it, and returning at once made it spin until the owner did (it took
    half the gateway's CPU during a C-GET). The wait lasts its full cap instead."""
    ours, peer = pair
    peer.send(b"\x04\x00")
    dul = _dul(ours)
    dul.__dict__[reactor.SOCKET_TAKEN] = object()
    wakers = reactor._Wakers()
    monkeypatch.setattr(reactor, "MAX_WAIT", 0.2)
    try:
        wait = reactor._dul_wait(dul, wakers)
        started = time.monotonic()
        wait(reactor.REACTOR_PAUSE)
        assert time.monotonic() - started >= reactor.MAX_WAIT * 0.9
        # the owner handing the socket back wakes the DUL: the next wait sees the PDU, however
        # long its cap
        monkeypatch.setattr(reactor, "MAX_WAIT", 3600.0)
        dul.__dict__[reactor.SOCKET_TAKEN] = None
        wakers.wake_dul()
        wait(reactor.REACTOR_PAUSE)  # consumes the wake-up
        assert _returns_at_once(wait)
    finally:
        wakers.close()
