"""``python -m services.conflicts``, as an admin runs it against the running stack: a modality
sends an instance, then sends it again corrected (same SOP Instance UID, another patient name
and accession number), as happens after a correction at the console. Keep-first indexes the
first; the command lists the conflict, shows the two headers' differences, and writes either
copy to a file, byte for byte what was sent. The session's stack (``tests/conftest.py``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.native import ROOT, Stack
from tests.conftest import dsn
from tests.dicomgen import CT_IMAGE, dataset_bytes, make_instance, uid
from tests.helpers import pg, storescu, wait_until

pytestmark = pytest.mark.e2e


def conflicts_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.conflicts", *args], cwd=ROOT,
                          env=stack.service_env(), capture_output=True, text=True, timeout=60)


def test_a_corrected_copy_is_listed_shown_and_taken(stack: Stack, tmp_path: Path) -> None:
    sop = uid("conflictcli", "sop")

    def copy(name: str, patient_name: str, accession: str) -> Path:
        return make_instance(tmp_path / name, sop_class=CT_IMAGE, sop_uid=sop,
                             study_uid=uid("conflictcli", "st"),
                             series_uid=uid("conflictcli", "se"), patient_id="CONFLICTCLI",
                             patient_name=patient_name, accession=accession, rows=16, cols=16,
                             modality="CT", instance_number=1, seed=3)

    first = copy("first.dcm", "WRONG^NAME", "ACC1")
    corrected = copy("again.dcm", "RIGHT^NAME", "ACC2")  # same pixels
    port = stack.config.gateway_port
    assert storescu(port, [first]).successes == 1
    wait_until(lambda: pg(dsn(stack), "SELECT 1 FROM instance WHERE sop_instance_uid = $1",
                          sop), 60, what="the first copy indexed")
    assert storescu(port, [corrected]).successes == 1
    rows = wait_until(lambda: pg(dsn(stack), "SELECT id FROM ingest_conflict WHERE "
                                 "sop_instance_uid = $1", sop), 60, what="the conflict")
    cid = str(rows[0]["id"])

    listed = conflicts_cli(stack, "list")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if sop in x)
    assert line.split()[0] == cid and "STORESCU" in line and "keep-first" in line
    as_json = json.loads(conflicts_cli(stack, "list", "--json", "--limit", "500").stdout)
    assert any(c["sop_instance_uid"] == sop and str(c["id"]) == cid for c in as_json)

    shown = conflicts_cli(stack, "show", cid)
    assert shown.returncode == 0, shown.stderr
    differences = {x.split()[1]: x.split()[2:] for x in shown.stdout.splitlines()
                   if x.startswith("(")}
    assert differences == {"AccessionNumber": ["ACC1", "ACC2"],
                           "PatientName": ["WRONG^NAME", "RIGHT^NAME"]}, shown.stdout
    assert "keep-first" in shown.stdout

    for flag, sent in ((), corrected), (("--kept",), first):
        out = tmp_path / f"copy{len(flag)}.dcm"
        took = conflicts_cli(stack, "get", cid, str(out), *flag)
        assert took.returncode == 0, took.stderr
        assert dataset_bytes(out) == dataset_bytes(sent)
    other = pg(dsn(stack), "SELECT rejected_sha256 FROM ingest_conflict WHERE id = $1",
               int(cid))[0]["rejected_sha256"]
    assert hashlib.sha256((tmp_path / "copy0.dcm").read_bytes()).hexdigest() == other

    missing = conflicts_cli(stack, "show", "999999999")
    assert missing.returncode == 1 and "no conflict 999999999" in missing.stderr
    assert conflicts_cli(stack, "show", "x").returncode == 2
    assert conflicts_cli(stack, "list", "--limit", "0").returncode == 2
