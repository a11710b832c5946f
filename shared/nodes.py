"""Remote DICOM nodes in PostgreSQL (``remote_node``): seeded from settings, read by AE title
(C-MOVE destination) or by name (move jobs)."""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from shared.settings import OPERATIONS, Node

SEED = """
INSERT INTO remote_node (name, aet, host, port, allow, source)
VALUES ($1, $2, $3, $4, $5, 'settings')
ON CONFLICT (name) DO UPDATE SET aet = EXCLUDED.aet, host = EXCLUDED.host,
    port = EXCLUDED.port, allow = EXCLUDED.allow, updated_at = now()
WHERE remote_node.source = 'settings'"""

_COLUMNS = "name, aet, host, port, allow"


def _node(row: asyncpg.Record) -> Node:
    return Node(row["name"], row["aet"], row["host"], int(row["port"]),
                frozenset(row["allow"]) & OPERATIONS)


async def seed(conn: asyncpg.Connection, nodes: Mapping[str, Node]) -> None:
    """Make the settings' nodes the ``source = 'settings'`` rows: added, updated, and removed
    when gone from the settings. Nodes added at run time (``source = 'api'``) are left as
    they are, even when a settings node has the same name."""
    async with conn.transaction():
        await conn.executemany(SEED, [(n.name, n.aet, n.host, n.port, sorted(n.allow))
                                      for n in nodes.values()])
        await conn.execute("DELETE FROM remote_node WHERE source = 'settings' "
                           "AND NOT (name = ANY($1::text[]))", list(nodes))


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
