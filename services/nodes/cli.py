"""``python -m services.nodes``: the remote nodes (Orthanc's ``DicomModalities``) at run time.

    list [--json]       every node: name, AE title, host, port, what it may do, where it is from
    put NAME SPEC       add or change a node; SPEC is an Orthanc DicomModalities entry in JSON:
                        '["ARCHIVE", "10.0.0.9", 4242]' or
                        '{"AET": "CT1", "Host": "ct.local", "Port": 104, "AllowMove": false}'
    delete NAME         remove a node added here
    send NAME STUDY...  send studies to the node, as Orthanc's ``POST /modalities/{id}/store``:
                        one move job per study, run by the mover; waits for each and prints
                        its counts
    echo NAME           C-ECHO the node as minipacs (calling AE: MINIPACS_GATEWAY_AET), as
                        Orthanc's ``POST /modalities/{id}/echo``: can we reach it, does it
                        take our AE title?

As Orthanc's ``PUT`` / ``DELETE /modalities/{id}``. The gateway's allow-list takes a change
within a second (PostgreSQL ``NOTIFY``), C-MOVE destinations and move jobs at their next use;
nothing restarts. Nodes from ``MINIPACS_NODES`` are changed there, not here.

Exit status: 0 done, 1 refused (a node from the settings, no such node or study), PostgreSQL
or RabbitMQ unreachable, the node did not answer the C-ECHO with Success, or a study was not
sent whole, 2 a malformed command, SPEC or UID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from shared import broker, nodes
from shared.columns import aligned
from shared.keys import InvalidUID, validate_uid
from shared.lifecycle import StartupFailed, settings_or_exit
from shared.messages import MoveRequested
from shared.settings import Common, MoverSettings, Node, SettingsError, parse_node

ORDER = ("echo", "store", "find", "move", "get")  # shared.settings.OPERATIONS, in order
ORIGIN = {"settings": "MINIPACS_NODES", "api": "run time",
          "api-over-settings": "run time, over MINIPACS_NODES"}


class Usage(Exception):
    """A malformed command line or node SPEC (exit status 2)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.nodes",
                                description="Remote DICOM nodes, changed at run time.")
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="every node")
    listing.add_argument("--json", action="store_true",
                         help="as a MINIPACS_NODES / DicomModalities JSON object")
    put = sub.add_parser("put", help="add or change a node")
    put.add_argument("name")
    put.add_argument("spec", help='["AET", "host", port] or {"AET":..., "Host":..., "Port":...}')
    delete = sub.add_parser("delete", help="remove a node added at run time")
    delete.add_argument("name")
    send = sub.add_parser("send", help="send studies to a node (one move job each)")
    send.add_argument("name")
    send.add_argument("studies", nargs="+", metavar="STUDY_INSTANCE_UID")
    send.add_argument("--timeout", type=float, default=3600.0,
                      help="seconds to wait for each job (default 3600)")
    echo = sub.add_parser("echo", help="C-ECHO a node as minipacs")
    echo.add_argument("name")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return p


def node_from(name: str, spec: str) -> Node:
    """The node ``put NAME SPEC`` asks for (pure)."""
    try:
        nodes.validate_name(name)
        return parse_node(name, json.loads(spec))
    except json.JSONDecodeError as exc:
        raise Usage(f"SPEC for {name!r} is not JSON: {exc}") from exc
    except (SettingsError, nodes.NodeRefused) as exc:
        raise Usage(str(exc)) from exc


def allowed(node: Node) -> str:
    return ",".join(op for op in ORDER if node.may(op)) or "-"


def table(found: Mapping[str, Node], origin: Mapping[str, str]) -> str:
    """``list``: one aligned row per node (pure)."""
    rows = [("NAME", "AET", "HOST", "PORT", "ALLOWS", "FROM")]
    rows += [(n.name, n.aet, n.host, str(n.port), allowed(n),
              ORIGIN.get(origin.get(n.name, ""), "?")) for n in found.values()]
    return aligned(rows)


def as_modalities(found: Mapping[str, Node]) -> dict[str, Any]:
    """``list --json``: Orthanc's object form, which ``put`` and ``MINIPACS_NODES`` read back."""
    return {n.name: {"AET": n.aet, "Host": n.host, "Port": n.port,
                     **{"Allow" + op.capitalize(): n.may(op) for op in ORDER}}
            for n in found.values()}


def c_echo(node: Node, calling: str, timeout: float) -> str | None:
    """C-ECHO ``node`` as ``calling`` (blocking): None if it answered Success, else what went
    wrong, in words."""
    if node.host == "*":
        return "its host is '*' (any): there is no address to call"
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    if assoc.is_rejected:
        return f"it rejected the association (called {node.aet!r}, calling {calling!r})"
    if not assoc.is_established:
        return "no association: connection refused, aborted or timed out"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        return "no answer to the C-ECHO"
    code = int(status.Status)
    return None if code == 0 else f"it answered the C-ECHO with status 0x{code:04X}"


async def echo(conn: asyncpg.Connection, name: str, seconds: float) -> int:
    node = await nodes.by_name(conn, name)
    if node is None:
        raise nodes.NodeRefused(f"there is no node {name!r}")
    calling = settings_or_exit(MoverSettings, "nodes").gateway_aet
    started = time.monotonic()
    problem = await asyncio.to_thread(c_echo, node, calling, seconds)
    where = f"node {name} ({node.aet}@{node.host}:{node.port})"
    if problem:
        print(f"nodes: {where}: {problem}", file=sys.stderr)
        return 1
    print(f"{where}: C-ECHO Success ({(time.monotonic() - started) * 1000:.0f} ms)")
    return 0


STUDY_SIZE = """
SELECT count(*) FROM instance i JOIN series se ON se.id = i.series_fk
JOIN study st ON st.id = se.study_fk WHERE st.study_instance_uid = $1"""

JOB = "SELECT state, total, completed, failed, warning, error FROM move_job WHERE id = $1"
TAKEN_WITHIN = 30.0  # s: no mover has taken the job by then: say so (it stays queued)


def study_job(study_uid: str, destination: str) -> MoveRequested:
    """The move job ``send`` puts on the broker for one study (pure)."""
    return MoveRequested(job_id=str(uuid.uuid4()), level="STUDY",
                         identifier={"0020000D": {"vr": "UI", "Value": [study_uid]}},
                         destination=destination, origin="api", requested_by_aet="",
                         requested_at=datetime.now(UTC).isoformat())


def outcome(row: Mapping[str, Any]) -> str:
    """One finished job in words (pure)."""
    words = (f"{row['state']}: {row['completed']} of {row['total']} sent, {row['failed']} "
             f"failed, {row['warning']} with a warning")
    return f"{words} ({row['error']})" if row["error"] else words


async def send(conn: asyncpg.Connection, settings: Common, name: str, studies: list[str],
               seconds: float) -> int:
    if await nodes.by_name(conn, name) is None:
        raise nodes.NodeRefused(f"there is no node {name!r}")
    missing = [uid for uid in studies if not await conn.fetchval(STUDY_SIZE, uid)]
    if missing:
        raise nodes.NodeRefused("not in the index: study " + ", ".join(missing))
    try:
        connection = await broker.connect(settings.amqp_url, 10, name="minipacs-nodes-send")
    except StartupFailed as exc:
        print(f"nodes: {exc}", file=sys.stderr)
        return 1
    whole = True
    try:
        publisher = broker.Publisher(connection, settings.confirm_timeout)
        await publisher.open()
        for uid in studies:
            job = study_job(uid, name)
            await publisher.publish(job)
            row = await last_state(conn, job.job_id, seconds)
            if row is not None and row["state"] != "running":
                print(f"study {uid} -> {name}: {outcome(row)}")
                whole = whole and row["state"] == "done" and row["failed"] == 0
                continue
            whole = False
            if row is None:
                print(f"nodes: study {uid} -> {name}: no mover took job {job.job_id} within "
                      f"{min(seconds, TAKEN_WITHIN):.0f} s (is the mover running?); it stays "
                      "queued and runs when one does", file=sys.stderr)
            else:
                print(f"nodes: study {uid} -> {name}: job {job.job_id} still running after "
                      f"{seconds:.0f} s ({row['completed']} of {row['total']} sent); it goes "
                      "on: see move_job and the mover's log", file=sys.stderr)
    finally:
        await connection.close()
    return 0 if whole else 1


async def last_state(conn: asyncpg.Connection, job_id: str,
                     seconds: float) -> asyncpg.Record | None:
    """The job's row once the mover has finished it, or as it was after ``seconds``; None if
    no mover took the job within ``TAKEN_WITHIN`` seconds."""
    started = time.monotonic()
    while True:
        row = await conn.fetchrow(JOB, uuid.UUID(job_id))
        if row is not None and row["state"] != "running":
            return row
        waited = time.monotonic() - started
        if waited > seconds or (row is None and waited > min(seconds, TAKEN_WITHIN)):
            return row
        await asyncio.sleep(0.2)


async def main(argv: list[str]) -> int:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # echo says what went wrong
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed why
        return int(exc.code or 0)
    try:
        wanted = node_from(args.name, args.spec) if args.command == "put" else None
        for uid in getattr(args, "studies", []):
            validate_uid(uid, f"Study Instance UID {uid!r}")
    except InvalidUID as exc:
        print(f"nodes: {exc}", file=sys.stderr)
        return 2
    except Usage as exc:
        print(f"nodes: {exc}", file=sys.stderr)
        return 2
    settings = settings_or_exit(Common, "nodes")
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"nodes: cannot reach PostgreSQL (MINIPACS_DATABASE_URL): {exc}", file=sys.stderr)
        return 1
    try:
        if args.command == "list":
            found = await nodes.all_nodes(conn)
            if args.json:
                print(json.dumps(as_modalities(found), indent=2))
            else:
                print(table(found, await nodes.sources(conn)))
        elif args.command == "send":
            return await send(conn, settings, args.name, args.studies, args.timeout)
        elif args.command == "echo":
            return await echo(conn, args.name, args.timeout)
        elif wanted is not None:
            added = await nodes.put(conn, wanted)
            print(f"{'added' if added else 'changed'} node {wanted.name}: {wanted.aet}@"
                  f"{wanted.host}:{wanted.port} ({allowed(wanted)})")
        else:
            back = await nodes.delete(conn, args.name)
            print(f"deleted node {args.name}" if back is None else
                  f"deleted node {args.name}; its MINIPACS_NODES entry applies again: "
                  f"{back.aet}@{back.host}:{back.port} ({allowed(back)})")
    except nodes.NodeRefused as exc:
        print(f"nodes: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    return 0

