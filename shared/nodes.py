"""Remote DICOM nodes in PostgreSQL (``remote_node``), Orthanc's ``DicomModalities`` kept where
every service reads them.

- Seeded from ``MINIPACS_NODES`` at gateway start (``source = 'settings'``).
- Added, changed and removed at run time with ``python -m services.nodes`` (``source = 'api'``:
  the seeding never overwrites them), without restarting anything. A settings node of the same
  name waits in ``settings_node`` and is back as soon as the run-time one is deleted.
- Read by AE title (C-MOVE destination, storage commitment) or by name (move jobs) at each use,
  and by the gateway's allow-list through a ``NodeBook``: a copy of the table that every change
  refreshes (``NOTIFY`` on ``CHANNEL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Mapping

import asyncpg

from shared.settings import OPERATIONS, Node

log = logging.getLogger("minipacs.nodes")

CHANNEL = "minipacs_remote_node"  # NOTIFY channel: some remote_node row changed
LISTENER = "minipacs-nodes"  # application_name of a NodeBook's connection (pg_stat_activity)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

SEED = """
INSERT INTO remote_node (name, aet, host, port, allow, source)
VALUES ($1, $2, $3, $4, $5, 'settings')
ON CONFLICT (name) DO UPDATE SET aet = EXCLUDED.aet, host = EXCLUDED.host,
    port = EXCLUDED.port, allow = EXCLUDED.allow, updated_at = now()
WHERE remote_node.source = 'settings'"""

PUT = """
INSERT INTO remote_node (name, aet, host, port, allow, source)
VALUES ($1, $2, $3, $4, $5, 'api')
ON CONFLICT (name) DO UPDATE SET aet = EXCLUDED.aet, host = EXCLUDED.host,
    port = EXCLUDED.port, allow = EXCLUDED.allow, updated_at = now()
WHERE remote_node.source = 'api'
RETURNING (xmax = 0) AS inserted"""

# The settings' node of a name a run-time node holds, kept for when that one is deleted
SHADOWED = """
UPDATE remote_node SET settings_node = $2::jsonb WHERE name = $1 AND source = 'api'"""

_COLUMNS = "name, aet, host, port, allow"


class NodeRefused(ValueError):
    """A run-time change the table cannot take: a node from the settings, or no such node."""


def validate_name(name: str) -> str:
    """A node's name as the command line takes it: letters, digits, ``_ . -``, at most 64."""
    if not _NAME.fullmatch(name):
        raise NodeRefused(f"node name {name!r}: 1-64 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return name


def describe(nodes: Mapping[str, Node]) -> str:
    return ", ".join(f"{n.name}={n.aet}@{n.host}:{n.port}" for n in nodes.values()) or "none"


def _node(row: asyncpg.Record) -> Node:
    return Node(row["name"], row["aet"], row["host"], int(row["port"]),
                frozenset(row["allow"]) & OPERATIONS)


async def _notify(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, name)


async def seed(conn: asyncpg.Connection, nodes: Mapping[str, Node]) -> None:
    """Make the settings' nodes the ``source = 'settings'`` rows: added, updated, and removed
    when gone from the settings. Nodes added at run time (``source = 'api'``) are left as
    they are, even when a settings node has the same name: that one is kept in their
    ``settings_node`` (``delete`` puts it back)."""
    async with conn.transaction():
        await conn.executemany(SEED, [(n.name, n.aet, n.host, n.port, sorted(n.allow))
                                      for n in nodes.values()])
        await conn.execute("UPDATE remote_node SET settings_node = NULL "
                           "WHERE settings_node IS NOT NULL")
        await conn.executemany(SHADOWED, [(n.name, json.dumps(
            {"aet": n.aet, "host": n.host, "port": n.port, "allow": sorted(n.allow)}))
            for n in nodes.values()])
        await conn.execute("DELETE FROM remote_node WHERE source = 'settings' "
                           "AND NOT (name = ANY($1::text[]))", list(nodes))
        await _notify(conn, "")


async def put(conn: asyncpg.Connection, node: Node) -> bool:
    """Add or change a run-time node; True if it is new. A node from the settings is refused:
    it would come back as it was at the next gateway start."""
    validate_name(node.name)
    async with conn.transaction():
        row = await conn.fetchrow(PUT, node.name, node.aet, node.host, node.port,
                                  sorted(node.allow))
        if row is None:
            raise NodeRefused(f"node {node.name!r} comes from MINIPACS_NODES: change it there "
                              "(and restart the gateway), or give this one another name")
        await _notify(conn, node.name)
    return bool(row["inserted"])


async def delete(conn: asyncpg.Connection, name: str) -> Node | None:
    """Remove a run-time node; the ``MINIPACS_NODES`` node of the same name it stood in front
    of, if any, takes its place again and is returned. A node from the settings, or none of
    that name, is refused."""
    async with conn.transaction():
        row = await conn.fetchrow("SELECT source, settings_node FROM remote_node "
                                  "WHERE name = $1 FOR UPDATE", name)
        if row is None:
            raise NodeRefused(f"there is no node {name!r}")
        if row["source"] == "settings":
            raise NodeRefused(f"node {name!r} comes from MINIPACS_NODES: remove it there "
                              "(and restart the gateway)")
        await conn.execute("DELETE FROM remote_node WHERE name = $1", name)
        back = None
        if row["settings_node"] is not None:
            spec = json.loads(row["settings_node"])
            back = Node(name, spec["aet"], spec["host"], int(spec["port"]),
                        frozenset(spec["allow"]) & OPERATIONS)
            await conn.execute(SEED, back.name, back.aet, back.host, back.port,
                               sorted(back.allow))
        await _notify(conn, name)
    return back


async def sources(conn: asyncpg.Connection) -> dict[str, str]:
    """Each node's origin: ``settings`` (``MINIPACS_NODES``), ``api`` (added at run time), or
    ``api-over-settings`` (added at run time, in front of a ``MINIPACS_NODES`` node)."""
    rows = await conn.fetch("SELECT name, CASE WHEN settings_node IS NULL THEN source "
                            "ELSE 'api-over-settings' END AS source FROM remote_node")
    return {r["name"]: r["source"] for r in rows}


async def by_aet(conn: asyncpg.Connection, aet: str) -> Node | None:
    """The node with this AE title (the first by name if several share it)."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM remote_node WHERE aet = $1 "  # noqa: S608
                              "ORDER BY name LIMIT 1", aet.strip())
    return _node(row) if row else None


async def by_name(conn: asyncpg.Connection, name: str) -> Node | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM remote_node WHERE name = $1",  # noqa: S608
                              name)
    return _node(row) if row else None


async def all_nodes(conn: asyncpg.Connection) -> dict[str, Node]:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM remote_node ORDER BY name")  # noqa: S608
    return {r["name"]: _node(r) for r in rows}


class NodeBook:
    """The nodes the gateway's allow-list checks callers against: a copy of ``remote_node``
    that ``follow`` replaces whole (one reference swap: the association threads that read it
    need no lock) when a change is notified on ``CHANNEL``, and every ``poll`` seconds in case
    a notification was missed. While PostgreSQL is unreachable the last copy stays in use."""

    def __init__(self, nodes: Mapping[str, Node]) -> None:
        self._nodes: Mapping[str, Node] = dict(nodes)

    def __call__(self) -> Mapping[str, Node]:
        return self._nodes

    async def reload(self, conn: asyncpg.Connection) -> bool:
        """Read the table again; True if the nodes changed."""
        nodes = await all_nodes(conn)
        changed = nodes != self._nodes
        self._nodes = nodes
        return changed

    async def follow(self, dsn: str, poll: float = 30.0, retry: float = 5.0) -> None:
        """Keep the copy current until cancelled."""
        while True:
            try:
                await self._listen(dsn, poll)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("remote nodes: cannot follow changes in PostgreSQL (%s: %s); "
                            "checking callers against the %d nodes known, retrying in %.0f s",
                            type(exc).__name__, exc, len(self._nodes), retry)
                await asyncio.sleep(retry)

    async def _listen(self, dsn: str, poll: float) -> None:
        conn = await asyncpg.connect(dsn, timeout=10,
                                     server_settings={"application_name": LISTENER})
        wake = asyncio.Event()
        try:
            await conn.add_listener(CHANNEL, lambda *_: wake.set())
            conn.add_termination_listener(lambda _conn: wake.set())
            while True:
                wake.clear()  # before the read: a change notified during it reads again
                if await self.reload(conn):
                    log.info("remote nodes now: %s", describe(self._nodes))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll)
        finally:
            await conn.close(timeout=5)
