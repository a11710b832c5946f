"""Small, isolated speed-ups of pynetdicom's receive path, installed once by the gateway.

pynetdicom reads every PDU in 4 KiB ``recv`` calls appended to a ``bytearray``; with a 1 MiB
maximum PDU that is 256 calls and copies per PDU. ``recv_exact`` reads into one preallocated
buffer instead. Behaviour is unchanged: it returns what was read so far if the peer closes.
"""

from __future__ import annotations

import socket
from typing import cast

from pynetdicom import transport

_installed = False


def recv_exact(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    sock = cast(socket.socket, self.socket)
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    read = 0
    while read < nr_bytes:
        n = sock.recv_into(view[read:], nr_bytes - read)
        if not n:
            del view
            return buffer[:read]
        read += n
    del view
    return buffer


def install() -> None:
    global _installed
    if not _installed:
        transport.AssociationSocket.recv = recv_exact  # type: ignore[method-assign]
        _installed = True
