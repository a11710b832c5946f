"""Small, isolated speed-ups of pynetdicom's C-STORE receive path, installed once by the gateway.

Each replaces pydicom object work that is the same fixed byte layout for every instance
(profiled: together about a third of the gateway's Python time per small instance):

- ``recv_exact``: pynetdicom reads every PDU in 4 KiB ``recv`` calls appended to a
  ``bytearray``; with a 1 MiB maximum PDU that is 256 calls and copies per PDU. This reads into
  one buffer instead (``dimse_wire.recv_upto``), grown by what arrived, never by the length a
  peer declares. It returns what was read so far if the peer closes, and ACKs what it read
  at once (a sender with Nagle's algorithm on waits for that ACK).
- ``file_meta``: the File Meta Information group pynetdicom writes in front of each received
  dataset, encoded directly instead of through a pydicom ``FileMetaDataset``. Same bytes.
- ``store_response``: the C-STORE-RSP command set (Implicit VR Little Endian), encoded directly
  instead of through a pydicom ``Dataset``. Same bytes. Responses carrying an Error Comment or
  Offending Element, and every other DIMSE message, still go through pynetdicom.

- ``copy_contexts``: pynetdicom deep-copies the ~170 supported presentation contexts for every
  association it accepts (18 ms of CPU each, uncontended: a modality that opens one association
  per instance pays it per instance). Contexts hold strings and flags only, so a copy of each
  object and of its transfer syntax list is as independent.

- ``set_uid``: pynetdicom checks every UID of every A-ASSOCIATE PDU it decodes or builds with
  two regular expressions, and getscu / storescu propose ~100 presentation contexts and as many
  role selections: a few hundred UIDs, nearly all the same well-known ones, per association
  (a sixth of the gateway's CPU per association, profiled). The outcome for a given value is
  remembered (a bounded LRU); a UID it refuses is checked again every time, and still refused.
  pydicom's ``UID.is_valid``, which those checks and the presentation context code call
  several times per UID, remembers its answer the same way (same pattern, same result).

- ``EncodedIdentifier``: a C-FIND match the handler has already encoded for the context's
  transfer syntax (``shared.query.encode_response``, same bytes as pydicom's); pynetdicom's
  C-FIND service sends it as it is instead of encoding a ``Dataset`` per match.

The unit tests compare the encoders byte for byte with pynetdicom's own.
"""

from __future__ import annotations

import copy
import io
import re
import socket
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import IO, Any, cast

from pydicom import uid as pydicom_uid
from pydicom.dataset import Dataset
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    dimse,
    dimse_messages,
    dimse_primitives,
    evt,
    pdu_items,
    pdu_primitives,
    presentation,
    service_class,
    transport,
    utils,
)
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from shared import dimse_wire as wire

_installed = False


def recv_exact(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    return wire.recv_upto(cast(socket.socket, self.socket), nr_bytes)


def copy_contexts(value: Any, memo: Any = None) -> Any:
    """``deepcopy`` for what pynetdicom's transport copies: a list of presentation contexts."""
    if isinstance(value, list) and all(type(cx) is PresentationContext for cx in value):
        out = []
        for cx in value:
            # its attributes copied directly: ``copy.copy`` goes through ``__reduce_ex__`` and
            # cost six times as much (0.5 ms for the gateway's contexts)
            new = PresentationContext.__new__(PresentationContext)
            attributes = cx.__dict__.copy()
            attributes["_transfer_syntax"] = list(cx._transfer_syntax)
            new.__dict__ = attributes
            out.append(new)
        return out
    return copy.deepcopy(value, memo)


# ---- File Meta Information (PS3.10 7.1: Explicit VR Little Endian) --------------------------

def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _explicit(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _sh_value(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


_IMPLEMENTATION = (_explicit(0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID))
                   + _explicit(0x0013, b"SH", _sh_value(PYNETDICOM_IMPLEMENTATION_VERSION)))


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The File Meta Information group (without preamble and ``DICM``) pynetdicom writes."""
    body = (_explicit(0x0001, b"OB", b"\x00\x01")
            + _explicit(0x0002, b"UI", _uid_value(sop_class_uid))
            + _explicit(0x0003, b"UI", _uid_value(sop_instance_uid))
            + _explicit(0x0010, b"UI", _uid_value(transfer_syntax))
            + _IMPLEMENTATION)
    return _explicit(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _create_file_meta(*, sop_class_uid: str, sop_instance_uid: str,
                      transfer_syntax: str) -> bytes:
    """pynetdicom's path (TRACE). A command UID holding bytes outside ASCII reaches here as
    pydicom decoded it (Latin-1): written back as those bytes, where ASCII could not encode
    it and the association was aborted. The handler then refuses it (0xC001)."""
    try:
        return file_meta(sop_class_uid, sop_instance_uid, transfer_syntax)
    except UnicodeEncodeError:
        return file_meta(_as_ascii(sop_class_uid), _as_ascii(sop_instance_uid),
                         transfer_syntax)


def _as_ascii(uid: str) -> str:
    """``uid`` with anything outside ASCII as "?": still no valid UID, now encodable."""
    return uid.encode("ascii", "replace").decode("ascii")


def _write_file_meta_info(fp: IO[bytes], meta: bytes) -> None:
    fp.write(meta)


def store_response(sop_class_uid: str, sop_instance_uid: str, message_id: int,
                   status: int) -> bytes:
    """The encoded C-STORE-RSP command set (PS3.7 9.3.1.2, Implicit VR Little Endian)."""
    return wire.c_store_rsp(message_id, sop_class_uid, sop_instance_uid, status)


def _plain(primitive: Any) -> bool:
    """A response with the fields the fixed layouts cover, and nothing else."""
    return (primitive.MessageIDBeingRespondedTo is not None and primitive.Status is not None
            and primitive.AffectedSOPClassUID is not None and primitive.ErrorComment is None
            and primitive.OffendingElement is None)


def _pdata(context_id: int, control: int, fragment: bytes) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes([control]) + fragment))
    return pdata


def _fast_send_msg(original: Callable[..., None]) -> Callable[..., None]:
    """C-STORE and C-FIND responses are sent from fixed byte layouts (the same P-DATA PDUs
    pynetdicom would send: one PDV each, command then identifier fragments); anything else,
    or with a DIMSE-sent handler bound, goes through pynetdicom."""

    def send_msg(self: dimse.DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        kind = type(primitive)
        if (kind not in (C_STORE, C_FIND) or not _plain(primitive)
                or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            original(self, primitive, context_id)
            return
        identifier = b""
        if kind is C_STORE:
            if primitive.AffectedSOPInstanceUID is None:
                original(self, primitive, context_id)
                return
            try:
                command = store_response(primitive.AffectedSOPClassUID,
                                         primitive.AffectedSOPInstanceUID,
                                         primitive.MessageIDBeingRespondedTo, primitive.Status)
            except UnicodeEncodeError:  # UIDs echoed from a request that was not ASCII
                original(self, primitive, context_id)
                return
        else:
            if primitive.Identifier is not None:
                identifier = primitive.Identifier.getvalue()
            command = wire.c_find_rsp(primitive.MessageIDBeingRespondedTo,
                                      primitive.AffectedSOPClassUID, primitive.Status,
                                      bool(identifier))
        room = (self.maximum_pdu_size or 0) - 6
        if self.maximum_pdu_size and len(command) > room:
            original(self, primitive, context_id)
            return
        self.dul.send_pdu(_pdata(context_id, 0x03, command))
        step = room if self.maximum_pdu_size else max(len(identifier), 1)
        for start in range(0, len(identifier), step):
            last = start + step >= len(identifier)
            self.dul.send_pdu(_pdata(context_id, 0x02 if last else 0x00,
                                     identifier[start:start + step]))

    return send_msg


class EncodedIdentifier(Dataset):  # type: ignore[misc]
    """A response identifier already encoded in (Implicit or Explicit VR) Little Endian. It
    holds no elements: ``decoded()`` reads them back (for tests and odd paths)."""

    def __init__(self, raw: bytes, implicit: bool) -> None:
        super().__init__()
        self.__dict__["raw"] = raw
        self.__dict__["implicit"] = implicit

    def decoded(self) -> Dataset:
        return decode(io.BytesIO(self.raw), self.implicit, True, False)


_original_encode = service_class.encode  # type: ignore[attr-defined]


def encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
           deflated: bool = False) -> bytes | None:
    """pynetdicom's ``encode`` as its service classes call it; an ``EncodedIdentifier`` in the
    transfer syntax asked for is sent as it is."""
    if isinstance(ds, EncodedIdentifier):
        if ds.implicit == is_implicit_vr and is_little_endian and not deflated:
            return cast(bytes, ds.raw)
        ds = ds.decoded()
    encoded: bytes | None = _original_encode(ds, is_implicit_vr, is_little_endian, deflated)
    return encoded


_original_set_uid = utils.set_uid


@lru_cache(maxsize=4096)
def _checked_uid(value: str | bytes, name: str, allow_empty: bool, allow_none: bool,
                 validate: bool) -> Any:
    return _original_set_uid(value, name, allow_empty, allow_none, validate)


def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
            validate: bool = True) -> Any:
    """pynetdicom's ``set_uid`` (a pydicom ``UID``, immutable, or ``ValueError``), its verdict
    on each value remembered."""
    if isinstance(value, str | bytes) and len(value) <= 64:
        return _checked_uid(value, name, allow_empty, allow_none, validate)
    return _original_set_uid(value, name, allow_empty, allow_none, validate)


_VALID_UID = re.compile(pydicom_uid.RE_VALID_UID)
_original_is_valid = pydicom_uid.UID.is_valid  # the property, before ``install``


@lru_cache(maxsize=8192)
def _uid_is_valid(value: str) -> bool:
    return len(value) <= 64 and _VALID_UID.match(value) is not None


def _is_valid(self: pydicom_uid.UID) -> bool:
    """``UID.is_valid``: the same test (pydicom's pattern, ``re.match``), remembered."""
    return _uid_is_valid(self)


def install() -> None:
    global _installed
    if _installed:
        return
    transport.AssociationSocket.recv = recv_exact  # type: ignore[method-assign]
    transport.deepcopy = copy_contexts  # type: ignore[attr-defined,assignment]
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined,assignment]
    service_class.encode = encode  # type: ignore[attr-defined]
    dimse.DIMSEServiceProvider.send_msg = _fast_send_msg(  # type: ignore[method-assign]
        dimse.DIMSEServiceProvider.send_msg)
    for module in (utils, pdu_items, pdu_primitives, presentation, dimse_primitives):
        module.set_uid = set_uid  # type: ignore[attr-defined]
    pydicom_uid.UID.is_valid = property(_is_valid)  # type: ignore[method-assign,assignment]
    _installed = True
