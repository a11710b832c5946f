"""UID validation and object keys. No key is ever built from an unvalidated tag value."""

from __future__ import annotations

import re

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_LOOSE_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")  # all patterns here: fullmatch ('$' lets "\n" in)


class InvalidUID(ValueError):
    """A UID is empty, too long, or has characters outside ``[0-9.]``."""


def validate_uid(value: object, what: str = "UID") -> str:
    """Return the UID if it is a well-formed DICOM UID, else raise ``InvalidUID``.

    Leading zeros in a component are tolerated (many modalities send them), anything
    outside ``[0-9.]``, empty components or more than 64 characters are not.
    """
    if not isinstance(value, str):
        raise InvalidUID(f"{what} is missing")
    uid = value.rstrip("\x00 ")
    if not uid:
        raise InvalidUID(f"{what} is empty")
    if len(uid) > 64:
        raise InvalidUID(f"{what} is longer than 64 characters")
    if not _LOOSE_UID.fullmatch(uid):
        raise InvalidUID(f"{what} has characters outside [0-9.] or empty components")
    return uid


def is_strict_uid(uid: str) -> bool:
    return bool(_UID.fullmatch(uid))


def object_key(sha256: str) -> str:
    """Content-addressed key of a stored instance: identical bytes, identical key."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError("object key needs a lowercase hex SHA-256")
    return f"instances/{sha256[:2]}/{sha256}.dcm"
