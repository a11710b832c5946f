"""The sender as shipped: ``storescu`` without ``TCP_NODELAY=1``, so with Nagle's algorithm on,
as Debian ships DCMTK and as many modalities send.

The ingest bench gives every ``storescu`` ``TCP_NODELAY=1`` (like for like with the issue's
figures). A sender with Nagle on holds each DIMSE message's second PDU until the first is
ACKed, and a server that delays its ACKs makes every message wait ~40 ms for it. This sends one
study over one association to Orthanc (TCP_NODELAY=1 in its own environment, as in the ingest
bench) and to minipacs, in the same run: what an admin sees with the tools as installed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.datasets import dataset
from bench.send import send
from bench.servers import Server, settle

SETS = (("small", 200), ("ct", 60))


@dataclass(frozen=True)
class StockRun:
    server: str
    kind: str
    count: int
    trial: int
    acked: int
    seconds: float  # launch of storescu to its exit

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0


def run_stock(servers: list[Server], work: Path, trials: int) -> list[StockRun]:
    """Each set, ``trials`` times, the servers' order rotating from trial to trial."""
    out: list[StockRun] = []
    for kind, count in SETS:
        for trial in range(trials):
            data = dataset(kind, count, f"s{kind}t{trial}")
            shift = trial % len(servers)
            for server in servers[shift:] + servers[:shift]:
                server.begin(work)
                try:
                    settle()
                    sent = send(data.files, server.port, server.aet, 1,
                                work / "storescu" / f"stock-{server.name}-{data.tag}",
                                nodelay=False)
                    # minipacs: its back end finishes before the next server is measured
                    server.indexed_after(sent.t0, sent.acked, max(60.0, 20 * sent.seconds))
                finally:
                    server.end()
                run = StockRun(server.name, kind, count, trial, sent.acked, sent.seconds)
                out.append(run)
                print(f"  stock storescu: {kind} x{count} {server.name:8} trial {trial + 1}: "
                      f"{run.rate:7.1f} inst/s, {run.acked} acknowledged", flush=True)
    return out


def medians(runs: list[StockRun]) -> dict[tuple[str, str], float]:
    """(set, server) -> median acknowledged instances/s."""
    keys = dict.fromkeys((r.kind, r.server) for r in runs)
    return {key: statistics.median(r.rate for r in runs if (r.kind, r.server) == key)
            for key in keys}


def lines(runs: list[StockRun]) -> list[str]:
    """One printed line per set: both rates and minipacs / Orthanc."""
    out = []
    for kind, count in SETS:
        mine, peer, ratio = _pair(medians(runs), kind)
        out.append(f"stock storescu (Nagle on), {kind} x{count}, 1 assoc: minipacs {mine:.1f} "
                   f"inst/s, Orthanc {peer:.1f} inst/s: {ratio:.2f}x")
    return out


def _pair(rates: dict[tuple[str, str], float], kind: str) -> tuple[float, float, float]:
    """(minipacs, Orthanc, minipacs / Orthanc) for one set; nan where not measured."""
    mine, peer = rates.get((kind, "minipacs"), math.nan), rates.get((kind, "orthanc"), math.nan)
    return mine, peer, mine / peer if peer else math.nan


def markdown(runs: list[StockRun], trials: int) -> list[str]:
    rates = medians(runs)
    missing = sum(r.count - r.acked for r in runs)
    out = ["", "**The sender as shipped** (`storescu` without `TCP_NODELAY=1`, so with Nagle's "
           "algorithm on, as Debian ships DCMTK; one association; acknowledged instances/s, "
           f"{trials} trial(s), medians; not a target: the rows above give every `storescu` "
           "`TCP_NODELAY=1`)", "",
           "| set | Orthanc, TCP_NODELAY=1 | minipacs (native stack) | minipacs / Orthanc |",
           "|---|---|---|---|"]
    for kind, count in SETS:
        mine, peer, ratio = _pair(rates, kind)
        out.append(f"| {kind}, {count} instances | {peer:.1f} | {mine:.1f} | {ratio:.2f}x |")
    if missing:
        out += ["", f"- {missing} instance(s) sent by a stock `storescu` were NOT acknowledged"]
    return out
