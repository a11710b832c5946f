"""The C-FIND SCP (Patient Root and Study Root): a thin handler over ``shared.query``.

The query runs on the asyncio loop (through the bridge, with a timeout); the matches come back
as pending responses, one per row, until the SCU cancels (C-CANCEL) or they are all sent.
One INFO line per C-FIND (level, matches, time); the identifier itself only at DEBUG.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from services.gateway import statuses
from services.gateway.bridge import LoopBridge
from services.gateway.fastpath import EncodedIdentifier
from shared.query import (
    PATIENT_ROOT,
    STUDY_ROOT,
    Options,
    QueryError,
    build_find,
    describe_keys,
    encode_response,
    response,
    run_find,
)
from shared.settings import GatewaySettings

log = logging.getLogger("minipacs.gateway")

MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): STUDY_ROOT,
}
_MODEL_NAME = {PATIENT_ROOT: "patient-root", STUDY_ROOT: "study-root"}
_ERROR_STATUS = {
    "identifier": statuses.IDENTIFIER_DOES_NOT_MATCH,
    "unprocessable": statuses.UNABLE_TO_PROCESS,
}

Response = tuple[int | Dataset, Dataset | None]
# Transfer syntaxes whose matches ``encode_response`` writes itself: Implicit VR?
_ENCODED_HERE = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}


def failure(status: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (LO: at most 64 characters, ASCII)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds


@dataclass
class Finder:
    settings: GatewaySettings
    pool: asyncpg.Pool
    bridge: LoopBridge
    ids: Callable[[Association], int]
    may: Callable[[Association, str], bool] = lambda _assoc, _op: True  # per-node permission
    # Matches as ``EncodedIdentifier``: only where ``fastpath.install()`` lets pynetdicom send
    # them (its own ``encode`` would send an empty identifier).
    pre_encoded: bool = False

    def options(self) -> Options:
        s = self.settings
        return Options(pn_ignore_case=s.find_pn_ignore_case, limit=s.find_limit or None,
                       retrieve_aet=s.gateway_aet)

    def on_find(self, event: Event) -> Iterator[Response]:
        started = time.perf_counter()
        req = event.request
        model = MODELS.get(str(req.AffectedSOPClassUID), "")
        what = f"assoc={self.ids(event.assoc)} msg={req.MessageID} C-FIND " \
               f"{_MODEL_NAME.get(model, 'unknown-model')}"
        opts = self.options()
        if not self.may(event.assoc, "find"):
            yield failure(statuses.NOT_AUTHORIZED, "this node may not query"), None
            return
        try:
            identifier = event.identifier
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s identifier: %s", what, describe_keys(identifier))
            query = build_find(identifier, model, opts)
        except QueryError as exc:
            status = _ERROR_STATUS[exc.kind]
            log.warning("%s refused -> 0x%04X: %s", what, status, exc.reason)
            yield failure(status, exc.reason), None
            return
        except Exception as exc:  # an identifier pydicom cannot decode
            log.warning("%s refused -> 0x%04X: identifier cannot be decoded (%s)", what,
                        statuses.UNABLE_TO_PROCESS, type(exc).__name__)
            yield failure(statuses.UNABLE_TO_PROCESS, "identifier cannot be decoded"), None
            return
        try:
            rows = self.bridge.run(run_find(self.pool, query), self.settings.find_timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("%s level=%s failed -> %s: index not available (%s)", what, query.level,
                        statuses.describe(statuses.OUT_OF_RESOURCES), type(exc).__name__)
            yield failure(statuses.OUT_OF_RESOURCES, "index not available, retry later"), None
            return
        query_ms = (time.perf_counter() - started) * 1000
        yield from self._answer(event, what, query, rows, opts, started, query_ms)

    def _answer(self, event: Event, what: str, query: Any, rows: list[Any], opts: Options,
                started: float, query_ms: float) -> Iterator[Response]:
        limit = query.limit
        truncated = limit is not None and len(rows) > limit
        matches = rows[:limit] if truncated else rows
        sent = 0
        context = getattr(event, "context", None)
        implicit = _ENCODED_HERE.get(str(getattr(context, "transfer_syntax", ""))) \
            if self.pre_encoded else None
        for row in matches:
            if event.is_cancelled:
                log.info("%s level=%s cancelled after %d of %d matches (%.1f ms)", what,
                         query.level, sent, len(matches), _ms(started))
                yield statuses.CANCEL, None
                return
            raw = None if implicit is None else encode_response(query, row, opts, implicit)
            if raw is not None and implicit is not None:
                yield statuses.PENDING, EncodedIdentifier(raw, implicit)
            else:
                yield statuses.PENDING, response(query, row, opts)
            sent += 1
        if truncated:
            log.warning("%s level=%s -> more than %d matches: sent the first %d -> %s (query "
                        "%.1f ms, total %.1f ms)", what, query.level, limit, sent,
                        statuses.describe(statuses.OUT_OF_RESOURCES), query_ms, _ms(started))
            yield failure(statuses.OUT_OF_RESOURCES, f"more than {limit} matches: narrow the "
                                                     "query"), None
            return
        log.info("%s level=%s -> %d matches (query %.1f ms, total %.1f ms)", what, query.level,
                 sent, query_ms, _ms(started))
        yield statuses.SUCCESS, None


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
