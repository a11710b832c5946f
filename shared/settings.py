"""Typed settings, read once from the environment (prefix ``MINIPACS_``).

Each service builds its own settings object in its ``__main__`` with ``X.from_env()``;
nothing here is built at import time. Secrets are masked by ``masked()`` for logging.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

from shared import crash

PREFIX = "MINIPACS_"
_SECRET = re.compile(r"(password|secret|key|url|dsn)$", re.I)
_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5 AE VR: no backslash, no control
_HOST = re.compile(r"[A-Za-z0-9_.:%-]{1,253}|\*")  # a name, IPv4 / IPv6 address, or any host

OPERATIONS = frozenset({"echo", "store", "find", "move", "get"})


LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # any case


class SettingsError(ValueError):
    """A setting in the environment has a value we cannot use."""


@dataclass(frozen=True)
class Node:
    """A remote DICOM node, as in Orthanc's ``DicomModalities``."""

    name: str
    aet: str
    host: str
    port: int
    allow: frozenset[str] = OPERATIONS

    def may(self, operation: str) -> bool:
        return operation in self.allow


def validate_aet(aet: str) -> str:
    aet = aet.strip()
    if not _AET.fullmatch(aet):
        raise SettingsError(f"invalid AE title {aet!r}: 1-16 printable characters, no backslash")
    return aet


def parse_nodes(raw: str) -> dict[str, Node]:
    """Parse ``MINIPACS_NODES``: a JSON object shaped like Orthanc's ``DicomModalities``.

    Both of Orthanc's forms are accepted::

        {"archive": ["ARCHIVE", "127.0.0.1", 4242]}
        {"ct": {"AET": "CT1", "Host": "10.0.0.5", "Port": 104,
                "AllowFind": false, "AllowMove": false}}
    """
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"MINIPACS_NODES is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError("MINIPACS_NODES must be a JSON object of name -> node")
    return {str(name): parse_node(str(name), spec) for name, spec in data.items()}


def parse_node(name: str, spec: object) -> Node:
    """One entry of Orthanc's ``DicomModalities``: ``[AET, host, port]`` or
    ``{"AET": ..., "Host": ..., "Port": ..., "AllowStore": false, ...}``."""
    allow = set(OPERATIONS)
    if isinstance(spec, list) and len(spec) >= 3:
        aet, host, port = spec[0], spec[1], spec[2]
    elif isinstance(spec, dict) and {"AET", "Host", "Port"} <= spec.keys():
        aet, host, port = spec["AET"], spec["Host"], spec["Port"]
        for op in OPERATIONS:
            key = "Allow" + op.capitalize()
            if key in spec and not spec[key]:
                allow.discard(op)
    else:
        raise SettingsError(f"node {name!r}: expected [AET, host, port] or {{AET, Host, Port}}")
    try:
        port = int(port)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"node {name!r}: port {port!r} is not a number") from exc
    if not 0 < port < 65536:
        raise SettingsError(f"node {name!r}: port {port} out of range")
    host = str(host).strip()
    if not _HOST.fullmatch(host):
        raise SettingsError(f"node {name!r}: host {host!r} is not a host name, an address or *")
    return Node(name, validate_aet(str(aet)), host, port, frozenset(allow))


def _convert(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind in (bool, "bool"):
            value = raw.strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (Path, "Path"):
            return Path(raw)
    except ValueError as exc:
        raise SettingsError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw


class EnvSettings:
    """Mixin: ``from_env`` fills every simple field from ``MINIPACS_<FIELD>``."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = PREFIX + f.name.upper()
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif key in env and f.type in (str, int, float, bool, Path,
                                            "str", "int", "float", "bool", "Path"):
                values[f.name] = _convert(f.name, env[key], f.type)
        obj = cls(**values)
        return obj.finish(env)

    def finish(self, env: Mapping[str, str]) -> Self:
        """Hook for fields that need more than a type conversion."""
        return self

    def masked(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if _SECRET.search(f.name) and isinstance(value, str):
                value = re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", value)
                if f.name.endswith(("password", "secret", "key")):
                    value = "***"
            out[f.name] = value if isinstance(value, str | int | float | bool) else str(value)
        return out


@dataclass(frozen=True)
class Common(EnvSettings):
    """Settings every service shares."""

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql://minipacs@127.0.0.1:5432/minipacs"
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "minipacs"
    s3_secret_key: str = "minipacs-secret"  # noqa: S105 - dev default, as in .env
    s3_bucket: str = "minipacs"
    s3_secure: bool = False
    s3_region: str = "us-east-1"  # what requests are signed for (MinIO's and SeaweedFS' default)
    spool_dir: Path = Path("/var/lib/minipacs/spool")
    cache_mb: int = 1024  # hot copies for C-MOVE / C-GET on the spool's disk (0: off)
    log_level: str = "INFO"
    confirm_timeout: float = 10.0
    startup_timeout: float = 60.0
    heartbeat_file: str = ""
    crash_at: str = ""  # fault tests only: the process kills itself there (shared/crash.py)

    def __post_init__(self) -> None:
        try:
            crash.parse(self.crash_at)
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}CRASH_AT: {exc}") from exc
        # a typo ("TRAC") would otherwise log at INFO without a word
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"{PREFIX}LOG_LEVEL={self.log_level!r} is not one of "
                                + ", ".join(LOG_LEVELS))


MAX_PDU_LIMIT = 64 * 1024 * 1024  # the largest maximum PDU the gateway offers


@dataclass(frozen=True)
class GatewaySettings(Common):
    gateway_aet: str = "MINIPACS"
    gateway_host: str = "0.0.0.0"
    gateway_port: int = 11112
    max_associations: int = 32
    max_pdu: int = 1048576
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    require_called_aet: bool = True
    allow_list: bool = False
    check_host: bool = True
    nodes: dict[str, Node] = field(default_factory=dict)
    db_pool_size: int = 8              # PostgreSQL connections for C-FIND / retrieve look-ups
    find_limit: int = 1000             # C-FIND matches sent at most (then 0xA700); 0: no limit
    find_timeout: float = 30.0         # the index query of one C-FIND
    find_pn_ignore_case: bool = True   # PN matching ignores case, as Orthanc's default
    move_start_timeout: float = 10.0   # no mover took the C-MOVE job by then: 0xA702
    move_idle_timeout: float = 60.0    # no progress from the mover for this long: 0xA702
    commit_timeout: float = 60.0       # storage commitment: wait this long for the index
    announce_batch: int = 16           # instance.received events per message at most
    announce_linger_ms: float = 2.0    # wait this long at most for C-STOREs on their way
    gateway_processes: int = 1         # processes sharing the DICOM port (gateway/workers.py)

    def finish(self, env: Mapping[str, str]) -> Self:
        if self.gateway_processes < 1:
            raise SettingsError(f"{PREFIX}GATEWAY_PROCESSES must be 1 or more, "
                             f"not {self.gateway_processes}")
        if not 0 < self.max_pdu <= MAX_PDU_LIMIT:  # 0 would tell peers "unlimited"
            raise SettingsError(f"{PREFIX}MAX_PDU must be from 1 to {MAX_PDU_LIMIT} bytes (each "
                                f"association holds one PDU in memory), not {self.max_pdu}")
        return replace(
            self,
            gateway_aet=validate_aet(self.gateway_aet),
            nodes=parse_nodes(env.get(PREFIX + "NODES", "")) if not self.nodes else self.nodes,
        )


@dataclass(frozen=True)
class StorageSettings(Common):
    prefetch: int = 64
    concurrency: int = 32
    part_size: int = 16 * 1024 * 1024
    sweep_after: float = 3600.0   # s: staging files of cut-off transfers are removed after this
    unconfirmed_after: float = 300.0  # s: a ready file never confirmed is announced again
    announce_batch: int = 32      # instance.stored events per message at most
    # ms an instance.stored event waits for others to share its message (20 ms: 2.8-3.0 events
    # per message at 4 x storescu became 5.8-6.9, and broker + storage + indexer CPU fell ~17 %)
    stored_linger_ms: float = 20.0


@dataclass(frozen=True)
class IndexerSettings(Common):
    batch_size: int = 200
    batch_wait: float = 0.02
    # a SOP Instance UID received again with other bytes: false keeps the first copy, true the
    # one received last (Orthanc's "OverwriteInstances"); the other is recorded either way
    overwrite_instances: bool = False


@dataclass(frozen=True)
class MoverSettings(Common):
    gateway_aet: str = "MINIPACS"   # the calling AE title of our C-STORE sub-operations
    jobs: int = 4                   # move jobs run at the same time
    associations: int = 4           # parallel associations to the destination, per job
    max_pdu: int = 1048576
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    progress_every: float = 0.0     # s between progress messages (at least 0.1; final: always)
    keepalive_every: float = 5.0    # a progress message at least this often, even unchanged
    # the gateway's setting of the same name: a C-MOVE job interrupted (its mover stopped) for
    # longer than this has lost its requester, so it is recorded failed, not resumed
    move_idle_timeout: float = 60.0
    # s a mover told to stop (SIGTERM) lets its running jobs go on; then each stops after the
    # instance in flight and goes back to its queue, resumed by the next mover (compose's
    # stop_grace_period for the mover, 60 s, leaves room for this and that last instance)
    stop_grace: float = 30.0

    def finish(self, env: Mapping[str, str]) -> Self:
        return replace(self, gateway_aet=validate_aet(self.gateway_aet))
