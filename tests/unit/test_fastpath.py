"""The gateway's hand-made encoders produce exactly pynetdicom's / pydicom's bytes."""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_FIND_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import create_file_meta, encode

from services.gateway.fastpath import copy_contexts, file_meta, store_response

CT = "1.2.840.10008.5.1.4.1.1.2"
UIDS = ["1.2.3", "1.2.3.4", "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"]


@pytest.mark.parametrize("sop", UIDS)
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_what_pydicom_writes(sop: str, ts: str) -> None:
    expected = BytesIO()
    write_file_meta_info(expected, create_file_meta(  # type: ignore[arg-type]
        sop_class_uid=UID(CT), sop_instance_uid=UID(sop), transfer_syntax=UID(ts)))
    assert file_meta(CT, sop, ts) == expected.getvalue()


@pytest.mark.parametrize("sop", UIDS)
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0x0124, 0xFFFF])
@pytest.mark.parametrize("msg_id", [1, 2, 65535])
def test_store_response_is_what_pynetdicom_encodes(sop: str, status: int, msg_id: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert store_response(CT, sop, msg_id, status) == encode(msg.command_set, True, True)


def test_copied_contexts_are_equal_and_independent() -> None:
    from pynetdicom import AllStoragePresentationContexts, build_context

    original = [build_context(cast(UID, cx.abstract_syntax),
                              ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
                for cx in AllStoragePresentationContexts[:20]]
    copied = copy_contexts(original)
    assert [(c.abstract_syntax, c.transfer_syntax, c.as_scu, c.as_scp) for c in copied] == \
        [(c.abstract_syntax, c.transfer_syntax, c.as_scu, c.as_scp) for c in original]
    copied[0].context_id = 7
    copied[0].add_transfer_syntax("1.2.840.10008.1.2.2")
    assert original[0].context_id is None
    assert "1.2.840.10008.1.2.2" not in original[0].transfer_syntax
    assert copy_contexts({"a": [1]}) == {"a": [1]}


def test_reading_a_pdu_allocates_what_arrived_not_what_was_declared() -> None:
    """A peer declaring a 4 GiB PDU and sending 1 KiB costs about 1 MiB, not 4 GiB; with a
    limit the PDU is refused before its body is read."""
    import socket
    import struct
    import tracemalloc

    import pytest

    from shared import dimse_wire as wire

    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"\x04\x00" + struct.pack(">L", 0xFFFFFFF0) + bytes(1024))
        b.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            head = wire.recv_exact(a, 6)
            body = wire.recv_upto(a, struct.unpack(">L", head[2:])[0])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(body) == 1024 and peak < 4 << 20
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"\x04\x00" + struct.pack(">L", 2 << 20) + bytes(1024))
        with pytest.raises(wire.WireError, match="more than the 1048576 negotiated"):
            wire.read_pdu(a, 1 << 20)
    a, b = socket.socketpair()
    with a, b:  # a PDU longer than the first buffer still arrives whole
        import threading

        payload = bytes(range(256)) * 12_000
        sender = threading.Thread(target=b.sendall, args=(
            b"\x04\x00" + struct.pack(">L", len(payload)) + payload,))
        sender.start()
        kind, pdu = wire.read_pdu(a)
        sender.join()
        assert kind == 4 and pdu[6:] == payload


class _Recorder:
    """What ``send_msg`` hands the DUL: each P-DATA's PDVs."""

    def __init__(self) -> None:
        self.pdus: list[list[tuple[int, bytes]]] = []

    def send_pdu(self, pdata: Any) -> None:
        self.pdus.append([(cx, bytes(v)) for cx, v in pdata.presentation_data_value_list])


def _sent_by(send: Any, primitive: Any, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    recorder = _Recorder()
    provider = SimpleNamespace(maximum_pdu_size=max_pdu, dul=recorder,
                               assoc=SimpleNamespace(get_handlers=lambda _e: []))
    send(provider, primitive, 5)
    return recorder.pdus


def _pynetdicom_pdus(primitive: Any, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    msg = C_FIND_RSP()
    msg.primitive_to_message(primitive)
    return [[(cx, bytes(v)) for cx, v in p.presentation_data_value_list]
            for p in msg.encode_msg(5, max_pdu)]


@pytest.mark.parametrize("status", [0xFF00, 0xFF01, 0x0000, 0xFE00])
@pytest.mark.parametrize("size", [0, 10, 5000, 40000])
@pytest.mark.parametrize("max_pdu", [0, 16384, 4096])
def test_find_responses_are_the_pdus_pynetdicom_sends(status: int, size: int,
                                                      max_pdu: int) -> None:
    """Command and identifier, fragmented as pynetdicom fragments them (one PDV per P-DATA)."""
    from services.gateway.fastpath import _fast_send_msg

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    rsp.Status = status
    if size:
        rsp.Identifier = BytesIO(bytes(range(256)) * (size // 256) + b"\x01" * (size % 256))
    fail = lambda *_a: pytest.fail("handed to pynetdicom")  # noqa: E731
    assert _sent_by(_fast_send_msg(fail), rsp, max_pdu) == _pynetdicom_pdus(rsp, max_pdu)


def test_find_responses_with_a_comment_go_to_pynetdicom() -> None:
    from services.gateway.fastpath import _fast_send_msg

    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    rsp.Status = 0xA700
    cast(Any, rsp).ErrorComment = "more than 1000 matches"  # pynetdicom types it as None
    handed: list[Any] = []
    _sent_by(_fast_send_msg(lambda _s, p, _cx: handed.append(p)), rsp, 16384)
    assert handed == [rsp]


UID_CASES = ["1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2", "1.02.3", "1.2.3\n", "1.2.a",
             "", "1." + "2" * 64, "1.2.3.", "0.0", b"1.2.840.10008.1.1", b"1.2.840.10008.1.1\x00"]


@pytest.mark.parametrize("value", UID_CASES)
@pytest.mark.parametrize(("allow_empty", "validate"), [(True, True), (False, True), (True, False)])
def test_remembered_uid_checks_give_pynetdicoms_verdict(value: str | bytes, allow_empty: bool,
                                                        validate: bool) -> None:
    """Same value or same exception as pynetdicom's own ``set_uid``, first time and again."""
    from services.gateway import fastpath

    def outcome(fn: Any) -> tuple[str, str]:
        try:
            result = fn(value, "X", allow_empty, True, validate)
        except ValueError as exc:
            return "refused", str(exc)
        return type(result).__name__, str(result)

    expected = outcome(fastpath._original_set_uid)
    assert outcome(fastpath.set_uid) == expected
    assert outcome(fastpath.set_uid) == expected


@pytest.mark.parametrize("value", [v for v in UID_CASES if isinstance(v, str)])
def test_remembered_is_valid_is_pydicoms(value: str) -> None:
    from services.gateway import fastpath

    is_valid = cast(property, fastpath._original_is_valid)  # the property, not its getter
    assert is_valid.fget is not None
    original = is_valid.fget(UID(value))
    assert fastpath._uid_is_valid(UID(value)) == original
    assert fastpath._uid_is_valid(UID(value)) == original


@pytest.mark.skipif(not hasattr(__import__("socket"), "TCP_QUICKACK"), reason="Linux only")
@pytest.mark.parametrize("reader", ["gateway (pynetdicom's socket)", "mover and C-GET (wire)"])
def test_each_read_acks_at_once_for_senders_with_nagle_on(reader: str) -> None:
    """A sender with Nagle's algorithm on (Debian's storescu) holds its next small PDU until
    the previous one is ACKed; a receiver that has just answered delays its ACKs (~40 ms
    each). Every read turns that delay off again (Linux reads the mode back as 1)."""
    import socket

    from services.gateway.fastpath import recv_exact
    from shared import dimse_wire as wire

    pdu = b"\x04\x00\x00\x00\x00\x02ab"
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sender:
        receiver, _ = listener.accept()
        with receiver:
            for _ in range(2):
                receiver.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # delayed ACKs
                sender.sendall(pdu)
                if reader.startswith("gateway"):
                    got = recv_exact(cast(Any, SimpleNamespace(socket=receiver)), len(pdu))
                else:
                    got = wire.read_pdu(receiver)[1]
                assert got == pdu
                assert receiver.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
