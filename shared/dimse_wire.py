"""The few DICOM upper-layer byte layouts the retrieve paths send and read, encoded by hand.

pynetdicom builds every command set through pydicom objects and pushes every P-DATA PDU through
two polling threads (PERFORMANCE.md: ~0.6 ms per command set, a 1 ms polling floor). For the
C-STORE sub-operations of C-MOVE and C-GET these are fixed layouts (PS3.7 E.1 / 9.3.1, PS3.8
9.3.5), so they are written here directly; the unit tests compare them byte for byte with
pynetdicom's. Datasets go out as stored: the file's meta group is skipped, the rest is framed
into PDVs without copying (``sendmsg`` with memoryviews).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RSP = 0x8010
C_FIND_RSP = 0x8020
C_CANCEL_RQ = 0x0FFF

P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

NO_DATASET = 0x0101
# What a peer may make us hold in memory for one DIMSE message whose dataset does not stream
# to disk: a command set is a few hundred bytes; a query identifier a few KB; a storage
# commitment N-ACTION ~130 bytes per referenced instance, so 8 MiB is ~60,000 of them.
COMMAND_MAX = 64 * 1024
MESSAGE_MAX = 8 * 1024 * 1024
_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


class WireError(ConnectionError):
    """The peer sent something this small implementation cannot follow, or went away."""


# ---- command sets (Implicit VR Little Endian, group 0000) ---------------------------------------

def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def command_set(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """The encoded command set: (0000,0000) group length, then ``elements`` in tag order."""
    body = b"".join(_element(e, v) for e, v in sorted(elements))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def c_store_rq(msg_id: int, sop_class: str, sop_instance: str, priority: int = 2,
               originator_aet: str = "", originator_id: int | None = None) -> bytes:
    elements = [(0x0002, _even(sop_class.encode("ascii"), b"\x00")),
                (0x0100, _us(C_STORE_RQ)), (0x0110, _us(msg_id)), (0x0700, _us(priority)),
                (0x0800, _us(0x0001)),
                (0x1000, _even(sop_instance.encode("ascii"), b"\x00"))]
    if originator_aet:
        elements.append((0x1030, _even(originator_aet.encode("ascii"), b" ")))
    if originator_id is not None:
        elements.append((0x1031, _us(originator_id)))
    return command_set(elements)


def c_store_rsp(msg_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    """A C-STORE-RSP without Error Comment or Offending Element."""
    return command_set([(0x0002, _even(sop_class.encode("ascii"), b"\x00")),
                        (0x0100, _us(C_STORE_RSP)), (0x0120, _us(msg_id)),
                        (0x0800, _us(NO_DATASET)), (0x0900, _us(status)),
                        (0x1000, _even(sop_instance.encode("ascii"), b"\x00"))])


def c_get_pending(msg_id: int, sop_class: str, status: int, remaining: int, completed: int,
                  failed: int, warning: int) -> bytes:
    """A C-GET-RSP without an identifier or comment (the pending responses)."""
    return command_set([(0x0002, _even(sop_class.encode("ascii"), b"\x00")),
                        (0x0100, _us(C_GET_RSP)), (0x0120, _us(msg_id)),
                        (0x0800, _us(NO_DATASET)), (0x0900, _us(status)),
                        (0x1020, _us(remaining)), (0x1021, _us(completed)),
                        (0x1022, _us(failed)), (0x1023, _us(warning))])


def c_find_rsp(msg_id: int, sop_class: str, status: int, with_identifier: bool) -> bytes:
    """A C-FIND-RSP without Error Comment or Offending Element (pending, success, cancel)."""
    return command_set([(0x0002, _even(sop_class.encode("ascii"), b"\x00")),
                        (0x0100, _us(C_FIND_RSP)), (0x0120, _us(msg_id)),
                        (0x0800, _us(0x0001 if with_identifier else NO_DATASET)),
                        (0x0900, _us(status))])


def parse_command(raw: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Element number -> value bytes of an encoded command set (group 0000 only)."""
    out: dict[int, bytes] = {}
    view = memoryview(raw)
    pos = 0
    while pos + 8 <= len(view):
        group, elem, length = struct.unpack_from("<HHL", view, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(view):
            raise WireError("malformed command set")
        out[elem] = bytes(view[pos:pos + length])
        pos += length
    return out


def us_value(command: dict[int, bytes], elem: int) -> int | None:
    value = command.get(elem)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


# ---- stored files -------------------------------------------------------------------------------

def dataset_offset(head: bytes | bytearray | memoryview) -> int:
    """Where the dataset starts in a stored file: after the 128-byte preamble, ``DICM`` and
    the File Meta Information group (Explicit VR Little Endian), if there is one."""
    view = memoryview(head)
    pos = 132 if bytes(view[128:132]) == b"DICM" else 0
    while pos + 8 <= len(view):
        group, _elem = struct.unpack_from("<HH", view, pos)
        if group != 0x0002:
            break
        vr = bytes(view[pos + 4:pos + 6])
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            if pos + 12 > len(view):
                raise WireError("stored file: truncated file meta group")
            pos += 12 + struct.unpack_from("<L", view, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", view, pos + 6)[0]
    if pos > len(view):
        raise WireError("stored file: truncated file meta group")
    return pos


# ---- PDUs ---------------------------------------------------------------------------------------

class Dataset(Protocol):
    """Dataset bytes to send: ``length`` bytes, handed out in blocks of at most ``size``."""

    @property
    def length(self) -> int: ...
    def blocks(self, size: int) -> Iterator[memoryview]: ...


def _pdv_header(context_id: int, control: int, length: int) -> bytes:
    # P-DATA-TF PDU (type 04) holding one PDV item: item length, context ID, control header
    return struct.pack(">BBLLBB", P_DATA_TF, 0, length + 6, length + 2, context_id, control)


def sendall(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
    """Send ``buffers`` in order with as few system calls as possible (no copies)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0
        while views and not len(views[0]):
            views.pop(0)


def send_message(sock: socket.socket, context_id: int, command: bytes,
                 dataset: Dataset | None, max_pdu: int, batch: int = 1 << 20) -> None:
    """One DIMSE message: the command (one PDV, it is small), then the dataset in fragments of
    at most ``max_pdu - 6`` bytes, a few fragments per system call. Memory: one ``batch``."""
    frag = max_pdu - 6 if max_pdu else batch
    if len(command) > frag:
        raise WireError("command set larger than the peer's maximum PDU")
    if dataset is None:
        sendall(sock, [_pdv_header(context_id, 0x03, len(command)), command])
        return
    out: list[bytes | memoryview] = [_pdv_header(context_id, 0x03, len(command)), command]
    left = dataset.length
    if left == 0:
        sendall(sock, [*out, _pdv_header(context_id, 0x02, 0)])
        return
    for block in dataset.blocks(max(frag, batch // frag * frag)):
        for start in range(0, len(block), frag):
            piece = block[start:start + frag]
            left -= len(piece)
            out += [_pdv_header(context_id, 0x02 if left <= 0 else 0x00, len(piece)), piece]
        sendall(sock, out)
        out = []
    if left > 0:
        raise WireError("the dataset ended early")


_CHUNK = 1 << 20  # the buffer grows by what has arrived: never by what a peer declares


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


def recv_upto(sock: socket.socket, n: int) -> bytearray:
    """Up to ``n`` bytes: fewer only if the peer closed the connection. Memory follows the bytes
    that arrived, not ``n``: a PDU header declaring 4 GiB costs nothing until 4 GiB are sent.

    What was read is ACKed at once (TCP_QUICKACK): a peer with Nagle's algorithm on (Debian's
    DCMTK tools unless ``TCP_NODELAY=1``, many modalities and archives) sends the next PDU of a
    message only once the last one is ACKed, and Linux delays the ACKs of a connection that
    answers (~40 ms each): stock ``storescu`` sent 22 small instances/s instead of 240."""
    buffer = bytearray(min(n, _CHUNK))
    got = 0
    while got < n:
        if got == len(buffer):
            buffer.extend(bytes(min(n - got, len(buffer))))  # doubles, up to n
        with memoryview(buffer) as view:
            k = sock.recv_into(view[got:], len(buffer) - got)
        if not k:
            del buffer[got:]
            break
        got += k
    if got and _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:  # not TCP (a socketpair in tests), or already closed
            pass
    return buffer


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buffer = recv_upto(sock, n)
    if len(buffer) < n:
        raise WireError("the peer closed the connection")
    return buffer


def read_pdu(sock: socket.socket, limit: int = 0) -> tuple[int, bytearray]:
    """The next PDU: (type, the whole PDU including its 6-byte header). ``limit``: refuse a PDU
    whose declared length is larger (0: no limit) before reading it."""
    head = recv_exact(sock, 6)
    kind, _, length = struct.unpack(">BBL", head)
    if limit and length > limit:
        raise WireError(f"the peer sent a PDU of {length} bytes, more than the {limit} "
                        "negotiated")
    return kind, head + recv_exact(sock, length)


def pdvs(pdu: bytes | bytearray | memoryview, start: int = 6
         ) -> Iterator[tuple[int, int, memoryview]]:
    """(context ID, control header, fragment) of each PDV in a P-DATA-TF PDU (``start`` = 0:
    ``pdu`` is the PDU's body, without its 6-byte header)."""
    view = memoryview(pdu)
    pos = start
    while pos + 6 <= len(view):
        length = struct.unpack_from(">L", view, pos)[0]
        if length < 2 or pos + 4 + length > len(view):
            raise WireError("malformed P-DATA-TF PDU")
        yield view[pos + 4], view[pos + 5], view[pos + 6:pos + 4 + length]
        pos += 4 + length


A_RELEASE_RQ_PDU = struct.pack(">BBLL", A_RELEASE_RQ, 0, 4, 0)


def a_abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    return struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, source, reason)
