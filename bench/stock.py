"""The tools as shipped: ``storescu`` without ``TCP_NODELAY=1``, so with Nagle's algorithm on,
as Debian ships DCMTK and as many modalities send; and ``getscu`` the same way.

The ingest bench gives every ``storescu`` ``TCP_NODELAY=1`` (like for like with the issue's
figures). A sender with Nagle on holds each DIMSE message's second PDU until the first is
ACKed, and a server that delays its ACKs makes every message wait ~40 ms for it (for C-GET,
each C-STORE response ``getscu`` sends back). This sends one study over one association to
Orthanc (TCP_NODELAY=1 in its own environment, as in the ingest bench) and to minipacs, then
takes the CT series back with ``getscu`` (C-GET), in the same run: what an admin sees with the
tools as installed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from bench.datasets import DataSet, dataset
from bench.dimse import getscu
from bench.send import send
from bench.servers import Server, rotated, settle

SETS = (("small", 200), ("ct", 60))
GET_SET = "ct"  # taken back with getscu: one study


@dataclass(frozen=True)
class StockRun:
    server: str
    kind: str
    count: int
    trial: int
    acked: int
    seconds: float  # launch of storescu to its exit
    got: int = 0  # instances getscu received (GET_SET only)
    get_seconds: float = 0.0  # launch of getscu to its exit

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0

    @property
    def get_rate(self) -> float:
        return self.got / self.get_seconds if self.get_seconds else 0.0


def measure(server: Server, data: DataSet, trial: int, work: Path) -> StockRun:
    logs = work / "storescu" / f"stock-{server.name}-{data.tag}"
    server.begin(work)
    try:
        settle()
        sent = send(data.files, server.port, server.aet, 1, logs, nodelay=False)
        # minipacs: its back end finishes (and the study is retrievable) before going on
        server.indexed_after(sent.t0, sent.acked, max(60.0, 20 * sent.seconds))
        got, get_seconds = 0, 0.0
        if data.kind == GET_SET and sent.acked == data.count:
            study = str(dcmread(data.files[0], stop_before_pixels=True).StudyInstanceUID)
            out = logs / "getscu"
            get_seconds, _ = getscu(server.port, server.aet, study, out, logs / "getscu.log",
                                    nodelay=False)
            got = sum(1 for _ in out.iterdir())
    finally:
        server.end()
    return StockRun(server.name, data.kind, data.count, trial, sent.acked, sent.seconds, got,
                    get_seconds)


def run_stock(servers: list[Server], work: Path, trials: int) -> list[StockRun]:
    """Each set, ``trials`` times, the servers' order rotating from trial to trial."""
    out: list[StockRun] = []
    for kind, count in SETS:
        for trial in range(trials):
            data = dataset(kind, count, f"s{kind}t{trial}")
            for server in rotated(servers, trial):
                run = measure(server, data, trial, work)
                out.append(run)
                print(f"  as shipped: {kind} x{count} {server.name:8} trial {trial + 1}: "
                      f"storescu {run.rate:7.1f} inst/s, {run.acked} acknowledged"
                      + (f"; getscu {run.get_rate:7.1f} inst/s, {run.got} received"
                         if run.get_seconds else ""), flush=True)
    return out


ROWS = (*(("C-STORE", kind) for kind, _ in SETS), ("C-GET", GET_SET))
LABELS = {"C-STORE": "`storescu`, C-STORE", "C-GET": "`getscu`, C-GET"}


def medians(runs: list[StockRun]) -> dict[tuple[str, str, str], float]:
    """(operation, set, server) -> median instances/s (C-GET: trials where it ran)."""
    out = {}
    for op, kind in ROWS:
        for server in dict.fromkeys(r.server for r in runs):
            mine = [r for r in runs if (r.kind, r.server) == (kind, server)]
            rates = [r.rate for r in mine] if op == "C-STORE" else [
                r.get_rate for r in mine if r.get_seconds]
            if rates:
                out[(op, kind, server)] = statistics.median(rates)
    return out


def _pair(rates: dict[tuple[str, str, str], float], op: str,
          kind: str) -> tuple[float, float, float]:
    """(minipacs, Orthanc, minipacs / Orthanc) for one row; nan where not measured."""
    mine = rates.get((op, kind, "minipacs"), math.nan)
    peer = rates.get((op, kind, "orthanc"), math.nan)
    return mine, peer, mine / peer if peer else math.nan


def _count(kind: str) -> int:
    return dict(SETS)[kind]


def lines(runs: list[StockRun]) -> list[str]:
    """One printed line per row: both rates and minipacs / Orthanc."""
    rates = medians(runs)
    out = []
    for op, kind in ROWS:
        mine, peer, ratio = _pair(rates, op, kind)
        out.append(f"as shipped (Nagle on), {LABELS[op]}, {kind} x{_count(kind)}, 1 assoc: "
                   f"minipacs {mine:.1f} inst/s, Orthanc {peer:.1f} inst/s: {ratio:.2f}x")
    return out


def markdown(runs: list[StockRun], trials: int) -> list[str]:
    rates = medians(runs)
    out = ["", "**The tools as shipped** (`storescu` and `getscu` without `TCP_NODELAY=1`, so "
           "with Nagle's algorithm on, as Debian ships DCMTK; one association; instances/s, "
           f"{trials} trial(s), medians; not a target: the rows above give every DCMTK tool "
           "`TCP_NODELAY=1`)", "",
           "| operation, set | Orthanc, TCP_NODELAY=1 | minipacs (native stack) | "
           "minipacs / Orthanc |", "|---|---|---|---|"]
    for op, kind in ROWS:
        mine, peer, ratio = _pair(rates, op, kind)
        out.append(f"| {LABELS[op]}, {kind}, {_count(kind)} instances | {peer:.1f} | "
                   f"{mine:.1f} | {ratio:.2f}x |")
    missing = sum(r.count - r.acked for r in runs)
    if missing:
        out += ["", f"- {missing} instance(s) sent by a stock `storescu` were NOT acknowledged"]
    short = sum(r.acked - r.got for r in runs if r.get_seconds)
    if short:
        out += ["", f"- {short} instance(s) asked for by a stock `getscu` did NOT arrive"]
    return out
