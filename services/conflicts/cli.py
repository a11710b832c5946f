"""``python -m services.conflicts``: the SOP Instance UIDs received again with other bytes
(``ingest_conflict``), for the admin to see what differed and to take either copy.

    list [--limit N] [--json]  the latest conflicts, newest first
    show ID                    one conflict: the two copies' headers compared, element by
                               element (the indexed copy and the other one)
    get ID FILE [--kept]       write the copy that is not indexed (with ``--kept``: the one
                               that is) to FILE, as stored (the dataset as received, in the
                               gateway's file meta): a DICOM file to open in a viewer or
                               send again (``storescu``; with ``MINIPACS_OVERWRITE_INSTANCES``
                               a copy sent again replaces the indexed one)

Whichever policy settled a conflict (keep-first, Orthanc's default; or overwrite), both copies
stay in S3 under their content-addressed keys: nothing here deletes. Orthanc drops the copy it
does not keep; minipacs keeps it, because the usual cause is a study sent again after a
correction at the modality (patient name, ID, accession), which keep-first would otherwise lose.

Exit status: 0 done; 1 no such conflict, a copy missing from S3, PostgreSQL or S3
unreachable; 2 a malformed command.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from minio import Minio
from minio.error import S3Error
from pydicom.datadict import keyword_for_tag

from shared import s3
from shared.columns import aligned
from shared.dicom import dataset_json, read_header
from shared.keys import object_key
from shared.lifecycle import settings_or_exit
from shared.settings import Common

HEAD_BYTES = 4 * 1024 * 1024  # read this much of each copy for its header; pixel data follows
COLUMNS = ("id, recorded_at, received_at, calling_aet, policy, sop_instance_uid, kept_sha256, "
           "rejected_sha256, rejected_key")
LIST = f"SELECT {COLUMNS} FROM ingest_conflict ORDER BY id DESC LIMIT $1"  # noqa: S608
ONE = f"SELECT {COLUMNS} FROM ingest_conflict WHERE id = $1"  # noqa: S608


class Refused(Exception):
    """What the admin asked for is not there (exit status 1)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.conflicts",
                                description="Instances received again with other bytes.")
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the latest conflicts, newest first")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    listing.add_argument("--json", action="store_true", help="one JSON object per conflict")
    show = sub.add_parser("show", help="compare the two copies' headers")
    show.add_argument("id", type=int)
    get = sub.add_parser("get", help="write one copy to a file")
    get.add_argument("id", type=int)
    get.add_argument("file", type=Path)
    get.add_argument("--kept", action="store_true", help="the indexed copy, not the other one")
    return p


# ---- pure: rows, values and differences as text --------------------------------------------

def as_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """A conflict row as ``list --json`` prints it."""
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def listing(rows: Sequence[Mapping[str, Any]]) -> str:
    """``list``: one aligned row per conflict; the copies by the start of their SHA-256."""
    out = [("ID", "RECORDED (UTC)", "FROM", "POLICY", "SOP INSTANCE UID", "INDEXED", "OTHER")]
    out += [(str(r["id"]), f"{r['recorded_at']:%Y-%m-%d %H:%M:%S}", r["calling_aet"] or "-",
             r["policy"], r["sop_instance_uid"], r["kept_sha256"][:12],
             r["rejected_sha256"][:12]) for r in rows]
    return aligned(out)


def render(element: Mapping[str, Any] | None) -> str:
    """One DICOM JSON element's value, as a line of text."""
    if element is None:
        return "(absent)"
    if "BulkDataURI" in element or "InlineBinary" in element:
        return f"({element.get('vr', '')} binary)"
    values = element.get("Value")
    if not values:
        return "(empty)"
    if element.get("vr") == "SQ":
        return f"({len(values)} item{'s' if len(values) != 1 else ''})"
    shown = [v.get("Alphabetic", "") if isinstance(v, dict) else str(v) for v in values]
    return "\\".join(shown)


@dataclass(frozen=True)
class Difference:
    tag: str  # DICOM JSON's form: "00100010"
    kept: str
    other: str

    @property
    def label(self) -> str:
        return f"({self.tag[:4]},{self.tag[4:]})"

    @property
    def keyword(self) -> str:
        return keyword_for_tag(int(self.tag, 16)) or "?"


def header_differences(kept: Mapping[str, Any], other: Mapping[str, Any]) -> list[Difference]:
    """Every element present in one header and not the other, or with another value
    (sequences compared whole), in tag order (pure)."""
    return [Difference(tag, render(kept.get(tag)), render(other.get(tag)))
            for tag in sorted(set(kept) | set(other)) if kept.get(tag) != other.get(tag)]


def report(row: Mapping[str, Any], differences: Sequence[Difference]) -> str:
    """``show``: the conflict, then its differences."""
    received = f"{row['received_at']:%Y-%m-%d %H:%M:%S} UTC" if row["received_at"] else "?"
    kept_is = ("the copy received first (keep-first)" if row["policy"] == "keep-first" else
               "the copy received last (overwrite)")
    lines = [f"conflict {row['id']}: SOP Instance UID {row['sop_instance_uid']}",
             f"  other copy received {received} from {row['calling_aet'] or '?'}",
             f"  indexed: {kept_is}, sha256 {row['kept_sha256']}",
             f"  other:   sha256 {row['rejected_sha256']} (kept in S3: get {row['id']} FILE)",
             ""]
    if not differences:
        lines.append("The headers are the same: the copies differ in pixel data or in binary "
                     "values.")
    else:
        lines.append(aligned([("TAG", "KEYWORD", "INDEXED COPY", "OTHER COPY"),
                            *[(d.label, d.keyword, d.kept, d.other) for d in differences]]))
    return "\n".join(lines)


# ---- commands ---------------------------------------------------------------------------------

def header_of(client: Minio, bucket: str, key: str) -> dict[str, Any]:
    """The DICOM JSON header of a stored copy, from its first ``HEAD_BYTES``."""
    try:
        response = client.get_object(bucket, key, offset=0, length=HEAD_BYTES)
        try:
            head = response.read()
        finally:
            response.close()
            response.release_conn()
    except S3Error as exc:
        raise Refused(f"copy {key} cannot be read from S3: {exc.code}") from None
    try:
        return dataset_json(read_header(io.BytesIO(head)))
    except Exception as exc:  # a header longer than HEAD_BYTES, or unreadable
        raise Refused(f"copy {key}: header not readable in its first {HEAD_BYTES} bytes "
                      f"({type(exc).__name__})") from None


def fetch(client: Minio, bucket: str, key: str, target: Path) -> None:
    try:
        with target.open("wb") as fp:
            s3.download_to(client, bucket, key, fp)
    except S3Error as exc:
        target.unlink(missing_ok=True)
        raise Refused(f"copy {key} cannot be read from S3: {exc.code}") from None


async def conflict(conn: asyncpg.Connection, conflict_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(ONE, conflict_id)
    if row is None:
        raise Refused(f"there is no conflict {conflict_id}")
    return row


async def run(args: argparse.Namespace, settings: Common, conn: asyncpg.Connection) -> None:
    bucket = settings.s3_bucket
    if args.command == "list":
        rows = await conn.fetch(LIST, args.limit)
        if args.json:
            print(json.dumps([as_dict(dict(r)) for r in rows], indent=2))
        elif rows:
            print(listing(rows))
        else:
            print("no conflicts")
        return
    row = await conflict(conn, args.id)
    kept_key = object_key(row["kept_sha256"])
    client = s3.client(settings)
    if args.command == "show":
        kept, other = await asyncio.gather(
            asyncio.to_thread(header_of, client, bucket, kept_key),
            asyncio.to_thread(header_of, client, bucket, row["rejected_key"]))
        print(report(row, header_differences(kept, other)))
    else:
        key = kept_key if args.kept else row["rejected_key"]
        await asyncio.to_thread(fetch, client, bucket, key, args.file)
        print(f"wrote the {'indexed' if args.kept else 'other'} copy of conflict {args.id} "
              f"to {args.file}")


async def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed why
        return int(exc.code or 0)
    if getattr(args, "limit", 1) < 1:
        print("conflicts: --limit must be at least 1", file=sys.stderr)
        return 2
    settings = settings_or_exit(Common, "conflicts")
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"conflicts: cannot reach PostgreSQL (MINIPACS_DATABASE_URL): {exc}",
              file=sys.stderr)
        return 1
    try:
        await run(args, settings, conn)
    except Refused as exc:
        print(f"conflicts: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # S3 unreachable, or FILE not writable
        print(f"conflicts: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    return 0
