"""Client side of the query / retrieve benches: C-FIND latency inside one association, timed
by DCMTK's ``findscu`` (its own log timestamps, microseconds) or by a pynetdicom client
(TCP_NODELAY set on its socket: pynetdicom 3.0 does not), DCMTK ``movescu`` / ``getscu`` runs
and a fresh receiving ``storescp``, plus the generated doc sections."""

from __future__ import annotations

import itertools
import logging
import math
import re
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from bench.report import DOC
from bench.servers import (
    STORESCP,
    Orthanc,
    nodelay_env,
    spawn,
    stock_env,
    terminate,
    wait_exited,
)
from scripts.native import port_open, wait_for

MOVESCU = "/usr/bin/movescu"  # DCMTK's, never the pynetdicom ones in .venv/bin
FINDSCU = "/usr/bin/findscu"
GETSCU = "/usr/bin/getscu"
RECEIVER_AET = "RECEIVER"
GETSCU_AET = "GETSCU"
MOVESCU_AET = "MOVESCU"
PENDING = (0xFF00, 0xFF01)

logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def study_query(**keys: str) -> Dataset:
    """A study-level identifier with the return keys a study list asks for."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for name in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
                 "StudyDescription", "StudyInstanceUID", "ModalitiesInStudy",
                 "NumberOfStudyRelatedInstances"):
        setattr(ds, name, "")
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


@dataclass(frozen=True)
class Latencies:
    ms: tuple[float, ...]
    matches: tuple[int, ...]
    failures: int  # queries whose final status was not Success

    @property
    def median(self) -> float:
        return statistics.median(self.ms) if self.ms else math.nan

    @property
    def p95(self) -> float:
        return percentile(self.ms, 95)

    @property
    def median_matches(self) -> float:
        return statistics.median(self.matches) if self.matches else math.nan


def percentile(values: Iterable[float], pct: float) -> float:
    vals = sorted(values)
    if not vals:
        return math.nan
    k = (len(vals) - 1) * pct / 100
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def associate_nodelay(ae: AE, port: int, called: str) -> Association:
    """An association to ``called`` on loopback with TCP_NODELAY on its socket (pynetdicom
    leaves Nagle on: each query would then wait for the server's delayed ACK, ~40 ms)."""
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"C-FIND association to {called}@{port} not established")
    dul_sock = assoc.dul.socket
    if dul_sock is not None and dul_sock.socket is not None:
        dul_sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def find_latencies(port: int, called: str, queries: list[Dataset], warmup: int = 5, *,
                   start: Callable[[], None] | None = None,
                   running: Callable[[], bool] | None = None) -> Latencies:
    """Send ``queries`` one after the other inside ONE association; the time of each is from
    the C-FIND request until its final response. The first ``warmup`` ones are not counted.
    A query the server aborts (or leaves unanswered) counts as a failure and the rest go on in
    a new association; a second abort in a row ends the run with an error.

    With ``start`` and ``running`` (queries during some other load): after the warm-up,
    ``start()`` begins the load; the queries then go round until ``running()`` is false, and
    only those that began and ended while it was true count."""
    ae = AE(ae_title="BENCHFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60

    def associate() -> Association:
        return associate_nodelay(ae, port, called)

    def sequence() -> Iterator[tuple[bool, Dataset]]:
        """(counted?, query): the warm-up, then the queries once, or round while running."""
        yield from ((False, q) for q in queries[:warmup])
        if start is None or running is None:
            yield from ((True, q) for q in queries)
            return
        start()
        for q in itertools.cycle(queries):
            if not running():
                return
            yield running(), q

    ms: list[float] = []
    matches: list[int] = []
    failures = 0
    aborted_last = False
    assoc = associate()
    try:
        for n, (counted, query) in enumerate(sequence()):
            t0 = time.perf_counter()
            count, final = 0, None
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status is None or "Status" not in status:
                    break  # aborted, or no answer within the DIMSE timeout
                code = int(status.Status)
                if code in PENDING:
                    count += 1
                else:
                    final = code
            elapsed = (time.perf_counter() - t0) * 1000
            counted = counted and (running is None or running())
            if final is None:
                if aborted_last:
                    raise RuntimeError(f"C-FIND to {called}: no response twice in a row "
                                       "(timeout/abort)")
                print(f"  C-FIND to {called}: query {n} got no response (timeout/abort); "
                      "counted as a failure, going on in a new association", flush=True)
                aborted_last = True
                failures += counted
                assoc.abort()
                assoc = associate()
                continue
            aborted_last = False
            if not counted:
                continue
            ms.append(elapsed)
            matches.append(count)
            failures += final != 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return Latencies(tuple(ms), tuple(matches), failures)


# findscu's log with a timestamp in microseconds on every line, at INFO: one "Sending Find
# Request" per query file, a "Find Response: n (Pending)" per match, then the final response.
_FINDSCU_LOG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.logToStderr = false
log4cplus.appender.console.ImmediateFlush = false
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%Q} %m%n
"""
_LOG_LINE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3})\.(\d{3}) (.*)")
_FIND_MODEL = str(StudyRootQueryRetrieveInformationModelFind)


def parse_findscu_log(text: str) -> list[tuple[float, int, bool]]:
    """findscu's timed log -> (ms from request to final response, matches, Success?) per
    query, in order."""
    out: list[tuple[float, int, bool]] = []
    started: float | None = None
    matches = 0
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m is None:
            continue
        h, mi, sec, ms, us = (int(g) for g in m.groups()[:5])
        t = ((h * 60 + mi) * 60 + sec) * 1000 + ms + us / 1000
        message = m.group(6)
        if message.startswith("Sending Find Request"):
            started, matches = t, 0
        elif message.startswith("Find Response:") and "(Pending" in message:
            matches += 1
        elif message.startswith("Received Final Find Response") and started is not None:
            elapsed = t - started if t >= started else t + 86_400_000 - started  # midnight
            out.append((elapsed, matches, "(Success" in message))
            started = None
    return out


def findscu_latencies(port: int, called: str, queries: list[Dataset], warmup: int = 5
                      ) -> Latencies:
    """Send ``queries`` one after the other inside ONE association with DCMTK's ``findscu``
    (a query file each, Study Root, TCP_NODELAY=1); the time of each is findscu's own, from
    sending the request to receiving the final response, so its 30-40 ms start-up is not in
    it. The first ``warmup`` ones are not counted."""
    with tempfile.TemporaryDirectory(prefix="findscu-") as tmp:
        folder = Path(tmp)
        files: list[str] = []
        for n, query in enumerate([*queries[:warmup], *queries]):
            ds = query.copy()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = UID(_FIND_MODEL)
            ds.file_meta.MediaStorageSOPInstanceUID = UID(f"2.25.{n + 1}")
            path = folder / f"q{n:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(str(path))
        config = folder / "log.cfg"
        config.write_text(_FINDSCU_LOG)
        run = subprocess.run(
            [FINDSCU, "-S", "-lc", str(config), "-aet", "BENCHFIND", "-aec", called,
             "-to", "60", "-ta", "60", "-td", "60", "127.0.0.1", str(port), *files],
            env=nodelay_env(), capture_output=True, timeout=600, check=False)
    timed = parse_findscu_log(run.stdout.decode("utf-8", "replace"))
    if len(timed) != len(files):
        raise RuntimeError(f"findscu to {called}: {len(timed)} of {len(files)} queries got a "
                           f"final response (exit {run.returncode}): "
                           f"{run.stderr.decode(errors='replace')[-300:]}")
    counted = timed[warmup:]
    return Latencies(tuple(t for t, _, _ in counted), tuple(n for _, n, _ in counted),
                     sum(1 for _, _, ok in counted if not ok))


class Receiver:
    """A fresh DCMTK ``storescp --fork`` (TCP_NODELAY=1) writing into its own directory."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Receiver:
        self.folder.mkdir(parents=True, exist_ok=True)
        files = self.folder / "files"
        files.mkdir(exist_ok=True)
        self.proc = spawn([STORESCP, "--fork", "-aet", RECEIVER_AET, "-od", str(files),
                           str(self.port)], self.folder / "storescp.log", nodelay_env())

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"receiving storescp exited with {self.proc.returncode}")
            return port_open(self.port)

        wait_for(f"receiving storescp on {self.port}", up, 30, 0.05)
        return self

    def received(self) -> int:
        return sum(1 for p in (self.folder / "files").iterdir() if p.is_file())

    def __exit__(self, *exc: object) -> None:
        terminate(self.proc)
        self.proc = None


def run_tool(argv: list[str], log: Path, timeout: float = 600,
             nodelay: bool = True) -> tuple[float, int]:
    """Run a DCMTK tool with TCP_NODELAY=1 (``nodelay=False``: as Debian ships it, Nagle on);
    (seconds from launch to exit, exit code)."""
    env = nodelay_env() if nodelay else stock_env()
    t0 = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        (code,) = wait_exited([proc], timeout)
    return time.monotonic() - t0, code


def study_keys(study_uid: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]


def movescu(port: int, called: str, study_uid: str, log: Path) -> tuple[float, int]:
    return run_tool([MOVESCU, "-v", "-S", "-aet", MOVESCU_AET, "-aec", called, "-aem",
                     RECEIVER_AET, *study_keys(study_uid), "127.0.0.1", str(port)], log)


def getscu(port: int, called: str, study_uid: str, out: Path, log: Path,
           nodelay: bool = True) -> tuple[float, int]:
    out.mkdir(parents=True, exist_ok=True)
    return run_tool([GETSCU, "-v", "-S", "-aet", GETSCU_AET, "-aec", called, "-od", str(out),
                     *study_keys(study_uid), "127.0.0.1", str(port)], log, nodelay=nodelay)


def markers(name: str) -> tuple[str, str]:
    return (f"<!-- bench:{name}:begin (generated by `make bench`; everything up to "
            f"bench:{name}:end is rewritten) -->", f"<!-- bench:{name}:end -->")


def write_section(name: str, body: str, path: Path = DOC) -> None:
    """Replace the text between this bench's markers (appended at the end the first time)."""
    begin, end = markers(name)
    section = f"{begin}\n\n{body.strip()}\n\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    path.write_text(text)


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


class QROrthanc(Orthanc):
    """The bench's Orthanc, also knowing the receiving storescp and the SCUs as modalities
    (C-MOVE destinations must be known; find/move/get are allowed to anyone)."""

    def __init__(self, receiver_port: int = 0) -> None:
        super().__init__()
        self.receiver_port = receiver_port

    def config(self, folder: Path) -> dict[str, object]:
        modalities: dict[str, list[str | int]] = {
            "getscu": [GETSCU_AET, "127.0.0.1", 104],
            "movescu": [MOVESCU_AET, "127.0.0.1", 104],
        }
        if self.receiver_port:
            modalities["receiver"] = [RECEIVER_AET, "127.0.0.1", self.receiver_port]
        return {**super().config(folder), "DicomModalities": modalities,
                "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True,
                "DicomAlwaysAllowGet": True}
