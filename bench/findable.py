"""Sent -> findable: how long after a modality starts sending a study a C-FIND finds all of it.

The issue's user story is "sends a study, and within a second finds it stored and indexed".
Orthanc indexes an instance before it answers the C-STORE; minipacs answers once the instance
is durable (spool + broker confirm), and storage and the indexer follow. This measures what
that costs the user, in the same run as Orthanc:

- ``storescu`` sends one study over one association, as a modality does (launch -> exit is
  "acknowledged");
- a C-FIND at STUDY level by PatientID, over an association opened before the send, is then
  repeated until every study of the set reports all its instances
  (NumberOfStudyRelatedInstances), each study being one that minipacs indexes only after
  storing it (invariant 2: file before index); launch -> that answer is "findable".
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from bench.datasets import DataSet, dataset
from bench.dimse import PENDING, associate_nodelay, study_query
from bench.send import send
from bench.servers import Server, rotated, settle

# (data set, instances): a small multi-study patient and a CT series, one association each
SETS = (("small", 20), ("ct", 60))
POLL_PAUSE = 0.005  # s between two polling queries: a resolution, not a synchronisation
LAG_LIMIT = 1.0  # s: "within a second finds it stored and indexed" (issue 2)


@dataclass(frozen=True)
class Findable:
    server: str
    kind: str
    count: int
    trial: int
    acked_s: float  # storescu launch -> exit
    findable_s: float | None  # storescu launch -> a C-FIND finds every instance (None: never)
    polls: int  # C-FINDs it took (1: found by the first query after the ack)

    @property
    def lag_s(self) -> float | None:
        return None if self.findable_s is None else self.findable_s - self.acked_s


def expected_counts(files: Iterable[Path]) -> tuple[str, dict[str, int]]:
    """(PatientID, instances per StudyInstanceUID) of a set that belongs to one patient."""
    patients: set[str] = set()
    studies: dict[str, int] = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["PatientID", "StudyInstanceUID"])
        patients.add(str(ds.PatientID))
        studies[str(ds.StudyInstanceUID)] = studies.get(str(ds.StudyInstanceUID), 0) + 1
    if len(patients) != 1:
        raise ValueError(f"a findable set must hold one patient, not {len(patients)}")
    return patients.pop(), studies


def found_counts(matches: Iterable[Dataset]) -> dict[str, int]:
    """Instances per study from C-FIND matches (a study without a count counts as 0)."""
    out: dict[str, int] = {}
    for match in matches:
        uid = str(match.get("StudyInstanceUID", ""))
        raw = match.get("NumberOfStudyRelatedInstances", "")
        try:
            out[uid] = int(str(raw).strip() or 0)
        except ValueError:
            out[uid] = 0
    return out


def complete(expected: dict[str, int], found: dict[str, int]) -> bool:
    return all(found.get(uid, 0) >= n for uid, n in expected.items())


class Poller:
    """One association to ``server`` that asks "how many instances of this patient's studies
    do you have?" as often as asked."""

    def __init__(self, port: int, called: str) -> None:
        self.ae = AE(ae_title="BENCHPOLL")
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        try:
            self.assoc = associate_nodelay(self.ae, port, called)
        except RuntimeError:
            self.ae.shutdown()
            raise
        self.called = called

    def counts(self, patient_id: str) -> dict[str, int]:
        matches: list[Dataset] = []
        final = None
        for status, identifier in self.assoc.send_c_find(
                study_query(PatientID=patient_id), StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                raise RuntimeError(f"C-FIND to {self.called}: no response (timeout/abort)")
            if int(status.Status) in PENDING and identifier is not None:
                matches.append(identifier)
            elif int(status.Status) not in PENDING:
                final = int(status.Status)
        if final != 0x0000:
            raise RuntimeError(f"C-FIND to {self.called} ended with status {final}")
        return found_counts(matches)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


def measure(server: Server, data: DataSet, trial: int, work: Path,
            deadline: float = 60.0) -> Findable:
    patient_id, expected = expected_counts(data.files)
    server.begin(work)
    try:
        settle()
        poller = Poller(server.port, server.aet)
        try:
            sent = send(data.files, server.port, server.aet, 1,
                        work / "storescu" / f"findable-{server.name}-{data.tag}")
            acked = time.monotonic() - sent.t0
            polls, findable = 0, None
            if sent.acked == data.count:
                until = time.monotonic() + deadline
                while time.monotonic() < until:
                    polls += 1
                    if complete(expected, poller.counts(patient_id)):
                        findable = time.monotonic() - sent.t0
                        break
                    time.sleep(POLL_PAUSE)
        finally:
            poller.close()
    finally:
        server.end()
    return Findable(server.name, data.kind, data.count, trial, acked, findable, polls)


def run_findable(servers: list[Server], work: Path, trials: int) -> list[Findable]:
    """Each set, ``trials`` times, the servers' order rotating from trial to trial."""
    out: list[Findable] = []
    for kind, count in SETS:
        for trial in range(trials):
            data = dataset(kind, count, f"f{kind}t{trial}")
            for server in rotated(servers, trial):
                run = measure(server, data, trial, work)
                out.append(run)
                print(f"  findable: {kind} x{count} {server.name:8} trial {trial + 1}: "
                      f"acknowledged {1000 * run.acked_s:6.0f} ms, findable "
                      + (f"{1000 * run.findable_s:6.0f} ms ({run.polls} C-FIND)"
                         if run.findable_s is not None else "NOT before the deadline"),
                      flush=True)
    return out


@dataclass(frozen=True)
class Summary:
    kind: str
    count: int
    server: str
    acked_ms: float  # medians over the trials
    findable_ms: float
    lag_ms: float
    worst_lag_ms: float
    missing: int  # trials in which the set never became findable


def summarize(runs: list[Findable]) -> list[Summary]:
    out = []
    keys = dict.fromkeys((r.kind, r.count, r.server) for r in runs)
    for kind, count, server in keys:
        mine = [r for r in runs if (r.kind, r.count, r.server) == (kind, count, server)]
        found = [r for r in mine if r.findable_s is not None]
        lags = [1000 * r.lag_s for r in found if r.lag_s is not None]

        def med(values: list[float]) -> float:
            return statistics.median(values) if values else math.nan

        out.append(Summary(kind, count, server, med([1000 * r.acked_s for r in mine]),
                           med([1000 * r.findable_s for r in found
                                if r.findable_s is not None]),
                           med(lags), max(lags) if lags else math.nan,
                           len(mine) - len(found)))
    return out


def ratio(summaries: list[Summary], kind: str, field: str) -> float:
    """minipacs / Orthanc of a median (``acked_ms`` or ``findable_ms``) for one set."""
    by = {s.server: s for s in summaries if s.kind == kind}
    if "minipacs" not in by or "orthanc" not in by:
        return math.nan
    peer = getattr(by["orthanc"], field)
    return float(getattr(by["minipacs"], field) / peer) if peer else math.nan


def target_line(summaries: list[Summary]) -> str:
    """Issue 2's "within a second": minipacs's worst lag from the last ack to findable."""
    mine = [s for s in summaries if s.server == "minipacs"]
    if not mine:
        return "SKIP: findable within 1 s of the last ack (minipacs not measured)"
    missing = sum(s.missing for s in mine)
    worst = max(s.worst_lag_ms for s in mine)
    ok = missing == 0 and worst <= 1000 * LAG_LIMIT
    extra = f", {missing} trial(s) never findable" if missing else ""
    return (f"{'PASS' if ok else 'FAIL'}: every study sent was findable by C-FIND within "
            f"{LAG_LIMIT:.0f} s of its last acknowledgement (worst lag {worst:.0f} ms{extra})")


def markdown(summaries: list[Summary], trials: int) -> list[str]:
    names = {"orthanc": "Orthanc, TCP_NODELAY=1", "minipacs": "minipacs (native stack)"}
    out = ["", f"**Sent -> findable** (one study, one `storescu` association, as a modality "
           f"sends it; then a C-FIND by PatientID every {1000 * POLL_PAUSE:.0f} ms until "
           f"NumberOfStudyRelatedInstances counts every instance; {trials} trial(s), "
           "medians, times from the launch of `storescu`)", "",
           "| set | server | acknowledged (ms) | findable (ms) | after the last ack: "
           "median / worst (ms) |", "|---|---|---|---|---|"]
    for s in summaries:
        label = f"{s.kind}, {s.count} instances"
        missing = f" ({s.missing} never)" if s.missing else ""
        out.append(f"| {label} | {names.get(s.server, s.server)} | {s.acked_ms:.0f} | "
                   f"{s.findable_ms:.0f}{missing} | {s.lag_ms:.0f} / {s.worst_lag_ms:.0f} |")
    for kind in dict.fromkeys(s.kind for s in summaries):
        acked, found = ratio(summaries, kind, "acked_ms"), ratio(summaries, kind, "findable_ms")
        out.append(f"| {kind} | minipacs time / Orthanc time | {acked:.2f}x | {found:.2f}x | |")
    out += ["", f"- {target_line(summaries)}"]
    return out
