"""Storage Commitment Push Model, SCP (PS3.4 Annex J): a modality asks, with N-ACTION, whether
the archive has taken charge of the instances it sent, and deletes its own copies once told so.

The gateway reads the request, finds where the report goes (the requester's AE title among
the known nodes, ``MINIPACS_NODES``), and answers Success only once the broker has confirmed a
``commitment.requested`` message (durable before acknowledged): the mover sends the report,
an N-EVENT-REPORT on a new association, once every referenced instance is indexed or
``MINIPACS_COMMIT_TIMEOUT`` has passed (``services/mover/commitment.py``). A request so
accepted outlives a restart of the gateway, the mover or the broker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event

from services.gateway import statuses
from services.gateway.bridge import LoopBridge
from shared import nodes as node_table
from shared.broker import Publisher
from shared.commitment import Refused, parse_request
from shared.messages import CommitmentRequested
from shared.settings import GatewaySettings, Node

log = logging.getLogger("minipacs.gateway")


@dataclass
class Committer:
    """The N-ACTION handler: reads the request, queues it for the mover's report."""

    settings: GatewaySettings
    pool: asyncpg.Pool
    bridge: LoopBridge
    publisher: Publisher
    ids: Callable[[Any], int]
    may: Callable[[Any, str], bool]

    def on_action(self, event: Event) -> tuple[int | Dataset, None]:
        assoc = event.assoc
        calling, host = assoc.requestor.ae_title.strip(), str(assoc.requestor.address)
        who = f"assoc={self.ids(assoc)} {calling}@{host}"
        if not self.may(assoc, "store"):
            return statuses.NOT_AUTHORIZED, None
        try:
            req = cast(N_ACTION, event.request)
            request = parse_request(event.action_type, str(req.RequestedSOPInstanceUID or ""),
                                    _information(event))
            node = self.bridge.run(self._requester(calling), self.settings.find_timeout)
            if node is None:
                raise Refused(statuses.PROCESSING_FAILURE, f"{calling!r} is not a known node "
                              "(MINIPACS_NODES): no address to send the report to")
        except Refused as exc:
            log.warning("%s N-ACTION storage commitment refused -> %s: %s", who,
                        statuses.describe(exc.status), exc)
            return _status(exc.status, str(exc)), None
        except Exception as exc:  # the index did not answer
            log.error("%s N-ACTION storage commitment: node look-up failed: %s", who, exc)
            return _status(statuses.PROCESSING_FAILURE, "node look-up failed"), None
        target_host = host if node.host == "*" else node.host
        message = CommitmentRequested(
            request.transaction_uid, [list(ref) for ref in request.refs], node.aet,
            target_host, node.port, time.time() + self.settings.commit_timeout, calling, host)
        try:
            self.bridge.run(self.publisher.publish(message), self.settings.confirm_timeout + 1)
        except Exception as exc:  # not durable: the modality must ask again
            log.warning("%s N-ACTION storage commitment not queued (%s: %s) -> %s", who,
                        type(exc).__name__, exc, statuses.describe(statuses.RESOURCE_LIMITATION))
            return _status(statuses.RESOURCE_LIMITATION, "not queued: try again"), None
        log.info("%s N-ACTION storage commitment of %d instance(s) -> Success; report to %s "
                 "(%s:%d) once indexed", who, len(request.refs), node.aet, target_host,
                 node.port)
        return statuses.SUCCESS, None

    async def _requester(self, aet: str) -> Node | None:
        async with self.pool.acquire() as conn:
            return await node_table.by_aet(conn, aet)


def _information(event: Event) -> Dataset | None:
    try:
        return event.action_information
    except Exception:
        return None


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds
