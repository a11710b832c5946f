"""A compressed instance whose codestream declares another size than its dataset (RELIABILITY:
"rendering checks sizes before allocating"; "the process survives"). A few hundred bytes of
JPEG-LS whose header claims 60000 x 60000 are stored as received (pixel data is never decoded
on ingest); taken back by DCMTK's ``getscu`` in an uncompressed syntax, the conversion is
refused before any decoder runs: that sub-operation fails, named in the final response, and
the gateway serves on. The decoders size their buffers from the codestream: CharLS could not
allocate, and GDCM, tried next, aborted the gateway process (``std::length_error``)."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from scripts.native import Stack
from tests.conftest import dsn
from tests.dicomgen import CT_IMAGE, make_instance, uid
from tests.e2e.test_get import getscu
from tests.helpers import dcmtk, dcmtk_env, pg, send_as_is, wait_until

pytestmark = pytest.mark.e2e

JPEG_LS = "1.2.840.10008.1.2.4.80"


def lying_jpeg_ls(folder: Path, tag: str, claim: int) -> tuple[Path, str, str]:
    """(file, SOP Instance UID, Study Instance UID) of a 16 x 16 JPEG-LS instance whose
    codestream header (SOF55) says ``claim`` x ``claim``."""
    sop, study = uid(tag, "sop"), uid(tag, "study")
    source = make_instance(folder / f"{tag}-source.dcm", sop_class=CT_IMAGE, sop_uid=sop,
                           study_uid=study, series_uid=uid(tag, "series"),
                           patient_id=tag.upper(), patient_name="LYING^CODESTREAM", rows=16,
                           cols=16, modality="CT", instance_number=1)
    ds = dcmread(source)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    stream = bytearray(imagecodecs.jpegls_encode(np.arange(256, dtype=np.uint8).reshape(16, 16)))
    sof = stream.find(b"\xff\xf7")
    struct.pack_into(">HH", stream, sof + 5, claim, claim)
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID(JPEG_LS)
    path = folder / f"{tag}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, sop, study


def test_a_codestream_claiming_another_size_is_refused_and_the_gateway_serves_on(
        stack: Stack, tmp_path: Path) -> None:
    path, sop, study = lying_jpeg_ls(tmp_path, "lyingjls", 60000)
    port = stack.config.gateway_port
    send_as_is(port, [path], CT_IMAGE, JPEG_LS)  # stored as received: asserts Success
    wait_until(lambda: pg(dsn(stack), "SELECT 1 FROM instance WHERE sop_instance_uid = $1",
                          sop), timeout=60, what="the instance indexed")

    got = getscu(port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                 tmp_path / "got")  # -S: uncompressed syntaxes only
    assert re.search(r"Failed Suboperations\s*:\s*1\b", got.final), got.output[-3000:]
    assert re.search(r"Completed Suboperations\s*:\s*0\b", got.final), got.output[-3000:]
    assert not list((tmp_path / "got").iterdir())
    assert stack.procs["gateway"].poll() is None, "the gateway process died"
    log = stack.log_text("gateway")
    assert "the codestream declares 60000 x 60000 x 1, the dataset 16 x 16 x 1" in log
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert echo.returncode == 0, echo.stdout + echo.stderr
