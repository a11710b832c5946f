"""The S3 object store (MinIO in compose, SeaweedFS natively) through the ``minio`` client.

The client is synchronous; services call these functions through ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import uuid
from typing import IO, BinaryIO

from minio import Minio
from minio.error import S3Error

from shared.s3http import RawS3, S3Refused
from shared.settings import Common

log = logging.getLogger("minipacs.s3")

SHA_META = "sha256"
CHECKSUM_HEADER = "x-amz-checksum-sha256"
# what S3 (MinIO, SeaweedFS, AWS) answers when a body does not hash to what the request says
DIGEST_REFUSALS = ("BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest",
                   "XAmzContentSHA256Mismatch")


class VerifyFailed(RuntimeError):
    """The object in S3 does not match the bytes we meant to store."""


def client(settings: Common) -> Minio:
    return Minio(settings.s3_endpoint, access_key=settings.s3_access_key,
                 secret_key=settings.s3_secret_key, secure=settings.s3_secure,
                 region=settings.s3_region)


def ensure_bucket(s3: Minio, bucket: str) -> None:
    if not s3.bucket_exists(bucket):
        try:
            s3.make_bucket(bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


PROBE_PREFIX = "probe/"  # outside ``instances/``: never the key of a stored instance


def probe_write(s3: Minio, bucket: str) -> None:
    """PUT a few bytes under a key of our own (``probe/`` + a random UUID: no tag value) and
    DELETE them again: fails at start-up, with S3's own error, where the bucket cannot be
    written (credentials, policy, a full or read-only store) instead of at the first instance.
    It also takes the S3 store's first-write cost out of the first study: SeaweedFS grows its
    volumes on a bucket's first PUT, and PUTs arriving meanwhile waited up to a second
    (``bench/findable.py``)."""
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    body = b"minipacs storage write probe\n"
    s3.put_object(bucket, key, io.BytesIO(body), len(body), content_type="text/plain")
    try:
        s3.remove_object(bucket, key)
    except S3Error as exc:  # written, so the store works; a WORM bucket may refuse this
        log.warning("S3 write probe %s could not be removed (%s): harmless, delete it by hand",
                    key, exc.code)


class HashingReader:
    """Wraps a file: whatever the S3 client reads is hashed on the way."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5()  # noqa: S324 - compared with S3's ETag, not for security
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fp.read(n)
        self.sha.update(data)
        self.md5.update(data)
        self.count += len(data)
        return data


def stored_size(s3: Minio, bucket: str, key: str, sha256: str) -> int | None:
    """Size of ``key`` if it exists and was stored with this SHA-256, else None."""
    try:
        stat = s3.stat_object(bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            return None
        raise
    meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
    if meta.get("x-amz-meta-" + SHA_META) != sha256:
        return None
    return stat.size


def download_to(s3: Minio, bucket: str, key: str, fp: IO[bytes],
                chunk: int = 1024 * 1024) -> None:
    """Stream an object into an open file, ``chunk`` bytes at a time (bounded memory)."""
    response = s3.get_object(bucket, key)
    try:
        for data in response.stream(chunk):
            fp.write(data)
    except BaseException:
        response.close()  # a half-read connection cannot be reused
        raise
    finally:
        response.release_conn()  # after a complete read: back to the pool, kept alive
    fp.flush()


def read_object(s3: Minio, bucket: str, key: str, limit: int) -> bytes:
    """A whole object as one ``bytes`` (one read, no chunk list); refuses objects over
    ``limit`` bytes, so memory stays bounded. The HTTP connection goes back to the client's
    pool for the next request (closing the response would close the connection)."""
    response = s3.get_object(bucket, key)
    try:
        length = int(response.headers.get("Content-Length", "-1"))
        if length > limit:
            raise ValueError(f"object {key}: {length} bytes, over the {limit} in-memory limit")
        data = response.read() if length >= 0 else response.read(limit + 1)
    except BaseException:
        response.close()
        response.release_conn()
        raise
    response.release_conn()
    if len(data) > limit:
        raise ValueError(f"object {key}: over the {limit} in-memory limit")
    return data


def put_verified(s3: Minio, bucket: str, key: str, fp: BinaryIO, size: int, sha256: str,
                 part_size: int, raw: RawS3 | None = None) -> str:
    """Store ``size`` bytes from ``fp`` under ``key`` and verify them against ``sha256`` (the
    hash the gateway took of the bytes it received). Memory is bounded by ``part_size``.

    - Up to ``part_size`` (one PUT): the request carries ``x-amz-checksum-sha256``; S3 (MinIO,
      SeaweedFS) refuses a body that does not hash to it and echoes it when stored, so spool
      and transfer are checked without hashing here. A store that does not echo it gets the
      local check: our SHA-256 of the bytes, and its ETag against our MD5. With ``raw`` (an
      ``http://`` endpoint) the PUT also signs ``sha256`` as the payload hash, which S3
      checks too, and skips the minio client's own hashing of the body.
    Returns which check it was: "checksum", "etag" or "multipart".
    - Larger (multipart): the bytes are hashed as they are read, and a HEAD checks size and
      checksum afterwards."""
    if size <= part_size:
        data = fp.read(size + 1)
        if len(data) != size:
            raise VerifyFailed("the spooled file's size differs from the message's")
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        fields = {"Content-Type": "application/dicom", "x-amz-meta-" + SHA_META: sha256,
                  CHECKSUM_HEADER: checksum, "x-amz-sdk-checksum-algorithm": "SHA256"}
        try:
            if raw is not None:
                headers = raw.put(key, data, sha256, fields)
                etag = headers.get("etag", "")
            else:
                result = s3.put_object(bucket, key, io.BytesIO(data), size,
                                       content_type="application/dicom",
                                       metadata={SHA_META: sha256, CHECKSUM_HEADER: checksum,
                                                 "x-amz-sdk-checksum-algorithm": "SHA256"})
                headers = {k.lower(): v for k, v in (result.http_headers or {}).items()}
                etag = result.etag or ""
        except (S3Error, S3Refused) as exc:
            if exc.code in DIGEST_REFUSALS:
                raise VerifyFailed("the spooled bytes do not hash to the SHA-256 in the "
                                   f"message (S3 said {exc.code})") from exc
            raise
        if headers.get(CHECKSUM_HEADER) == checksum:
            return "checksum"
        md5 = hashlib.md5(data).hexdigest()  # noqa: S324 - compared with S3's ETag
        if hashlib.sha256(data).hexdigest() != sha256:
            s3.remove_object(bucket, key)
            raise VerifyFailed("the spooled bytes do not hash to the SHA-256 in the message")
        if etag.strip('"').lower() != md5:
            raise VerifyFailed("S3 received bytes whose MD5 differs from what was sent")
        return "etag"
    reader = HashingReader(fp)
    s3.put_object(bucket, key, reader, size,  # type: ignore[arg-type]
                  content_type="application/dicom", metadata={SHA_META: sha256},
                  part_size=part_size)
    if reader.sha.hexdigest() != sha256 or reader.count != size:
        s3.remove_object(bucket, key)
        raise VerifyFailed("the spooled bytes do not hash to the SHA-256 in the message")
    if stored_size(s3, bucket, key, sha256) != size:
        raise VerifyFailed("the stored object's size or checksum differs after upload")
    return "multipart"
