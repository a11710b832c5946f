"""The native stack's SeaweedFS reads ``deploy/seaweedfs/master.toml``: it grows a bucket seven
volumes at a time, so the PUTs in flight wait ~1 s for a new volume once per ~7 GB written
instead of once per ~1 GB (``weed mini`` alone grows one)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from scripts.native import Stack


def volumes_of(stack: Stack, collection: str) -> int:
    """How many volumes SeaweedFS's master lists for ``collection`` (a bucket)."""
    url = f"http://127.0.0.1:{stack.config.s3_port + 1}/vol/status"
    with urllib.request.urlopen(url, timeout=30) as resp:
        status = json.load(resp)
    found = 0

    def walk(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            if "Id" in node and node.get("Collection") == collection:
                found += 1
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(status)
    return found


def test_the_bucket_was_grown_seven_volumes_at_once(stack: Stack) -> None:
    # storage's start-up probe wrote to the bucket, so it has grown once
    assert volumes_of(stack, stack.env["MINIPACS_S3_BUCKET"]) >= 7
