"""The ingest bench: each data set, 1 and 4 associations, storescp / Orthanc / minipacs
interleaved within every trial (the order rotates from trial to trial)."""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import busy_seconds, rusage_seconds
from bench.datasets import OUT, DataSet, dataset
from bench.send import send
from bench.servers import Orthanc, Server, StoreSCP, rotated, settle
from bench.target import Minipacs

SERVERS = ("storescp", "orthanc", "minipacs")


@dataclass(frozen=True)
class Options:
    sizes: dict[str, int]  # data set -> instance count
    trials: int
    associations: tuple[int, ...] = (1, 4)
    keep: bool = False  # keep the run directory (server logs, storescu output)
    # more measurements with the started servers (Orthanc, minipacs), before they stop
    then: Callable[[list[Server], Path], None] | None = None


@dataclass(frozen=True)
class Run:
    kind: str
    associations: int
    server: str
    trial: int
    count: int
    acked: int
    failed: int
    seconds: float  # launch of the first storescu to exit of the last
    mbytes: float  # acknowledged MB (10^6 bytes)
    cpu: float  # server CPU seconds (minipacs: whole stack, until indexed)
    indexed: float | None  # minipacs: seconds from launch until the last one is indexed
    clients: float  # storescu CPU seconds
    others: float  # CPU seconds of everything else on the machine in the same window
    parts: dict[str, float]  # server CPU seconds by component (minipacs: gateway, rabbitmq...)

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0

    @property
    def mb_rate(self) -> float:
        return self.mbytes / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_1000(self) -> float:
        return 1000 * self.cpu / self.acked if self.acked else float("nan")


def trial_sets(opts: Options) -> dict[tuple[str, int, int], DataSet]:
    """One copy of each set per (trial, associations), with its own UIDs."""
    out = {}
    for kind, count in opts.sizes.items():
        for trial in range(opts.trials):
            for assoc in opts.associations:
                print(f"data: {kind} x{count}, trial {trial + 1}, {assoc} assoc", flush=True)
                out[(kind, trial, assoc)] = dataset(kind, count, f"b{kind}t{trial}a{assoc}")
    return out


def measure(server: Server, data: DataSet, assoc: int, trial: int, work: Path) -> Run:
    server.begin(work)
    try:
        settle()
        meter = server.meter().start()
        busy0 = busy_seconds()
        kids0 = rusage_seconds(resource.RUSAGE_CHILDREN)
        self0 = rusage_seconds(resource.RUSAGE_SELF)
        sent = send(data.files, server.port, server.aet, assoc,
                    work / "storescu" / f"{server.name}-{data.tag}")
        indexed = server.indexed_after(sent.t0, sent.acked, max(120.0, 20 * sent.seconds))
        parts = meter.stop()
        cpu = sum(parts.values())
        clients = rusage_seconds(resource.RUSAGE_CHILDREN) - kids0
        own = rusage_seconds(resource.RUSAGE_SELF) - self0
        others = busy_seconds() - busy0 - cpu - clients - own
    finally:
        server.end()
    return Run(data.kind, assoc, server.name, trial, data.count, sent.acked, sent.failed,
               sent.seconds, data.nbytes * sent.acked / data.count / 1e6, cpu, indexed,
               clients, max(0.0, others), parts)


def describe(run: Run) -> str:
    extra = ""
    if run.server == "minipacs":
        extra = (f", indexed {run.indexed / run.seconds:.2f}x ack time" if run.indexed
                 else ", NOT all indexed before the deadline")
    bad = f", {run.count - run.acked} NOT acknowledged" if run.acked != run.count else ""
    return (f"  {run.kind:5} {run.associations} assoc {run.server:8} trial {run.trial + 1}: "
            f"{run.rate:7.1f} inst/s {run.mb_rate:7.1f} MB/s, CPU {run.cpu_per_1000:6.2f} "
            f"s/1000{extra}{bad} (others on the machine: {run.others:.1f} CPU-s)")


def idle_cost(server: Server, work: Path, associations: int = 4,
              seconds: float = 5.0) -> dict[str, float]:
    """CPU (% of one core, by component) ``server`` spends while ``associations`` associations
    stay open and silent: what a modality that keeps its association open costs."""
    from pynetdicom import AE  # only this measurement needs a DICOM client in-process

    server.begin(work)
    ae = AE(ae_title="IDLESCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assocs = []
    try:
        settle()
        assocs = [ae.associate("127.0.0.1", server.port, ae_title=server.aet)
                  for _ in range(associations)]
        if not all(a.is_established for a in assocs):
            raise RuntimeError(f"{server.name}: idle associations were not accepted")
        time.sleep(0.5)  # let the association set-up work finish before metering
        meter = server.meter().start()
        time.sleep(seconds)  # the measurement window itself, not a synchronisation
        return {part: 100 * cpu / seconds for part, cpu in meter.stop().items()}
    finally:
        for a in assocs:
            a.release()
        server.end()


def run_ingest(opts: Options) -> list[Run]:
    sets = trial_sets(opts)
    work = OUT / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    with ExitStack() as cleanup:
        if not opts.keep:
            cleanup.callback(shutil.rmtree, work, True)
        minipacs = Minipacs(work)
        cleanup.callback(minipacs.close)
        peers: list[Server] = [StoreSCP(), Orthanc()]
        for peer in peers:
            cleanup.callback(peer.close)
        print("starting the minipacs stack", flush=True)
        minipacs.open()
        servers = [*peers, minipacs]
        for trial in range(opts.trials):
            print(f"trial {trial + 1}/{opts.trials}", flush=True)
            for kind in opts.sizes:
                for assoc in opts.associations:
                    for server in rotated(servers, trial):
                        run = measure(server, sets[(kind, trial, assoc)], assoc, trial, work)
                        print(describe(run), flush=True)
                        runs.append(run)
        for server in servers:
            if server.name != "storescp":  # one process per association: nothing to hold
                IDLE[server.name] = idle_cost(server, work)
                print(f"  idle: {server.name} with 4 silent associations open: "
                      f"{idle_text(IDLE[server.name])}", flush=True)
        if opts.then is not None:
            opts.then([s for s in servers if s.name != "storescp"], work)
    return runs


# server -> % of a core by component with 4 silent associations (last run)
IDLE: dict[str, dict[str, float]] = {}


def idle_text(parts: dict[str, float]) -> str:
    """"2.3 % of a core (gateway 0.2 %)": the gateway is the part that holds the associations;
    the rest of the stack (broker, database, S3 store) idles the same with or without them."""
    text = f"{sum(parts.values()):.1f} % of a core"
    return text + (f" (gateway {parts['gateway']:.1f} %)" if "gateway" in parts else "")
