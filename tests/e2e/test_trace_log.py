"""``MINIPACS_LOG_LEVEL=TRACE``: the gateway's log shows every DIMSE message and the association
PDUs as DCMTK's ``-ll trace`` and Orthanc's ``--trace`` do in the seed report (C-ECHO, C-STORE,
C-FIND and a C-MOVE to an Orthanc ARCHIVE, requests and responses), while DCMTK's tools store,
query and move as usual; at the default INFO level none of those dumps appear."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.native import Stack
from shared import dimse_wire as wire
from tests.conftest import TEST_NODES, make_stack, teardown
from tests.dicomgen import ct_series, small_set
from tests.e2e.test_bad_input import assert_endless_request_aborted
from tests.e2e.test_find import findscu
from tests.e2e.test_ingest import assert_stored_byte_identical
from tests.e2e.test_move import archive_instances, final_has, movescu
from tests.helpers import dcmtk, dcmtk_env, pg, storescu, wait_until
from tests.orthanc import Orthanc, start_orthanc

pytestmark = pytest.mark.e2e

# pynetdicom's dumps, in the layout of DCMTK's (the seed's figures 5 and 6)
DIMSE_DUMP = ("INCOMING DIMSE MESSAGE", "OUTGOING DIMSE MESSAGE", "END DIMSE MESSAGE")
MESSAGES = ("C-ECHO RQ", "C-ECHO RSP", "C-STORE RQ", "C-STORE RSP", "C-FIND RQ", "C-FIND RSP",
            "C-MOVE RQ", "C-MOVE RSP")


@pytest.fixture()
def traced(tmp_path: Path) -> Iterator[tuple[Stack, Orthanc]]:
    stack = make_stack(tmp_path, "trace", MINIPACS_LOG_LEVEL="TRACE")
    archive = start_orthanc(tmp_path / "archive", "ARCHIVE",
                            {"minipacs": ["MINIPACS", "127.0.0.1", stack.config.gateway_port]})
    stack.config.extra_env["MINIPACS_NODES"] = json.dumps(
        {**TEST_NODES, "archive": ["ARCHIVE", "127.0.0.1", archive.dicom_port]})
    try:
        stack.start()
        yield stack, archive
    finally:
        archive.stop()
        teardown(stack)


def _indexed(stack: Stack, uids: list[str]) -> int:
    rows = pg(f"postgresql://minipacs@127.0.0.1:5432/{stack.config.database}",
              "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = ANY($1::text[])",
              uids)
    return int(rows[0]["n"])


def test_trace_dumps_every_dimse_message_and_the_association(
        traced: tuple[Stack, Orthanc], tmp_path: Path) -> None:
    stack, archive = traced
    port = stack.config.gateway_port
    made = small_set(tmp_path / "in", patients=1, studies=1, series=1, per_series=3,
                     tag="tracelog")
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "-aet", "STORESCU",
                           "127.0.0.1", str(port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=60)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    sent = storescu(port, [m.path for m in made])
    assert (sent.successes, sent.failures) == (len(made), 0), sent.output
    wait_until(lambda: _indexed(stack, [m.sop_uid for m in made]) == len(made), 60,
               what="the traced instances indexed")
    # tracing takes pynetdicom's C-STORE path: it must store exactly what was sent too
    assert_stored_byte_identical(stack, made)
    found = findscu(port, ["QueryRetrieveLevel=STUDY", f"PatientID={made[0].patient_id}",
                           "StudyInstanceUID"])
    assert found.final == "Success" and len(found.responses) == 1, found.output
    moved = movescu(port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": made[0].study_uid})
    assert final_has(moved, "0000"), moved.output
    assert set(archive_instances(archive)) == {m.sop_uid for m in made}

    log = stack.log_text("gateway")
    for text in (*DIMSE_DUMP, *MESSAGES):
        assert text in log, f"{text!r} not in the TRACE log:\n{log[-3000:]}"
    # the association, as in the seed's "Associate AC PDU" figure
    assert "A-ASSOCIATE-RQ" in log and "A-ASSOCIATE-AC" in log, log[-3000:]
    # every C-STORE request and its response with the status, as storescp -ll trace shows
    assert log.count("Message Type                  : C-STORE RQ") == len(made), log[-3000:]
    assert log.count("Message Type                  : C-STORE RSP") == len(made), log[-3000:]
    assert log.count("DIMSE Status                  : 0x0000 success") == len(made) + 1, \
        log[-3000:]  # the stores and the echo
    # where the C-MOVE was asked to send (the seed's figure 9)
    assert "Move Destination              : ARCHIVE" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_info_level_has_no_dimse_dumps(stack: Stack, tmp_path: Path) -> None:
    """The session's INFO stack (``tests/conftest.py``) after a store: its one line per
    association and per instance, none of the dumps."""
    made = small_set(tmp_path / "in", patients=1, studies=1, series=1, per_series=2,
                     tag="infolog")
    sent = storescu(stack.config.gateway_port, [m.path for m in made])
    assert sent.successes == len(made), sent.output
    log = stack.log_text("gateway")
    assert "assoc=" in log, log[-2000:]
    for text in (*DIMSE_DUMP, "A-ASSOCIATE-AC PDU"):
        assert text not in log, f"{text!r} in the INFO log"


def test_trace_keeps_the_request_caps_and_takes_large_instances(tmp_path: Path) -> None:
    """Under TRACE pynetdicom receives every message itself, to print it. The gateway's caps
    on what it holds for one request (``wire.MESSAGE_MAX``, ``wire.COMMAND_MAX``) still hold:
    an endless C-FIND identifier or command set is aborted, as at INFO. A C-STORE dataset is
    not held (pynetdicom spools it to a file), so an instance larger than the cap is stored
    byte-identical, and its request and response are printed."""
    stack = make_stack(tmp_path, "tracecap", MINIPACS_LOG_LEVEL="TRACE")
    stack.start()
    try:
        for part in ("identifier", "command"):
            assert_endless_request_aborted(stack, part)
        made = ct_series(tmp_path / "big", count=1, tag="tracebig", size=2600)
        assert made[0].path.stat().st_size > wire.MESSAGE_MAX
        sent = storescu(stack.config.gateway_port, [made[0].path])
        assert (sent.successes, sent.failures) == (1, 0), sent.output
        wait_until(lambda: _indexed(stack, [made[0].sop_uid]) == 1, 60,
                   what="the large traced instance indexed")
        assert_stored_byte_identical(stack, made)
        log = stack.log_text("gateway")
        assert "Message Type                  : C-STORE RQ" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        teardown(stack)
