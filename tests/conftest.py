"""Fixtures: an isolated native stack (own database, RabbitMQ vhost, S3 store, ports)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio import Minio

from scripts.native import (
    Stack,
    StackConfig,
    drop_database,
    drop_vhost,
    free_port,
    free_port_block,
)
from shared.cache import entry_name

# DCMTK's default calling AE titles, and ours for pynetdicom clients, all from loopback.
TEST_NODES = {
    "storescu": ["STORESCU", "127.0.0.1", 104],
    "echoscu": ["ECHOSCU", "127.0.0.1", 104],
    "findscu": ["FINDSCU", "127.0.0.1", 104],
    "movescu": ["MOVESCU", "127.0.0.1", 104],
    "getscu": ["GETSCU", "127.0.0.1", 104],
    "testscu": ["TESTSCU", "127.0.0.1", 104],
    # may echo and query, not store or retrieve (Orthanc's Allow* flags)
    "readonly": {"AET": "READONLY", "Host": "127.0.0.1", "Port": 104, "AllowStore": False,
                 "AllowMove": False, "AllowGet": False},
    # known, but only from another host: used to prove the host check
    "elsewhere": ["ELSEWHERE", "127.0.0.2", 104],
}


def make_stack(tmp: Path, name: str, **env: str) -> Stack:
    tag = f"{name}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    s3_port = free_port_block()
    config = StackConfig(
        base_dir=tmp / tag,
        gateway_port=free_port(),
        s3_port=s3_port,
        database=f"minipacs_{tag}",
        vhost=f"minipacs_{tag}",
        log_to_files=True,
        extra_env={
            "MINIPACS_ALLOW_LIST": "true",
            "MINIPACS_NODES": json.dumps(TEST_NODES),
            "MINIPACS_LOG_LEVEL": "INFO",
            **env,
        },
    )
    return Stack(config)


def teardown(stack: Stack) -> None:
    """Stop the services, then the S3 store with SIGKILL: its data is thrown away, and
    SeaweedFS sometimes takes over 30 s to stop on SIGTERM."""
    s3 = stack.procs.pop("s3", None)
    stack.stop()
    if s3 is not None and s3.poll() is None:
        s3.kill()
        s3.wait(30)
    drop_database(stack.config.database)
    drop_vhost(stack.config.vhost)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("stack"), "main")
    s.start()
    yield s
    teardown(s)


@pytest.fixture()
def private_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of the test's own, for tests that kill or restart its parts."""
    s = make_stack(tmp_path, "own")
    s.start()
    yield s
    teardown(s)


def s3_client(stack: Stack) -> Minio:
    return Minio(f"127.0.0.1:{stack.config.s3_port}", access_key="minipacs",
                 secret_key="minipacs-secret", secure=False)


def hot_copy(stack: Stack, object_key: str) -> Path:
    """Where the hot cache (``shared/cache.py``) keeps the copy of ``object_key``."""
    name = entry_name(object_key)
    assert name is not None, object_key
    return Path(stack.config.base_dir) / "spool" / "cache" / name


def dsn(stack: Stack) -> str:
    return f"postgresql://minipacs@127.0.0.1:5432/{stack.config.database}"


@pytest.fixture(scope="session")
def datadir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture()
def chunked_send() -> Iterator[None]:
    """pynetdicom sends files byte for byte as they are (no decode / re-encode), so the bytes
    on the wire are exactly the file's (malformed UIDs, truncation, other transfer syntaxes)."""
    from pynetdicom import _config

    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before
