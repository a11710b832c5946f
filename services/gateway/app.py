"""Wiring: settings -> spool, broker publisher, ingest, pynetdicom server. Tests call ``run``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import tempfile
import time

import asyncpg
from pynetdicom import AE, evt

from services.gateway import receive, trace
from services.gateway.announce import ReceivedAnnouncer, on_the_way
from services.gateway.bridge import LoopBridge
from services.gateway.commitment import Committer
from services.gateway.find import Finder
from services.gateway.handlers import AssociationIds, Gateway
from services.gateway.retrieve import install, open_retrieve
from services.gateway.server import build_ae, start
from shared import broker, crash, nodes
from shared.ingest import Ingest
from shared.lifecycle import heartbeat, heartbeat_path, retry_until, stop_event
from shared.messages import InstanceReceived
from shared.settings import GatewaySettings
from shared.spool import Spool

log = logging.getLogger("minipacs.gateway")


async def run(settings: GatewaySettings, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_event()
    spool = Spool(settings.spool_dir).create()
    # pynetdicom writes each incoming dataset to a temp file: make that the spool's
    # incoming/ folder so a commit is a rename on the same filesystem.
    tempfile.tempdir = str(spool.incoming)

    connection = await broker.connect(settings.amqp_url, settings.startup_timeout)
    publisher = broker.Publisher(connection, settings.confirm_timeout)
    await publisher.open()
    bridge = LoopBridge(asyncio.get_running_loop())

    async def connect_db() -> asyncpg.Pool:
        return await asyncpg.create_pool(settings.database_url, min_size=1,
                                         max_size=settings.db_pool_size, reset=_keep_session)

    pool = await retry_until("PostgreSQL", connect_db, settings.startup_timeout)

    announcer = ReceivedAnnouncer(
        asyncio.get_running_loop(),
        lambda body: publisher.publish_body(body, InstanceReceived.routing_key),
        settings.announce_batch, settings.confirm_timeout + 1,
        settings.announce_linger_ms / 1000, on_the_way)
    book = await open_nodes(settings, pool)
    follow = asyncio.create_task(book.follow(settings.database_url))
    announce = crash.after(crash.parse(settings.crash_at), "gateway.confirmed",
                           announcer.announce)
    gateway = Gateway(settings, Ingest(spool, announce), AssociationIds(), book)
    ae = build_ae(settings)
    receive.install(gateway.store_file)  # C-STORE requests read by the DUL threads
    finder = Finder(settings, pool, bridge, gateway.ids, gateway.may,
                    pre_encoded=True)  # build_ae installed fastpath
    install(ae)  # C-MOVE / C-GET served by retrieve.py, not by pynetdicom's sub-operations
    retrieve = await open_retrieve(settings, pool, connection, publisher, bridge, gateway.ids)
    retrieve.retriever.may = gateway.may
    committer = Committer(settings, pool, bridge, publisher, gateway.ids, gateway.may)
    handlers = [*gateway.handlers(), (evt.EVT_C_FIND, finder.on_find),
                (evt.EVT_N_ACTION, committer.on_action),
                *retrieve.retriever.handlers(), *trace.handlers()]
    # pynetdicom's server runs a full ``gc.collect()`` every 60 requests it accepts, holding the
    # GIL for ~40 ms over the objects of every module loaded by now: set those aside first, so
    # the collections walk only what associations create.
    gc.freeze()
    server = start(ae, settings, handlers)
    log.info("gateway %s listening on %s:%d (max PDU %d, %d associations, allow-list %s)",
             settings.gateway_aet, settings.gateway_host, server.server_address[1],
             settings.max_pdu, settings.max_associations, "on" if settings.allow_list else "off")
    alive = heartbeat_path(settings.heartbeat_file, "gateway")
    beat = asyncio.create_task(heartbeat(alive, stop, lambda: publisher.ready))
    try:
        await stop.wait()
    finally:
        log.info("gateway stopping: no new associations, finishing running ones")
        server.shutdown()  # stops accepting; running association threads go on
        await asyncio.to_thread(_wait_associations, ae, settings.dimse_timeout)
        server.server_close()
        beat.cancel()
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await retrieve.close()
        await connection.close()
        await pool.close()
        log.info("gateway stopped")


async def open_nodes(settings: GatewaySettings, pool: asyncpg.Pool) -> nodes.NodeBook:
    """Seed ``MINIPACS_NODES`` into the index and read every node, run-time ones included."""
    async with pool.acquire() as conn:
        await nodes.seed(conn, settings.nodes)
        book = nodes.NodeBook({})
        await book.reload(conn)
    log.info("remote nodes: %s (MINIPACS_NODES: %d, added at run time: %d)",
             nodes.describe(book()), len(settings.nodes),
             len(set(book()) - set(settings.nodes)))
    return book


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The gateway's pool runs single read statements (C-FIND, retrieve look-ups): no session
    state to clear when a connection goes back. asyncpg's default reset (RESET ALL, UNLISTEN,
    CLOSE ALL, advisory unlock) was a round trip per query, a fifth of a C-FIND's wait for
    the index."""


def _wait_associations(ae: AE, timeout: float) -> None:
    """Let established associations finish (up to ``timeout``). Connections that never sent an
    A-ASSOCIATE-RQ (port probes, scanners) are not waited for: they are daemon threads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(a.is_established for a in ae.active_associations):
        time.sleep(0.1)
