"""The retrieve bench: the 300-instance CT study stored into minipacs and into Orthanc, then
C-MOVE of the study (DCMTK ``movescu``) to a fresh receiving DCMTK ``storescp``, and C-GET of
the study with DCMTK ``getscu`` into a fresh directory, from each server; trials interleaved,
the server order rotating from trial to trial. The same again for the study compressed in
JPEG-LS lossless, which the tools (as installed) take only decompressed, so each server
decompresses it (ops ``move-jls`` / ``get-jls``: figures, no target). Every DCMTK tool runs
with TCP_NODELAY=1.
CPU seconds are counted per run: the server's processes (minipacs: the whole stack, by
component) and, apart, the DCMTK side (``movescu`` / ``getscu`` and the receiving
``storescp``)."""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.cpu import CpuMeter, rusage_seconds
from bench.datasets import OUT, dataset
from bench.dimse import (
    GETSCU_AET,
    MOVESCU_AET,
    RECEIVER_AET,
    QROrthanc,
    Receiver,
    fmt,
    getscu,
    movescu,
)
from bench.report import machine
from bench.send import send
from bench.servers import Server, settle
from bench.target import Minipacs
from scripts.native import free_port

# "-jls": the same study stored JPEG-LS compressed, retrieved by tools that take only
# uncompressed syntaxes (``storescp`` and ``getscu`` as installed): both servers decompress
OPS = ("move", "get", "move-jls", "get-jls")
TARGETED = ("move", "get")  # issue 3's targets; the "-jls" ones are figures only
COLD = "minipacs-s3"  # minipacs with MINIPACS_CACHE_MB=0: what a study not read lately costs
SERVERS = ("orthanc", "minipacs", COLD)
OP_TEXT = {"move": "C-MOVE to a fresh `storescp`", "get": "C-GET with `getscu`",
           "move-jls": "C-MOVE of the JPEG-LS study to `storescp` (decompressed)",
           "get-jls": "C-GET of the JPEG-LS study with `getscu` (decompressed)"}
TARGET = 1.0


@dataclass(frozen=True)
class Options:
    count: int = 300
    trials: int = 3
    keep: bool = False


@dataclass(frozen=True)
class Run:
    op: str
    server: str
    trial: int
    expected: int
    received: int
    seconds: float
    exit_code: int
    cpu: dict[str, float] = field(default_factory=dict)  # server CPU seconds, by component
    dcmtk_cpu: float = 0.0  # movescu / getscu and the receiving storescp

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        """Server CPU milliseconds per instance received."""
        return sum(self.cpu.values()) * 1000 / self.received if self.received else 0.0


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def measure(server: Server, op: str, trial: int, study_uid: str, expected: int,
            receiver_port: int, work: Path) -> Run:
    folder = work / f"{op}-{server.name}-t{trial}"
    log = folder / f"{op}scu.log"
    folder.mkdir(parents=True, exist_ok=True)
    receiver_cpu: dict[str, float] = {}
    # what a run receives stays until the bench ends: removing it would slow the next run's
    # file creation (``bench/servers.py``, ``ProcessServer``)
    if op.startswith("move"):
        with Receiver(receiver_port, folder / "receiver") as receiver:
            settle(0.3)
            assert receiver.proc is not None
            parent = psutil.Process(receiver.proc.pid)
            receiving = CpuMeter(lambda: [("storescp", p) for p in
                                          (parent, *parent.children())],
                                 reaper=("storescp", parent)).start()
            meter = server.meter().start()
            tools = rusage_seconds(resource.RUSAGE_CHILDREN)
            seconds, code = movescu(server.port, server.aet, study_uid, log)
            cpu = meter.stop()
            tools = rusage_seconds(resource.RUSAGE_CHILDREN) - tools
            receiver_cpu = receiving.stop()
            received = receiver.received()
    else:
        out = folder / "get"
        settle(0.3)
        meter = server.meter().start()
        tools = rusage_seconds(resource.RUSAGE_CHILDREN)
        seconds, code = getscu(server.port, server.aet, study_uid, out, log)
        cpu = meter.stop()
        tools = rusage_seconds(resource.RUSAGE_CHILDREN) - tools
        received = _files(out)
    return Run(op, server.name, trial, expected, received, seconds, code,
               {k: round(v, 4) for k, v in cpu.items()},
               round(tools + sum(receiver_cpu.values()), 4))


def run_retrieve(opts: Options) -> list[Run]:
    data = dataset("ct", opts.count, "bretrieve")
    jls = dataset("ct-jls", opts.count, "bretrievejls")
    studies = {op: _study_uid((jls if op.endswith("-jls") else data).files[0]) for op in OPS}
    work = OUT / f"run-retrieve-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    receiver_port = free_port()
    runs: list[Run] = []
    with ExitStack() as cleanup:
        if not opts.keep:
            cleanup.callback(shutil.rmtree, work, True)
        nodes = json.dumps({
            "receiver": [RECEIVER_AET, "127.0.0.1", receiver_port],
            "getscu": [GETSCU_AET, "127.0.0.1", 104],
            "movescu": [MOVESCU_AET, "127.0.0.1", 104],
        })
        minipacs = Minipacs(work)  # as shipped: the hot cache on (shared/cache.py)
        cold = Minipacs(work / "cold")  # every read from S3
        cold.name = COLD
        minipacs.stack.config.extra_env["MINIPACS_NODES"] = nodes
        cold.stack.config.extra_env.update(MINIPACS_NODES=nodes, MINIPACS_CACHE_MB="0")
        cleanup.callback(minipacs.close)
        cleanup.callback(cold.close)
        orthanc = QROrthanc(receiver_port)
        cleanup.callback(orthanc.close)
        print("retrieve: starting two minipacs stacks (hot cache on / off) and Orthanc",
              flush=True)
        for stack in (minipacs, cold):
            stack.open()
            stack.begin(work)
        orthanc.begin(work)
        servers: list[Server] = [orthanc, minipacs, cold]
        for server in servers:
            for name, files, extra in (("CT study", data.files, ()),
                                       ("JPEG-LS CT study", jls.files, ("-xt",))):
                print(f"retrieve: storing the {name} ({len(files)}) into {server.name}",
                      flush=True)
                sent = send(files, server.port, server.aet, 1,
                            work / "storescu" / server.name / name.replace(" ", "-"),
                            extra=extra)
                if sent.acked != len(files):
                    raise RuntimeError(f"{server.name}: {sent.acked} of {len(files)} "
                                       f"acknowledged ({name})")
                if (isinstance(server, Minipacs)
                        and server.indexed_after(sent.t0, sent.acked, 300) is None):
                    raise RuntimeError(f"{server.name} did not index the {name} in time")
        settle(2.0)
        for trial in range(opts.trials):
            print(f"retrieve: trial {trial + 1}/{opts.trials}", flush=True)
            order = servers[trial % 3:] + servers[:trial % 3]
            for op in OPS:
                for server in order:
                    run = measure(server, op, trial, studies[op], data.count, receiver_port,
                                  work)
                    runs.append(run)
                    bad = (f", only {run.received} of {run.expected} received"
                           if run.received != run.expected else "")
                    print(f"  {op:8} {server.name:8} trial {trial + 1}: {run.rate:7.1f} inst/s "
                          f"({run.seconds:.2f} s, exit {run.exit_code}), server CPU "
                          f"{run.cpu_ms:.2f} ms/inst {_parts(run)}{bad}", flush=True)
    return runs


def _parts(run: Run) -> str:
    if len(run.cpu) < 2 or not run.received:
        return ""
    return "(" + " ".join(f"{k} {v * 1000 / run.received:.2f}" for k, v in
                          sorted(run.cpu.items(), key=lambda kv: -kv[1]) if v > 0) + ")"


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# -- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    op: str
    rate: dict[str, float]  # median instances/s per server
    ratio: float  # median of the per-trial minipacs / Orthanc ratios (the target's figure)
    incomplete: int  # runs that did not receive every instance
    cpu_ms: dict[str, float] = field(default_factory=dict)  # median server CPU ms/instance
    parts_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # minipacs stacks
    cold_ratio: float = float("nan")  # the same for minipacs without its hot cache


def _paired_ratio(by: dict[tuple[str, int], Run], server: str) -> float:
    ratios = [by[(server, t)].rate / by[("orthanc", t)].rate
              for (s, t) in by if s == "orthanc" and (server, t) in by
              and by[("orthanc", t)].rate > 0]
    return statistics.median(ratios) if ratios else float("nan")


def summarize(runs: list[Run]) -> list[Summary]:
    out = []
    for op in OPS:
        cell = [r for r in runs if r.op == op]
        rate = {s: statistics.median([r.rate for r in cell if r.server == s])
                for s in SERVERS if any(r.server == s for r in cell)}
        by = {(r.server, r.trial): r for r in cell}
        cpu = {s: statistics.median([r.cpu_ms for r in cell if r.server == s])
               for s in rate}
        parts = {}
        for server in ("minipacs", COLD):
            ours = [r for r in cell if r.server == server and r.received]
            if ours:
                parts[server] = {
                    k: statistics.median([r.cpu.get(k, 0.0) * 1000 / r.received for r in ours])
                    for k in sorted({k for r in ours for k in r.cpu})}
        out.append(Summary(op, rate, _paired_ratio(by, "minipacs"),
                           sum(r.received != r.expected for r in cell), cpu, parts,
                           _paired_ratio(by, COLD)))
    return out


def target_lines(summary: list[Summary]) -> list[str]:
    out = []
    for s in summary:
        if s.op not in TARGETED:
            continue
        ok = s.ratio >= TARGET and s.incomplete == 0
        out.append(f"{'PASS' if ok else 'FAIL'}: {OP_TEXT[s.op]}, CT study, instances/s vs "
                   f"Orthanc: {fmt(s.ratio, 2)}x (target ≥ {TARGET}x)"
                   + (f"; {s.incomplete} incomplete run(s)" if s.incomplete else ""))
    return out


def text_table(summary: list[Summary]) -> str:
    nan = float("nan")
    lines = [f"{'op':9}{'orthanc':>10}{'minipacs':>10}{'ratio':>8}{COLD:>13}{'ratio':>8}"
             f"{'cpu ms/inst orthanc':>22}{'minipacs':>10}{COLD:>13}"]
    for s in summary:
        lines.append(f"{s.op:9}{fmt(s.rate.get('orthanc', nan)):>10}"
                     f"{fmt(s.rate.get('minipacs', nan)):>10}{fmt(s.ratio, 2) + 'x':>8}"
                     f"{fmt(s.rate.get(COLD, nan)):>13}{fmt(s.cold_ratio, 2) + 'x':>8}"
                     f"{fmt(s.cpu_ms.get('orthanc', nan), 2):>22}"
                     f"{fmt(s.cpu_ms.get('minipacs', nan), 2):>10}"
                     f"{fmt(s.cpu_ms.get(COLD, nan), 2):>13}")
    return "\n".join(lines)


def markdown(runs: list[Run], trials: int, command: str) -> str:
    summary = summarize(runs)
    count = runs[0].expected if runs else 0
    out = [f"Last run: {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()}; `{command}`; "
           f"CT study of {count} instances, {trials} trial(s) interleaved, medians. The "
           "`-jls` rows: the same study compressed by DCMTK's `dcmcjpls` (JPEG-LS lossless), "
           "stored as sent, and retrieved by `storescp` / `getscu` as installed, which take "
           "only uncompressed syntaxes: both servers decompress each instance.", "",
           "**Targets (issue 3)**", ""]
    out += [f"- {line}" for line in target_lines(summary)]
    nan = float("nan")
    out += ["", "**Instances/s** (launch of `movescu` / `getscu` until it exits). `minipacs` "
            "is the native stack as shipped: the study was just stored, so it is in the hot "
            f"cache (`MINIPACS_CACHE_MB`). `{COLD}` is a second stack with the cache off: "
            "every instance read from the S3 store (SeaweedFS here), as for a study not read "
            "or stored lately.", "",
            "| operation | Orthanc, TCP_NODELAY=1 | minipacs | minipacs / Orthanc | "
            f"{COLD} | {COLD} / Orthanc |", "|---|---|---|---|---|---|"]
    for s in summary:
        out.append(f"| {OP_TEXT[s.op]} | {fmt(s.rate.get('orthanc', nan))} | "
                   f"{fmt(s.rate.get('minipacs', nan))} | {fmt(s.ratio, 2)}x | "
                   f"{fmt(s.rate.get(COLD, nan))} | {fmt(s.cold_ratio, 2)}x |")
    out += ["", "**Server CPU milliseconds per instance** (user + system; minipacs counts the "
            "whole stack, RabbitMQ and PostgreSQL included; the DCMTK tools and the receiving "
            "`storescp` are not counted)", "",
            "| operation | Orthanc | minipacs | by component | "
            f"{COLD} | by component |", "|---|---|---|---|---|---|"]
    for s in summary:
        cells = []
        for server in ("minipacs", COLD):
            parts = s.parts_ms.get(server, {})
            cells += [fmt(s.cpu_ms.get(server, nan), 2),
                      ", ".join(f"{k} {v:.2f}" for k, v in
                                sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.005)]
        out.append(f"| {OP_TEXT[s.op]} | {fmt(s.cpu_ms.get('orthanc', nan), 2)} | "
                   + " | ".join(cells) + " |")
    incomplete = sum(s.incomplete for s in summary)
    out += ["", f"Runs that did not receive every instance: {incomplete}." if incomplete else
            "Every run received every instance of the study."]
    return "\n".join(out)


def save(runs: list[Run], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in runs], indent=1))
