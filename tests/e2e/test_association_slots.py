"""Association slots: a connection frees its slot as soon as it ends, however it ends.

Reproducer: a TCP connection that connected and closed (FIN) or reset (RST) without sending an
A-ASSOCIATE-RQ held one of the ``MINIPACS_MAX_ASSOCIATIONS`` slots for the whole ACSE timeout
(pynetdicom's acceptor thread, which it counts, waited that long for the request). Two
connect-and-close calls on a gateway limited to 2 left no association possible for 30 s; a TCP
health check or a port scanner at one connection a second locked every modality out at the
default limit, and so did the stack's own readiness probe (a TCP connect) for the first 30 s.
A C-MOVE whose requester went away held its slot until the job ended or timed out.

The stacks here run with an ACSE timeout (60 s) and a C-MOVE start timeout (120 s) far longer
than the deadline the tests give the slots (``PROMPTLY``): only a slot freed when its
connection ended passes, never one the timeouts freed.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from scripts.native import Stack
from shared import dimse_wire as wire
from tests.conftest import make_stack, teardown
from tests.helpers import dcmtk, dcmtk_env, wait_until

pytestmark = pytest.mark.e2e

LIMIT = 2
ACSE_TIMEOUT = 60.0  # s: the gateway closes a silent connection after this long
PROMPTLY = 15.0  # s: well under ACSE_TIMEOUT: a slot the timeout freed would be too late
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
ECHO_CX, MOVE_CX = 1, 3


def slots_stack(tmp: Path, name: str) -> Stack:
    return make_stack(tmp, name, MINIPACS_MAX_ASSOCIATIONS=str(LIMIT),
                      MINIPACS_ACSE_TIMEOUT=f"{ACSE_TIMEOUT:g}",
                      MINIPACS_MOVE_START_TIMEOUT="120")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = slots_stack(tmp_path_factory.mktemp("slots"), "slots").start()
    yield s
    teardown(s)


# ---- clients ---------------------------------------------------------------------------------

def both_slots_free(port: int) -> bool:
    """Both slots at once: an association held (pynetdicom) and, beside it, DCMTK's echoscu;
    then the held one still answers. With a slot taken, one of the two is rejected."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    try:
        if not held.is_established:
            return False
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(port)],
                              capture_output=True, timeout=60, env=dcmtk_env())
        return echo.returncode == 0 and int(held.send_c_echo().Status) == 0x0000
    finally:
        if held.is_established:
            held.release()


def wait_for_both_slots(stack: Stack, after: str) -> None:
    port = stack.config.gateway_port
    wait_until(lambda: both_slots_free(port), PROMPTLY,
               what=f"both association slots free {after}, before the ACSE timeout "
               f"({ACSE_TIMEOUT:g} s) could have freed them")


def close(sock: socket.socket, how: str) -> None:
    """End the connection with a FIN (and read what the gateway still sends until it closes
    its side: closing with unread bytes would send an RST), or reset it (RST: SO_LINGER on,
    zero timeout)."""
    if how == "RST":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
    sock.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _context(cx: int, abstract: str) -> bytes:
    return _item(0x20, bytes([cx, 0, 0, 0]) + _item(0x30, abstract.encode())
                 + _item(0x40, IMPLICIT_LE.encode()))


def associate_rq() -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) from TESTSCU proposing Verification and Study Root
    C-MOVE, Implicit VR Little Endian."""
    body = (struct.pack(">HH", 1, 0) + b"MINIPACS".ljust(16) + b"TESTSCU".ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + _context(ECHO_CX, VERIFICATION)
            + _context(MOVE_CX, STUDY_ROOT_MOVE)
            + _item(0x50, _item(0x51, struct.pack(">L", 16384))))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def accepted_contexts(ac: bytes) -> set[int]:
    """The presentation context IDs an A-ASSOCIATE-AC accepts (result 0)."""
    accepted, pos = set(), 74  # PDU header, version, reserved, AE titles, reserved
    while pos + 4 <= len(ac):
        kind, length = ac[pos], struct.unpack_from(">H", ac, pos + 2)[0]
        if kind == 0x21 and ac[pos + 6] == 0:
            accepted.add(ac[pos + 4])
        pos += 4 + length
    return accepted


def _associated(port: int) -> socket.socket | None:
    sock = connect(port)
    sock.sendall(associate_rq())
    kind, ac = wire.read_pdu(sock)
    if kind == 0x03:  # A-ASSOCIATE-RJ: the slots of the last check still winding down
        close(sock, "FIN")
        return None
    assert kind == 0x02, f"A-ASSOCIATE-AC expected, PDU type 0x{kind:02X}"
    assert accepted_contexts(bytes(ac)) == {ECHO_CX, MOVE_CX}
    return sock


def associated(port: int) -> socket.socket:
    """An association (raw socket), the A-ASSOCIATE-AC read."""
    sock = wait_until(lambda: _associated(port), PROMPTLY, what="an association accepted")
    assert sock is not None
    return sock


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def pdv(cx: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV."""
    return struct.pack(">BBLLBB", wire.P_DATA_TF, 0, len(data) + 6, len(data) + 2, cx,
                       control) + data


def c_echo_rq(msg_id: int) -> bytes:
    return wire.command_set([(0x0002, _uid(VERIFICATION)), (0x0100, _us(0x0030)),
                             (0x0110, _us(msg_id)), (0x0800, _us(wire.NO_DATASET))])


def echo(sock: socket.socket, msg_id: int) -> int:
    """One C-ECHO on a raw association: its status."""
    sock.sendall(pdv(ECHO_CX, 0x03, c_echo_rq(msg_id)))
    _, rsp = wire.read_pdu(sock)
    (_, _, command), = wire.pdvs(rsp)
    status = wire.us_value(wire.parse_command(command), 0x0900)
    assert status is not None
    return status


def c_move_rq(destination: str) -> bytes:
    """A Study Root C-MOVE-RQ and its identifier, as two PDUs."""
    command = wire.command_set([(0x0002, _uid(STUDY_ROOT_MOVE)), (0x0100, _us(0x0021)),
                                (0x0110, _us(1)), (0x0600, destination.encode().ljust(16)),
                                (0x0700, _us(0)), (0x0800, _us(0x0000))])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    data = encode(identifier, True, True)
    assert data is not None
    return pdv(MOVE_CX, 0x03, command) + pdv(MOVE_CX, 0x02, data)


def log_after(stack: Stack, mark: int) -> Callable[[], str]:
    return lambda: stack.log_text("gateway")[mark:]


def logged(stack: Stack, mark: int, pattern: str) -> re.Match[str]:
    def found() -> re.Match[str] | None:
        return re.search(pattern, log_after(stack, mark)())

    match = wait_until(found, 10, what=f"{pattern!r} in the gateway's log")
    assert match is not None
    return match


def requested(stack: Stack) -> socket.socket | None:
    """A connection that sent its A-ASSOCIATE-RQ, which the gateway accepted (its answer left
    unread); None if the gateway rejected it (a slot still winding down: try again)."""
    mark = len(stack.log_text("gateway"))
    sock = connect(stack.config.gateway_port)
    sock.sendall(associate_rq())
    request = logged(stack, mark, rf"assoc=(\d+) TESTSCU@127\.0\.0\.1:"
                     rf"{sock.getsockname()[1]} -> MINIPACS: association requested")
    verdict = logged(stack, mark, rf"assoc={request[1]} (accepted|rejected)")
    if verdict[1] == "accepted":
        return sock
    close(sock, "RST")
    return None


# ---- tests -----------------------------------------------------------------------------------

def test_connections_that_close_before_associating_hold_no_slot(tmp_path: Path) -> None:
    """Right after start-up both slots are free: the readiness probe (a TCP connect) holds
    none. Then more connect-and-close (FIN) and connect-and-reset (RST) connections than the
    limit: both slots are free again long before the ACSE timeout, and each connection has
    its one log line saying where it came from."""
    stack = slots_stack(tmp_path, "slots_start").start()
    try:
        wait_for_both_slots(stack, "right after start-up")
        port = stack.config.gateway_port
        mark = len(stack.log_text("gateway"))
        expected = []
        for how in ("FIN", "RST") * LIMIT:
            sock = connect(port)
            expected.append(f"connection from 127.0.0.1:{sock.getsockname()[1]} closed by peer "
                            f"before associating ({how})")
            close(sock, how)
        wait_for_both_slots(stack, "after connections closed before associating")

        def every_line() -> str:
            text = log_after(stack, mark)()
            return text if all(line in text for line in expected) else ""

        log = wait_until(every_line, 10, what="a line per connection")
        for line in expected:
            assert log.count(line) == 1, log
        assert "Traceback" not in log, log
    finally:
        teardown(stack)


@pytest.mark.parametrize("how", ["FIN", "RST"])
@pytest.mark.parametrize("when", ["after the A-ASSOCIATE-RQ", "inside a PDU",
                                  "inside a message", "between messages"])
def test_a_connection_ended_mid_association_frees_its_slot(stack: Stack, when: str,
                                                            how: str) -> None:
    """Ended after its A-ASSOCIATE-RQ (before reading the answer), half-way through a PDU,
    after the first fragment of a command, or after a C-ECHO: the slot is free at once, and
    the abort is logged as the peer's doing once the association existed."""
    port = stack.config.gateway_port
    wait_for_both_slots(stack, "before the test")
    mark = len(stack.log_text("gateway"))
    if when == "after the A-ASSOCIATE-RQ":
        accepted = wait_until(lambda: requested(stack), PROMPTLY,
                              what="an association accepted")
        assert accepted is not None
        sock = accepted
    else:
        sock = associated(port)
        if when == "inside a PDU":
            sock.sendall(pdv(ECHO_CX, 0x03, c_echo_rq(1))[:20])
        elif when == "inside a message":
            sock.sendall(pdv(ECHO_CX, 0x01, c_echo_rq(1)[:30]))  # not the command's last
        else:
            assert echo(sock, 1) == 0x0000
    peer = f"TESTSCU@127.0.0.1:{sock.getsockname()[1]}"
    close(sock, how)
    wait_for_both_slots(stack, f"after a connection ended {when} ({how})")
    wait_until(lambda: f"{peer} aborted: connection closed by peer ({how})"
               in log_after(stack, mark)(), 10, what="the abort logged")
    assert "Traceback" not in log_after(stack, mark)()


def test_a_c_move_whose_requester_goes_away_frees_its_slot(stack: Stack) -> None:
    """A C-MOVE waits for a mover to take its job (none runs: up to 120 s) when its requester
    resets the connection: the gateway stops relaying, cancels the job, and the slot is free
    at once instead of when the job would have timed out."""
    stack.kill("mover")
    port = stack.config.gateway_port
    wait_for_both_slots(stack, "before the test")
    mark = len(stack.log_text("gateway"))
    sock = associated(port)
    sock.sendall(c_move_rq("STORESCU"))
    wait_until(lambda: "C-MOVE STUDY to STORESCU" in log_after(stack, mark)(), 30,
               what="the C-MOVE job queued")
    close(sock, "RST")
    wait_for_both_slots(stack, "after the C-MOVE's requester went away")
    log = log_after(stack, mark)()
    assert "the association is gone: cancelling" in log, log
    assert "Traceback" not in log, log
