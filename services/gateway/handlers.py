"""Thin protocol handlers: translate the pynetdicom event, call the service, map the outcome."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from services.gateway import statuses
from services.gateway.admission import admit, permitted
from services.gateway.receive import closed_by_peer
from shared.ingest import Caller, Ingest
from shared.keys import InvalidUID, validate_uid
from shared.settings import GatewaySettings, Node

log = logging.getLogger("minipacs.gateway")

_OUTCOME_STATUS = {
    "stored": statuses.SUCCESS,
    "unavailable": statuses.OUT_OF_RESOURCES,
    **statuses.FOR_INVALID_INSTANCE,
}


class AssociationIds:
    """Short, readable ids for association log lines."""

    def __init__(self) -> None:
        self._ids: weakref.WeakKeyDictionary[Association, int] = weakref.WeakKeyDictionary()
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, assoc: Association) -> int:
        with self._lock:
            if assoc not in self._ids:
                self._ids[assoc] = next(self._next)
            return self._ids[assoc]


@dataclass
class Gateway:
    settings: GatewaySettings
    ingest: Ingest
    ids: AssociationIds
    nodes: Callable[[], Mapping[str, Node]]  # the allow-list's nodes (``shared.nodes.NodeBook``)

    def caller(self, assoc: Association) -> Caller:
        return Caller(assoc.requestor.ae_title.strip(), str(assoc.requestor.address))

    def may(self, assoc: Association, operation: str) -> bool:
        """Per-node permission for ``operation``; logs the refusal."""
        s = self.settings
        calling, host = assoc.requestor.ae_title.strip(), str(assoc.requestor.address)
        if permitted(operation, calling, host, s.allow_list, s.check_host, self.nodes()):
            return True
        log.warning("assoc=%d %s@%s may not %s (node settings) -> %s", self.ids(assoc), calling,
                    host, operation, statuses.describe(statuses.NOT_AUTHORIZED))
        return False

    # -- association -------------------------------------------------------------------------
    def on_requested(self, event: Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        # At EVT_REQUESTED pynetdicom has not copied the AE titles from the A-ASSOCIATE-RQ yet.
        called = str(getattr(rq.primitive, "called_ae_title", "") or "")
        calling = str(getattr(rq.primitive, "calling_ae_title", "") or "")
        s = self.settings
        proposed = getattr(rq.primitive, "presentation_context_definition_list", None) or []
        decision = admit(calling, called, str(rq.address), s.gateway_aet,
                         s.require_called_aet, s.allow_list, s.check_host, self.nodes(),
                         proposed=len(proposed))
        who = f"assoc={self.ids(assoc)} {calling.strip()}@{rq.address}:{rq.port}"
        if decision.accept:
            log.info("%s -> %s: association requested", who, called.strip())
            return
        log.warning("%s -> %s: association rejected: %s", who, called.strip(), decision.reason)
        assoc.acse.send_reject(*decision.reject)
        assoc.is_rejected = True
        assoc.kill()

    def on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        accepted = [cx for cx in assoc.accepted_contexts]
        log.info("assoc=%d accepted: %d presentation contexts, max PDU %s",
                 self.ids(assoc), len(accepted), assoc.requestor.maximum_length)

    def on_rejected(self, event: Event) -> None:
        log.warning("assoc=%d rejected (association limit %d or policy)", self.ids(event.assoc),
                    self.settings.max_associations)

    def on_released(self, event: Event) -> None:
        log.info("assoc=%d released", self.ids(event.assoc))

    def on_aborted(self, event: Event) -> None:
        assoc = event.assoc
        how = closed_by_peer(assoc.dul)
        if how:
            rq = assoc.requestor
            log.warning("assoc=%d %s@%s:%s aborted: connection closed by peer (%s)",
                        self.ids(assoc), rq.ae_title.strip(), rq.address, rq.port, how)
        else:
            log.warning("assoc=%d aborted", self.ids(assoc))

    # -- DIMSE -------------------------------------------------------------------------------
    def on_echo(self, event: Event) -> int:
        if not self.may(event.assoc, "echo"):
            return statuses.NOT_AUTHORIZED
        log.info("assoc=%d msg=%s C-ECHO -> Success", self.ids(event.assoc),
                 event.request.MessageID)
        return statuses.SUCCESS

    def on_store(self, event: Event) -> int:
        """pynetdicom's path (TRACE, or a C-STORE ``receive.py`` leaves to pynetdicom)."""
        req = cast(C_STORE, event.request)
        return self.store_file(event.assoc, str(req.AffectedSOPClassUID or ""),
                               str(req.AffectedSOPInstanceUID or ""), int(req.MessageID or 0),
                               str(event.context.transfer_syntax), Path(event.dataset_path),
                               str(event.context.abstract_syntax))

    def store_file(self, assoc: Association, sop_class: str, sop_instance: str, message_id: int,
                   transfer_syntax: str, path: Path, context_class: str) -> int:
        """One received C-STORE dataset (a Part-10 file in the spool's incoming folder) -> its
        DIMSE status. Called from the association's DUL thread (``receive.py``) or by
        pynetdicom's event. ``context_class``: the abstract syntax of the presentation context
        it came on, which a well-formed Affected SOP Class UID must equal."""
        started = time.perf_counter()
        if not self.may(assoc, "store"):
            return statuses.NOT_AUTHORIZED
        if _off_context(sop_class, context_class):
            status = statuses.SOP_CLASS_NOT_SUPPORTED
            log.warning("assoc=%d msg=%s C-STORE from %s@%s refused -> %s: Affected SOP Class "
                        "UID %s on a presentation context for %s", self.ids(assoc), message_id,
                        assoc.requestor.ae_title.strip(), assoc.requestor.address,
                        statuses.describe(status), sop_class, context_class)
            return status
        outcome = self.ingest.accept_file(path, sop_class, sop_instance, transfer_syntax,
                                          self.caller(assoc))
        status = _OUTCOME_STATUS[outcome.kind]
        ms = (time.perf_counter() - started) * 1000
        if outcome.ok:
            log.info("assoc=%d msg=%s C-STORE %d bytes obj=%s -> %s (%.1f ms)", self.ids(assoc),
                     message_id, outcome.size, outcome.sha256[:12], statuses.describe(status),
                     ms)
        else:
            log.warning("assoc=%d msg=%s C-STORE from %s@%s refused -> %s: %s",
                        self.ids(assoc), message_id, assoc.requestor.ae_title.strip(),
                        assoc.requestor.address, statuses.describe(status), outcome.reason)
        return status

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]


def _off_context(sop_class: str, context_class: str) -> bool:
    """A well-formed Affected SOP Class UID other than its context's (a malformed or missing
    one is the ingest check's: 0xC001)."""
    try:
        return validate_uid(sop_class, "Affected SOP Class UID") != context_class
    except InvalidUID:
        return False
