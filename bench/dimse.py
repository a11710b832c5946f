"""Client side of the query / retrieve benches: C-FIND latency inside one pynetdicom
association (TCP_NODELAY set on its socket: pynetdicom 3.0 does not), DCMTK ``movescu`` /
``getscu`` runs and a fresh receiving ``storescp``, plus the generated doc sections."""

from __future__ import annotations

import json
import logging
import math
import socket
import statistics
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from bench.report import DOC
from bench.servers import (
    ORTHANC,
    STORESCP,
    Orthanc,
    nodelay_env,
    spawn,
    terminate,
    wait_exited,
)
from scripts.native import free_port, port_open, wait_for

MOVESCU = "/usr/bin/movescu"  # DCMTK's, never the pynetdicom ones in .venv/bin
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


def find_latencies(port: int, called: str, queries: list[Dataset], warmup: int = 5
                   ) -> Latencies:
    """Send ``queries`` one after the other inside ONE association; the time of each is from
    the C-FIND request until its final response. The first ``warmup`` ones are not counted."""
    ae = AE(ae_title="BENCHFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"C-FIND association to {called}@{port} not established")
    ms: list[float] = []
    matches: list[int] = []
    failures = 0
    try:
        dul_sock = assoc.dul.socket
        if dul_sock is not None and dul_sock.socket is not None:
            dul_sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n, query in enumerate([*queries[:warmup], *queries]):
            t0 = time.perf_counter()
            count, final = 0, None
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status is None or "Status" not in status:
                    raise RuntimeError(f"C-FIND to {called}: no response (timeout/abort)")
                code = int(status.Status)
                if code in PENDING:
                    count += 1
                else:
                    final = code
            elapsed = (time.perf_counter() - t0) * 1000
            if n < warmup:
                continue
            ms.append(elapsed)
            matches.append(count)
            failures += final != 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return Latencies(tuple(ms), tuple(matches), failures)


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


def run_tool(argv: list[str], log: Path, timeout: float = 600) -> tuple[float, int]:
    """Run a DCMTK tool with TCP_NODELAY=1; (seconds from launch to exit, exit code)."""
    t0 = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=nodelay_env())
        (code,) = wait_exited([proc], timeout)
    return time.monotonic() - t0, code


def study_keys(study_uid: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]


def movescu(port: int, called: str, study_uid: str, log: Path) -> tuple[float, int]:
    return run_tool([MOVESCU, "-v", "-S", "-aet", MOVESCU_AET, "-aec", called, "-aem",
                     RECEIVER_AET, *study_keys(study_uid), "127.0.0.1", str(port)], log)


def getscu(port: int, called: str, study_uid: str, out: Path, log: Path) -> tuple[float, int]:
    out.mkdir(parents=True, exist_ok=True)
    return run_tool([GETSCU, "-v", "-S", "-aet", GETSCU_AET, "-aec", called, "-od", str(out),
                     *study_keys(study_uid), "127.0.0.1", str(port)], log)


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

    def launch(self, folder: Path) -> subprocess.Popen[bytes]:
        self.http_port = free_port()
        modalities: dict[str, list[str | int]] = {
            "getscu": [GETSCU_AET, "127.0.0.1", 104],
            "movescu": [MOVESCU_AET, "127.0.0.1", 104],
        }
        if self.receiver_port:
            modalities["receiver"] = [RECEIVER_AET, "127.0.0.1", self.receiver_port]
        config = {
            "Name": "bench",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": modalities,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
        }
        path = folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return spawn([ORTHANC, str(path)], folder / "orthanc.log", nodelay_env())
