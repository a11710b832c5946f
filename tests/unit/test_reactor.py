"""The DUL thread's wait (``services/gateway/reactor.py``) on real sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from services.gateway import reactor


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _dul(sock: socket.socket) -> Any:
    return SimpleNamespace(_kill_thread=False, socket=SimpleNamespace(socket=sock))


def _returns_at_once(wait: Callable[[float], None], times: int = 20) -> bool:
    """``times`` waits took less than the cap of one each: none waited for its cap."""
    started = time.monotonic()
    for _ in range(times):
        wait(reactor.REACTOR_PAUSE)
    return time.monotonic() - started < times * reactor.MAX_WAIT


def test_the_wait_returns_when_its_socket_has_a_pdu(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = pair
    peer.send(b"\x04\x00")  # a PDU is waiting: the DUL must go and read it
    wakers = reactor._Wakers()
    try:
        assert _returns_at_once(reactor._dul_wait(_dul(ours), wakers))
    finally:
        wakers.close()


def test_the_wait_ignores_a_socket_another_thread_has_taken(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """While the C-GET's thread owns the socket, a response waiting on it must not wake the DUL
    thread: it cannot read it, and returning at once made it spin until the owner did (it took
    half the gateway's CPU during a C-GET). The wait lasts its full cap instead."""
    ours, peer = pair
    peer.send(b"\x04\x00")
    dul = _dul(ours)
    dul.__dict__[reactor.SOCKET_TAKEN] = object()
    wakers = reactor._Wakers()
    try:
        wait = reactor._dul_wait(dul, wakers)
        started = time.monotonic()
        wait(reactor.REACTOR_PAUSE)
        assert time.monotonic() - started >= reactor.MAX_WAIT * 0.9
        # the owner handing the socket back wakes the DUL: the next wait sees the PDU
        dul.__dict__[reactor.SOCKET_TAKEN] = None
        wakers.wake_dul()
        wait(reactor.REACTOR_PAUSE)  # consumes the wake-up
        assert _returns_at_once(wait)
    finally:
        wakers.close()
