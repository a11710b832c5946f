"""Accepting one received instance: inspect, spool durably, publish, and say what happened.

Used by the gateway's C-STORE handler (from an association thread). The outcome is a small
value the caller maps to its own protocol (DIMSE status, HTTP status). ``recover`` rebuilds the
message of a spool file whose publish the broker never answered (for storage's sweeper)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from shared.broker import PublishFailed
from shared.dicom import InstanceInfo, InvalidInstance, inspect_instance
from shared.messages import InstanceReceived
from shared.spool import Spool, Spooled, Unconfirmed, file_digest

log = logging.getLogger("minipacs.ingest")


@dataclass(frozen=True)
class Caller:
    aet: str
    host: str


@dataclass(frozen=True)
class Outcome:
    """``kind`` is "stored", "unreadable", "missing_uid", "mismatch" or "unavailable"."""

    kind: str
    reason: str = ""
    sha256: str = ""
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.kind == "stored"


class Ingest:
    def __init__(self, spool: Spool, publish: Callable[[InstanceReceived], None]) -> None:
        self._spool = spool
        self._publish = publish

    def accept_file(self, path: Path, sop_class: str, sop_instance: str, transfer_syntax: str,
                    caller: Caller) -> Outcome:
        """``path`` is a Part-10 file on the spool's filesystem; on success it is moved into the
        spool (the caller must not use it afterwards)."""
        try:
            info = inspect_instance(path, sop_class, sop_instance, transfer_syntax)
        except InvalidInstance as exc:
            return Outcome(exc.kind, exc.reason)
        try:
            spooled = self._spool.commit(path, note_of(caller))
        except OSError as exc:
            log.error("spool write failed: %s", exc)
            return Outcome("unavailable", f"spool write failed: {exc.strerror}")
        message = _message(info, spooled, caller, datetime.now(UTC))
        try:
            self._publish(message)
        except Exception as exc:
            if isinstance(exc, PublishFailed) and exc.refused:
                # nothing on the broker refers to the file: it goes at once
                self._spool.remove(spooled.name)
                self._spool.settle(spooled.marker)
            # else the message may be queued after all: the file stays in ready/ with its
            # marker, as after a gateway that stopped here, for storage (or its sweeper)
            return Outcome("unavailable", f"broker did not confirm: {exc}")
        self._spool.settle(spooled.marker)
        return Outcome("stored", sha256=spooled.sha256, size=spooled.size)


def _message(info: InstanceInfo, spooled: Spooled, caller: Caller,
             received_at: datetime) -> InstanceReceived:
    return InstanceReceived(
        sop_instance_uid=info.sop_instance_uid,
        sop_class_uid=info.sop_class_uid,
        study_instance_uid=info.study_instance_uid,
        series_instance_uid=info.series_instance_uid,
        transfer_syntax=info.transfer_syntax,
        size=spooled.size,
        sha256=spooled.sha256,
        spool_name=spooled.name,
        calling_aet=caller.aet,
        peer_host=caller.host,
        received_at=received_at.isoformat(),
    )


def note_of(caller: Caller) -> bytes:
    """What the spool's marker keeps of the sender, for ``recover``."""
    return json.dumps({"aet": caller.aet, "host": caller.host}).encode()


def _caller_from(note: bytes) -> Caller:
    try:
        data = json.loads(note)
        return Caller(str(data["aet"]), str(data["host"]))
    except (ValueError, TypeError, KeyError):  # the marker's contents did not survive a crash
        return Caller("", "")


def recover(spool: Spool, item: Unconfirmed) -> InstanceReceived:
    """The ``instance.received`` message for a ready file whose publish the broker never
    answered: the file is read again (it was fsynced before the publish), so the message says
    what the gateway's said. Raises ``InvalidInstance`` if the file no
    longer reads as the instance the gateway checked."""
    path = spool.ready / item.name
    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        transfer_syntax = str(meta.TransferSyntaxUID)
    except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
        raise InvalidInstance("unreadable", f"file meta cannot be read: {type(exc).__name__}"
                              ) from exc
    info = inspect_instance(path, sop_class, sop_instance, transfer_syntax)
    sha256, size = file_digest(path)
    return _message(info, Spooled(item.name, sha256, size, item.marker), _caller_from(item.note),
                    datetime.fromtimestamp(item.marked_at, UTC))
