"""The raw S3 client's pure parts: its Signature V4 must be the one the minio client computes
(minio's signer is the reference: it is what MinIO and SeaweedFS accept from our services)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from minio.credentials.credentials import Credentials
from minio.signer import sign_v4_s3

from shared.s3http import EMPTY_SHA256, object_path, sigv4


@pytest.mark.parametrize(("method", "headers", "payload"), [
    ("GET", {}, EMPTY_SHA256),
    ("PUT", {"Content-Type": "application/dicom", "Content-Length": "530000",
             "x-amz-meta-sha256": "ab" * 32, "x-amz-checksum-sha256": "q83vEjRWeJA=",
             "x-amz-sdk-checksum-algorithm": "SHA256"}, hashlib.sha256(b"x").hexdigest()),
])
def test_sigv4_matches_the_minio_signer(method: str, headers: dict[str, str],
                                        payload: str) -> None:
    now = datetime(2026, 11, 26, 13, 45, 7, tzinfo=UTC)
    host = "127.0.0.1:8333"
    path = object_path("minipacs", "instances/ab/" + "ab" * 32 + ".dcm")
    ours = sigv4(method, host, path, headers, payload, "minipacs", "minipacs-secret",
                 "us-east-1", now)
    theirs = sign_v4_s3(
        method=method, url=urlsplit(f"http://{host}{path}"), region="us-east-1",
        headers={**headers, "Host": host, "x-amz-date": "20261126T134507Z",
                 "x-amz-content-sha256": payload},
        credentials=Credentials("minipacs", "minipacs-secret"), content_sha256=payload,
        date=now.replace(tzinfo=None))
    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["x-amz-content-sha256"] == payload and ours["x-amz-date"] == "20261126T134507Z"


def test_sigv4_changes_with_every_signed_input() -> None:
    now = datetime(2026, 11, 26, 13, 45, 7, tzinfo=UTC)
    base = ("PUT", "h:1", "/b/k", {"x-amz-meta-sha256": "a"}, EMPTY_SHA256, "id", "secret",
            "us-east-1", now)
    signature = sigv4(*base)["Authorization"]
    for i, other in [(2, "/b/k2"), (3, {"x-amz-meta-sha256": "b"}), (4, "0" * 64),
                     (6, "other"), (7, "eu-west-1")]:
        changed = list(base)
        changed[i] = other
        assert sigv4(*changed)["Authorization"] != signature  # type: ignore[arg-type]


def test_object_path_encodes_everything_but_the_key_structure() -> None:
    assert object_path("minipacs", "instances/ab/x y+z.dcm") == \
        "/minipacs/instances/ab/x%20y%2Bz.dcm"
