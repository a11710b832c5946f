"""Accepting one received instance: inspect, spool durably, publish, and say what happened.

Used by the gateway's C-STORE handler (from an association thread). The outcome is a small
value the caller maps to its own protocol (DIMSE status, HTTP status)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.dicom import InvalidInstance, inspect_instance
from shared.messages import InstanceReceived
from shared.spool import Spool

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
            spooled = self._spool.commit(path)
        except OSError as exc:
            log.error("spool write failed: %s", exc)
            return Outcome("unavailable", f"spool write failed: {exc.strerror}")
        message = InstanceReceived(
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
            received_at=datetime.now(UTC).isoformat(),
        )
        try:
            self._publish(message)
        except Exception as exc:
            self._spool.reject(spooled.name)
            return Outcome("unavailable", f"broker did not confirm: {exc}")
        return Outcome("stored", sha256=spooled.sha256, size=spooled.size)
