"""Compressed studies, with the tools users have: a series compressed by DCMTK's own encoders
(``dcmcjpeg`` JPEG lossless, ``dcmcjpls`` JPEG-LS, ``dcmcrle`` RLE) and sent by ``storescu``
is stored as received; so are JPEG 2000 (sent by ``storescu``) and HTJ2K (by pynetdicom:
``storescu`` 3.6.7 does not know the syntax), both encoded by imagecodecs, for which DCMTK
3.6.7 has no encoder. Taken back by ``getscu`` and moved to ``storescp``, which both take only
uncompressed syntaxes by default, the series arrives decompressed with the very pixel values
that were compressed, under the same SOP Instance UIDs (as Orthanc transcodes). Moved to an
Orthanc archive, it arrives as stored, not decompressed, in each syntax Orthanc takes; in
HTJ2K, which Orthanc 1.10 does not take, decompressed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from scripts.native import Stack, free_port, port_open
from tests.conftest import TEST_NODES, dsn, make_stack, teardown
from tests.dicomgen import CT_IMAGE, HTJ2K_LOSSLESS, J2K_LOSSLESS, Made, ct_series, encode_j2k
from tests.e2e.test_get import getscu, received
from tests.e2e.test_ingest import assert_stored_byte_identical
from tests.e2e.test_move import archive_instances, final_has, movescu
from tests.helpers import dcmtk, dcmtk_env, pg, send_as_is, storescu, wait_until
from tests.orthanc import Orthanc, start_orthanc

pytestmark = pytest.mark.e2e

# encoder (a DCMTK tool, or imagecodecs through tests.dicomgen.encode_j2k), the storescu
# option proposing its syntax (None: pynetdicom sends it), the syntax
CODECS: dict[str, tuple[str, str | None, str]] = {
    "jpeg-lossless": ("dcmcjpeg", "-xs", "1.2.840.10008.1.2.4.70"),
    "jpeg-ls": ("dcmcjpls", "-xt", "1.2.840.10008.1.2.4.80"),
    "rle": ("dcmcrle", "-xr", "1.2.840.10008.1.2.5"),
    "jpeg-2000": ("imagecodecs", "-xv", J2K_LOSSLESS),
    "htj2k": ("imagecodecs", None, HTJ2K_LOSSLESS),
}
PER_CODEC = 2
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


@dataclass
class World:
    stack: Stack
    archive: Orthanc
    plain_port: int  # the node PLAIN: a default storescp, started by the test that needs it
    sent: list[Made]  # the compressed files as sent
    originals: dict[str, Path]  # SOP Instance UID -> the uncompressed file before encoding
    syntax: dict[str, str]  # SOP Instance UID -> its compressed syntax
    tmp: Path

    @property
    def port(self) -> int:
        return self.stack.config.gateway_port

    @property
    def study(self) -> str:
        return self.sent[0].study_uid


def _encode(tool: str, source: Path, target: Path, syntax: str) -> None:
    if tool == "imagecodecs":
        encode_j2k(source, target, syntax)
        return
    proc = subprocess.run([dcmtk(tool), str(source), str(target)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("compressed")
    stack = make_stack(tmp, "compressed")
    plain_port = free_port()
    archive = start_orthanc(tmp / "archive", "ARCHIVE",
                            {"minipacs": ["MINIPACS", "127.0.0.1", stack.config.gateway_port]})
    stack.config.extra_env["MINIPACS_NODES"] = json.dumps(
        {**TEST_NODES, "archive": ["ARCHIVE", "127.0.0.1", archive.dicom_port],
         "plain": ["PLAIN", "127.0.0.1", plain_port]})
    try:
        stack.start()
        series = ct_series(tmp / "original", count=PER_CODEC * len(CODECS), tag="cmpr",
                           size=128)
        sent: list[Made] = []
        originals: dict[str, Path] = {}
        syntax: dict[str, str] = {}
        for n, (name, (tool, propose, ts)) in enumerate(CODECS.items()):
            group = series[n * PER_CODEC:(n + 1) * PER_CODEC]
            paths = []
            for m in group:
                target = tmp / "sent" / name / m.path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                _encode(tool, m.path, target, ts)
                assert dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
                paths.append(target)
                sent.append(Made(target, m.patient_id, m.study_uid, m.series_uid, m.sop_uid))
                originals[m.sop_uid], syntax[m.sop_uid] = m.path, ts
            if propose is None:
                send_as_is(stack.config.gateway_port, paths, CT_IMAGE, ts)
                continue
            result = storescu(stack.config.gateway_port, paths, extra=[propose])
            assert (result.successes, result.failures) == (len(paths), 0), result.output
        uids = list(syntax)

        def indexed() -> bool:
            rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid "
                      "= ANY($1::text[])", uids)
            return int(rows[0]["n"]) == len(uids)

        wait_until(indexed, 60, what="the compressed series indexed")
        yield World(stack, archive, plain_port, sent, originals, syntax, tmp)
    finally:
        archive.stop()
        teardown(stack)


def test_compressed_instances_are_stored_as_received(world: World) -> None:
    assert_stored_byte_identical(world.stack, world.sent)
    rows = pg(dsn(world.stack), "SELECT sop_instance_uid, transfer_syntax FROM instance WHERE "
              "sop_instance_uid = ANY($1::text[])", list(world.syntax))
    assert {r["sop_instance_uid"]: r["transfer_syntax"] for r in rows} == world.syntax


def assert_decompressed(world: World, files: dict[str, Path]) -> None:
    """Every instance arrived, in an uncompressed syntax, with the original pixel values and
    the original attributes."""
    assert set(files) == set(world.syntax)
    for sop, path in files.items():
        got, original = dcmread(path), dcmread(world.originals[sop])
        assert got.file_meta.TransferSyntaxUID in UNCOMPRESSED, sop
        assert got.PixelData == original.PixelData, sop
        assert (got.Rows, got.Columns, got.BitsStored) == (original.Rows, original.Columns,
                                                           original.BitsStored)
        assert (got.PatientID, got.StudyInstanceUID) == (original.PatientID,
                                                         original.StudyInstanceUID)


def test_getscu_taking_only_uncompressed_gets_them_decompressed(world: World) -> None:
    """``getscu`` proposes the uncompressed syntaxes only (its default): every sub-operation
    used to fail with "no accepted context ... in 1.2.840.10008.1.2.4.70"."""
    out = world.tmp / "get"
    result = getscu(world.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": world.study},
                    out)
    assert "DIMSE Status                  : 0x0000" in result.final, result.output[-3000:]
    assert_decompressed(world, received(out))
    # a served sub-operation is no error: pynetdicom's context look-up logged one per syntax
    # the SCU had not accepted
    log = world.stack.log_text("gateway")
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line][:3]


def test_c_move_to_a_default_storescp_decompresses(world: World) -> None:
    out = world.tmp / "plain"
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "PLAIN", "-od", str(out),
                            str(world.plain_port)], env=dcmtk_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(world.plain_port), 30, what="storescp listening")
        result = movescu(world.port, {"QueryRetrieveLevel": "STUDY",
                                      "StudyInstanceUID": world.study}, dest="PLAIN")
        assert final_has(result, "0000"), result.output[-3000:]
        wait_until(lambda: len(list(out.iterdir())) == len(world.syntax), 30,
                   what="storescp wrote every file")
    finally:
        scp.terminate()
        scp.wait(timeout=30)
    assert_decompressed(world, received(out))


def test_c_move_to_an_archive_sends_what_it_takes_as_stored(world: World) -> None:
    """Orthanc takes JPEG lossless, JPEG-LS, RLE and JPEG 2000: nothing of those is
    decompressed, each instance arrives in the syntax it was stored in, with its pixel data as
    sent. HTJ2K, which Orthanc 1.10 does not take, arrives decompressed."""
    result = movescu(world.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": world.study},
                     dest="ARCHIVE")
    assert final_has(result, "0000"), result.output[-3000:]
    held = archive_instances(world.archive)
    assert set(world.syntax) <= set(held)
    by_uid = {m.sop_uid: m for m in world.sent}
    for sop, ts in world.syntax.items():
        got = world.archive.rest("GET", f"/instances/{held[sop]}/metadata/TransferSyntax")
        got = got.decode() if isinstance(got, bytes) else str(got)
        copy = dcmread(BytesIO(world.archive.rest("GET", f"/instances/{held[sop]}/file")))
        if ts == HTJ2K_LOSSLESS:
            assert got == UNCOMPRESSED[0], sop
            assert copy.PixelData == dcmread(world.originals[sop]).PixelData, sop
        else:
            assert got == ts, sop
            assert copy.PixelData == dcmread(by_uid[sop].path).PixelData, sop
    assert HTJ2K_LOSSLESS in world.syntax.values()
