"""Versioned message schemas. Every message body is JSON with ``"v"`` (schema version).

instance.received v1  gateway/api -> storage   the bytes wait in the spool (claim check)
instance.stored   v1  storage -> indexer       the object is in S3 and verified
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Self

SCHEMA_VERSION = 1


class BadMessage(ValueError):
    """A message body that no version of our schemas can read: it goes to the dead-letter queue."""


class _Message:
    routing_key: str = ""

    def to_bytes(self) -> bytes:
        body = {"v": SCHEMA_VERSION, **asdict(self)}  # type: ignore[call-overload]
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> Self:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadMessage(f"{cls.__name__}: body is not JSON") from exc
        if not isinstance(data, dict) or data.get("v") != SCHEMA_VERSION:
            raise BadMessage(f"{cls.__name__}: unsupported schema version")
        data.pop("v")
        try:
            return cls(**data)
        except TypeError as exc:
            raise BadMessage(f"{cls.__name__}: {exc}") from exc


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
