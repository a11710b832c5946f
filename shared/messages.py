"""Versioned message schemas. Every message body is JSON with ``"v"`` (schema version).

instance.received v1  gateway/api -> storage   the bytes wait in the spool (claim check)
instance.stored   v1  storage -> indexer       the object is in S3 and verified

Both instance messages carry one event, or ``{"v": 1, "instances": [...]}`` for several.
move.requested    v1  gateway/api -> mover     send what ``identifier`` matches to a node
move.progress     v1  mover -> gateway         counts of a running job, and its final state
move.cancel       v1  gateway/api -> movers    stop a job (C-CANCEL)
commitment.requested v1  gateway -> mover      report on a storage commitment request
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Self, TypeVar

SCHEMA_VERSION = 1
M = TypeVar("M", bound="_Message")


class BadMessage(ValueError):
    """A message body that no version of our schemas can read: it goes to the dead-letter queue."""


class _Message:
    routing_key: str = ""

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: ``dataclasses.asdict`` deep-copies every value (the header of an
        # ``instance.stored`` is a nested dict), which cost more than the JSON encoding itself.
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        return _dump({"v": SCHEMA_VERSION, **self.to_dict()})

    @classmethod
    def from_bytes(cls, body: bytes) -> Self:
        return cls.from_dict(_load(cls.__name__, body))

    @classmethod
    def from_dict(cls, data: object) -> Self:
        if not isinstance(data, dict):
            raise BadMessage(f"{cls.__name__}: not an object")
        try:
            return cls(**data)
        except TypeError as exc:
            raise BadMessage(f"{cls.__name__}: {exc}") from exc


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _load(name: str, body: bytes) -> dict[str, Any]:
    """A message body as a dict without its ``"v"``; ``BadMessage`` unless it is JSON of our
    schema version."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"{name}: body is not JSON") from exc
    if not isinstance(data, dict) or data.get("v") != SCHEMA_VERSION:
        raise BadMessage(f"{name}: unsupported schema version")
    data.pop("v")
    return data


@dataclass(frozen=True)
class InstanceReceived(_Message):
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    spool_name: str
    calling_aet: str = ""
    peer_host: str = ""
    received_at: str = ""
    routing_key = "instance.received"

    def stored(self, object_key: str, header: dict[str, Any]) -> InstanceStored:
        """The event storage announces once this instance is in S3 under ``object_key``."""
        return InstanceStored(
            sop_instance_uid=self.sop_instance_uid, sop_class_uid=self.sop_class_uid,
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            transfer_syntax=self.transfer_syntax, size=self.size, sha256=self.sha256,
            object_key=object_key, calling_aet=self.calling_aet,
            received_at=self.received_at, header=header)


@dataclass(frozen=True)
class InstanceStored(_Message):
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    object_key: str
    calling_aet: str = ""
    received_at: str = ""
    header: dict[str, Any] = field(default_factory=dict)
    routing_key = "instance.stored"


def batch_body(events: Sequence[_Message]) -> bytes:
    """One message body for several events of one kind: ``{"v": 1, "instances": [...]}``
    (a single event is sent as itself). The gateway and storage batch what they finish at
    about the same time: one publish, confirm and delivery for all."""
    if len(events) == 1:
        return events[0].to_bytes()
    return _dump({"v": SCHEMA_VERSION, "instances": [e.to_dict() for e in events]})


def read_batch(cls: type[M], body: bytes) -> list[M]:
    """The events of a message body of ``cls``, single or batched."""
    data = _load(cls.routing_key, body)
    if "instances" not in data:
        return [cls.from_dict(data)]
    items = data["instances"]
    if not isinstance(items, list) or not items or len(data) != 1:
        raise BadMessage(f"{cls.routing_key}: a batch needs a non-empty list and nothing else")
    return [cls.from_dict(item) for item in items]


@dataclass(frozen=True)
class MoveRequested(_Message):
    """A move job. ``identifier`` is the C-MOVE identifier as DICOM JSON (for "send study X":
    ``{"0020000D": {"vr": "UI", "Value": [X]}}`` with level STUDY); ``destination`` is the name
    of a node in ``remote_node``. A mover that takes the job after ``start_by`` (epoch seconds,
    0 = no limit) records it as expired instead of running it: its requester gave up."""

    job_id: str
    level: str
    identifier: dict[str, Any]
    destination: str
    origin: str = "c-move"            # "c-move" | "api" | "routing"
    requested_by_aet: str = ""
    requested_by_host: str = ""
    move_originator_message_id: int = 0
    requested_at: str = ""
    start_by: float = 0.0
    routing_key = "move.requested"


@dataclass(frozen=True)
class MoveProgress(_Message):
    """``state``: "running", then one of "done", "failed", "canceled", "expired"."""

    job_id: str
    state: str
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    error: str = ""
    routing_key = "move.progress"

    @property
    def final(self) -> bool:
        return self.state != "running"


@dataclass(frozen=True)
class MoveCancel(_Message):
    job_id: str
    routing_key = "move.cancel"


@dataclass(frozen=True)
class CommitmentRequested(_Message):
    """A storage commitment request the gateway has answered Success: the mover reports on
    ``refs`` ([SOP Class UID, SOP Instance UID] pairs, in request order) to the node at
    ``report_aet`` / ``report_host`` / ``report_port`` once every one is indexed, or once
    ``report_by`` (epoch seconds) has passed."""

    transaction_uid: str
    refs: list[list[str]]
    report_aet: str
    report_host: str
    report_port: int
    report_by: float
    requested_by_aet: str = ""
    requested_by_host: str = ""
    routing_key = "commitment.requested"
