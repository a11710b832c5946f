"""Issue 2, end to end: a 1 GiB instance is accepted and stored byte-identical while the
gateway's (and the storage service's) resident memory stays under 300 MB; then it comes back
byte-identical over C-GET (DCMTK getscu) and C-MOVE (to a DCMTK storescp), with the gateway's
and the mover's resident memory under the same limit (RELIABILITY: "retrievable
byte-identical", "bounded memory").

The file is generated on disk without ever holding it in memory, and the stored object is
checked by streaming it back from S3."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from scripts.native import Stack, free_port, port_open
from tests.conftest import TEST_NODES, dsn, make_stack, s3_client, teardown
from tests.dicomgen import CT_IMAGE, uid
from tests.e2e.test_ingest import indexed
from tests.helpers import dcmtk, dcmtk_env, pg, storescu, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

MB = 1_000_000
RSS_LIMIT = 300 * MB
CHUNK = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class Large:
    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str
    dataset_sha256: str  # of everything after the file meta group: what goes over the wire
    size: int


def make_large_instance(path: Path, tag: str, rows: int = 16384, cols: int = 16384,
                        frames: int = 2, seed: int = 7) -> Large:
    """A Part-10 CT instance with rows*cols*frames 16-bit pixels (1 GiB by default), written
    in 1 MiB chunks of a repeating pseudo-random block: never held in memory."""
    sop, study, series = uid(tag, "sop"), uid(tag, "study"), uid(tag, "series")
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop
    ds.StudyDate = "20240301"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "LARGE1"
    ds.Modality = "CT"
    ds.ReferringPhysicianName = "REF^DOCTOR"
    ds.StudyDescription = "LARGE CT"
    ds.SeriesDescription = "1 GiB multi-frame"
    ds.PatientName = "LARGE^PATIENT"
    ds.PatientID = "LARGE-PAT"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)  # header only: no Pixel Data yet

    header = path.read_bytes()  # a few hundred bytes
    assert header[128:132] == b"DICM"
    group_len = int.from_bytes(header[140:144], "little")
    sha = hashlib.sha256(header[144 + group_len:])
    length = rows * cols * frames * 2
    assert length % 2 == 0 and length < 0xFFFFFFFF
    # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length
    element = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", length)
    block = random.Random(seed).randbytes(CHUNK)
    with path.open("ab") as fp:
        fp.write(element)
        sha.update(element)
        left = length
        while left:
            piece = block if left >= CHUNK else block[:left]
            fp.write(piece)
            sha.update(piece)
            left -= len(piece)
    size = path.stat().st_size
    assert size == len(header) + len(element) + length
    return Large(path, sop, study, series, sha.hexdigest(), size)


class RssSampler:
    """Samples the resident memory of processes (with their children) every ``every`` s in a
    background thread and keeps the maximum per name."""

    def __init__(self, procs: dict[str, int], every: float = 0.1) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.max = dict.fromkeys(procs, 0)
        self.samples = 0
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @staticmethod
    def rss(proc: psutil.Process) -> int:
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return total

    def sample(self) -> None:
        for name, proc in self._procs.items():
            try:
                self.max[name] = max(self.max[name], self.rss(proc))
            except psutil.NoSuchProcess:
                continue
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def s3_chunks(stack: Stack, key: str) -> Iterator[bytes]:
    obj = s3_client(stack).get_object("minipacs", key)
    try:
        yield from obj.stream(CHUNK)
    finally:
        obj.close()
        obj.release_conn()


def stored_hashes(stack: Stack, key: str) -> tuple[str, str, int]:
    """(SHA-256 of the whole object, SHA-256 of its dataset part, size), streamed."""
    whole, dataset = hashlib.sha256(), hashlib.sha256()
    head = b""
    skip: int | None = None  # bytes of preamble + DICM + file meta, once known
    size = 0
    for chunk in s3_chunks(stack, key):
        whole.update(chunk)
        start = size
        size += len(chunk)
        if skip is None:
            head += chunk
            if len(head) < 144:
                continue
            assert head[128:132] == b"DICM"
            skip = 144 + int.from_bytes(head[140:144], "little")
            head = b""
        if size > skip:
            dataset.update(chunk[max(0, skip - start):])
    return whole.hexdigest(), dataset.hexdigest(), size


@dataclass
class Ingested:
    stack: Stack
    large: Large
    sink: Path  # where the C-MOVE destination (DCMTK storescp) writes
    sink_port: int
    object_key: str
    transfer: float  # seconds storescu took
    ingest: float  # seconds from launch until indexed
    rss: dict[str, int]  # max RSS per service while receiving and storing
    idle: dict[str, int]  # RSS per service before the transfer


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingested]:
    """A stack that has received one 1 GiB instance from DCMTK's storescu (not yet checked:
    the tests do that), with a DCMTK storescp ("SINK") known as a C-MOVE destination."""
    tmp = tmp_path_factory.mktemp("large")
    made = time.perf_counter()
    large = make_large_instance(tmp / "large.dcm", f"large-{tmp.name}")
    print(f"\ngenerated {large.size / MB:.0f} MB in {time.perf_counter() - made:.1f} s")
    assert large.size >= GIB
    sink_port = free_port()
    stack = make_stack(tmp, "large", MINIPACS_NODES=json.dumps(
        {**TEST_NODES, "sink": ["SINK", "127.0.0.1", sink_port]}))
    try:
        stack.start()
        pids = {name: stack.procs[name].pid for name in ("gateway", "storage")}
        with RssSampler(pids) as rss:
            idle = dict(rss.max)
            sent = time.perf_counter()
            result = storescu(stack.config.gateway_port, [large.path], timeout=1200)
            transfer = time.perf_counter() - sent
            assert result.successes == 1 and result.failures == 0, result.output[-2000:]
            wait_until(lambda: indexed(stack, [large.study_uid]) == 1, 600, every=0.5,
                       what="the 1 GiB instance indexed")
            ingest = time.perf_counter() - sent
        rows = pg(dsn(stack), "SELECT object_key FROM instance WHERE sop_instance_uid = $1",
                  large.sop_uid)
        yield Ingested(stack, large, tmp / "sink", sink_port, rows[0]["object_key"],
                       transfer, ingest, rss.max, idle)
    finally:
        teardown(stack)
        large.path.unlink(missing_ok=True)
        shutil.rmtree(stack.config.base_dir / "s3", ignore_errors=True)  # the 1 GiB object


def test_one_gib_instance_is_stored_with_bounded_memory(ingested: Ingested) -> None:
    large, stack = ingested.large, ingested.stack
    print(f"\nstorescu: 1 GiB C-STORE in {ingested.transfer:.1f} s "
          f"({large.size / MB / ingested.transfer:.0f} MB/s); indexed after "
          f"{ingested.ingest:.1f} s")
    for name in ("gateway", "storage"):
        print(f"{name} max RSS while receiving and storing: {ingested.rss[name] / MB:.0f} MB "
              f"(idle {ingested.idle[name] / MB:.0f} MB)")
    rows = pg(dsn(stack), "SELECT object_key, sha256, size FROM instance "
              "WHERE sop_instance_uid = $1", large.sop_uid)
    assert len(rows) == 1
    row = rows[0]
    whole, dataset, size = stored_hashes(stack, row["object_key"])
    assert whole == row["sha256"]
    assert size == row["size"]
    assert dataset == large.dataset_sha256, "the stored dataset differs from the one sent"
    for name in ("gateway", "storage"):
        assert ingested.rss[name] < RSS_LIMIT, f"{name} RSS {ingested.rss[name] / MB:.0f} MB"


def file_dataset_sha256(path: Path) -> str:
    """SHA-256 of a Part-10 file's dataset (what follows its meta group), streamed."""
    sha = hashlib.sha256()
    with path.open("rb") as fp:
        head = fp.read(144)
        assert head[128:132] == b"DICM", path
        fp.seek(144 + int.from_bytes(head[140:144], "little"))
        while chunk := fp.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def only_file(directory: Path) -> Path:
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def test_one_gib_instance_comes_back_over_c_get_with_bounded_memory(
        ingested: Ingested, tmp_path: Path) -> None:
    """DCMTK's getscu retrieves the 1 GiB instance: the gateway streams it from S3 through a
    temporary file, and its resident memory stays under the limit."""
    large, stack = ingested.large, ingested.stack
    out = tmp_path / "got"
    out.mkdir()
    cmd = [dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", "MINIPACS", "-od", str(out),
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={large.study_uid}",
           "127.0.0.1", str(stack.config.gateway_port)]
    try:
        with RssSampler({"gateway": stack.procs["gateway"].pid}) as rss:
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(),
                                  timeout=1200)
            took = time.perf_counter() - started
        print(f"\ngetscu: 1 GiB C-GET in {took:.1f} s ({large.size / MB / took:.0f} MB/s); "
              f"gateway max RSS {rss.max['gateway'] / MB:.0f} MB, {rss.samples} samples")
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
        got = only_file(out)
        assert file_dataset_sha256(got) == large.dataset_sha256, "C-GET returned other bytes"
        assert rss.max["gateway"] < RSS_LIMIT, f"gateway RSS {rss.max['gateway'] / MB:.0f} MB"
    finally:
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def storescp(port: int, aet: str, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """DCMTK's storescp writing what it receives, exactly as received (+B), into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", aet, "+B", "-od", str(out), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 30,
                   what="storescp listening")
        assert proc.poll() is None, "storescp exited"
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def test_one_gib_instance_moves_to_a_node_with_bounded_memory(ingested: Ingested) -> None:
    """DCMTK's movescu asks minipacs to send the 1 GiB instance to a DCMTK storescp: the
    mover streams it from S3, and neither it nor the gateway grows past the limit."""
    large, stack = ingested.large, ingested.stack
    cmd = [dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aec", "MINIPACS", "-aem", "SINK",
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={large.study_uid}",
           "127.0.0.1", str(stack.config.gateway_port)]
    try:
        with storescp(ingested.sink_port, "SINK", ingested.sink), \
                RssSampler({name: stack.procs[name].pid for name in ("gateway", "mover")}
                           ) as rss:
            started = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(),
                                  timeout=1200)
            took = time.perf_counter() - started
        print(f"\nmovescu: 1 GiB C-MOVE in {took:.1f} s ({large.size / MB / took:.0f} MB/s); "
              f"mover max RSS {rss.max['mover'] / MB:.0f} MB, gateway "
              f"{rss.max['gateway'] / MB:.0f} MB, {rss.samples} samples")
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-2000:]
        assert "Failed SOP Instance UID List" not in output, output[-2000:]
        got = only_file(ingested.sink)
        assert file_dataset_sha256(got) == large.dataset_sha256, "C-MOVE sent other bytes"
        for name in ("mover", "gateway"):
            assert rss.max[name] < RSS_LIMIT, f"{name} RSS {rss.max[name] / MB:.0f} MB"
    finally:
        shutil.rmtree(ingested.sink, ignore_errors=True)
