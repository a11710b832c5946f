"""Issue 2, end to end: a 1 GiB instance is accepted and stored byte-identical while the
gateway's (and the storage service's) resident memory stays under 300 MB.

The file is generated on disk without ever holding it in memory, and the stored object is
checked by streaming it back from S3."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from scripts.native import Stack
from tests.conftest import dsn, make_stack, s3_client, teardown
from tests.dicomgen import CT_IMAGE, uid
from tests.e2e.test_ingest import indexed
from tests.helpers import pg, storescu, wait_until

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


def test_one_gib_instance_with_bounded_memory(tmp_path: Path) -> None:
    made = time.perf_counter()
    large = make_large_instance(tmp_path / "large.dcm", f"large-{tmp_path.name}")
    print(f"\ngenerated {large.size / MB:.0f} MB in {time.perf_counter() - made:.1f} s")
    assert large.size >= GIB
    stack = make_stack(tmp_path, "large")
    try:
        stack.start()
        pids = {name: stack.procs[name].pid for name in ("gateway", "storage")}
        with RssSampler(pids) as rss:
            baseline = dict(rss.max)
            sent = time.perf_counter()
            result = storescu(stack.config.gateway_port, [large.path], timeout=1200)
            transfer = time.perf_counter() - sent
            gateway_max = rss.max["gateway"]
            wait_until(lambda: indexed(stack, [large.study_uid]) == 1, 600, every=0.5,
                       what="the 1 GiB instance indexed")
            ingest = time.perf_counter() - sent
        print(f"storescu: 1 GiB C-STORE in {transfer:.1f} s "
              f"({large.size / MB / transfer:.0f} MB/s); indexed after {ingest:.1f} s; "
              f"{rss.samples} RSS samples")
        print(f"gateway max RSS during 1 GiB C-STORE: {gateway_max / MB:.0f} MB "
              f"(idle {baseline['gateway'] / MB:.0f} MB; until indexed "
              f"{rss.max['gateway'] / MB:.0f} MB)")
        print(f"storage max RSS during the S3 upload: {rss.max['storage'] / MB:.0f} MB "
              f"(idle {baseline['storage'] / MB:.0f} MB)")
        assert result.successes == 1 and result.failures == 0, result.output[-2000:]

        rows = pg(dsn(stack), "SELECT object_key, sha256, size FROM instance "
                  "WHERE sop_instance_uid = $1", large.sop_uid)
        assert len(rows) == 1
        row = rows[0]
        whole, dataset, size = stored_hashes(stack, row["object_key"])
        assert whole == row["sha256"]
        assert size == row["size"]
        assert dataset == large.dataset_sha256, "the stored dataset differs from the one sent"

        assert gateway_max < RSS_LIMIT, f"gateway RSS {gateway_max / MB:.0f} MB"
        assert rss.max["gateway"] < RSS_LIMIT, f"gateway RSS {rss.max['gateway'] / MB:.0f} MB"
        assert rss.max["storage"] < RSS_LIMIT, f"storage RSS {rss.max['storage'] / MB:.0f} MB"
    finally:
        teardown(stack)
        large.path.unlink(missing_ok=True)
        shutil.rmtree(stack.config.base_dir / "s3", ignore_errors=True)  # the 1 GiB object
