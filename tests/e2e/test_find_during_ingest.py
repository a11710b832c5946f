"""RELIABILITY: C-FIND while a bulk ingest is running (invariant 2 of DESIGN.md, file before
index). Every instance that DCMTK's findscu can see is already in S3, with the size the index
gives, at the moment it is seen; the answers grow as the ingest goes on and end complete."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from minio.error import S3Error

from scripts.native import Stack
from tests.conftest import dsn, s3_client
from tests.dicomgen import small_set
from tests.e2e.test_find import findscu
from tests.helpers import dcmtk, dcmtk_env, pg, wait_until

pytestmark = pytest.mark.e2e


def _visible(stack: Stack, study: str, series: str) -> set[str]:
    found = findscu(stack.config.gateway_port, [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}",
        "SOPInstanceUID"])
    assert found.final == "Success", found.output[-1500:]
    return set(found.values("SOPInstanceUID"))


def _missing_from_s3(stack: Stack, sop_uids: set[str]) -> list[str]:
    """Those of ``sop_uids`` whose object is not in S3 with the indexed size."""
    client = s3_client(stack)
    rows = pg(dsn(stack), "SELECT sop_instance_uid, object_key, size FROM instance "
              "WHERE sop_instance_uid = ANY($1::text[])", sorted(sop_uids))
    assert {r["sop_instance_uid"] for r in rows} == sop_uids
    missing = []
    for row in rows:
        try:
            stat = client.stat_object("minipacs", row["object_key"])
        except S3Error:
            missing.append(row["sop_instance_uid"])
            continue
        if stat.size != row["size"]:
            missing.append(row["sop_instance_uid"])
    return missing


def test_what_c_find_returns_during_an_ingest_is_already_in_s3(stack: Stack,
                                                                tmp_path: Path) -> None:
    made = small_set(tmp_path / "small", patients=1, studies=1, series=2, per_series=300,
                     tag="find-during")
    study = made[0].study_uid
    series = sorted({m.series_uid for m in made})
    sent = {s: {m.sop_uid for m in made if m.series_uid == s} for s in series}
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-aec", "MINIPACS", "127.0.0.1", str(stack.config.gateway_port),
         *[str(m.path) for m in made]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=dcmtk_env())
    seen = {s: set[str]() for s in series}
    partial_rounds = 0
    try:
        while sender.poll() is None:
            for s in series:
                now = _visible(stack, study, s)
                assert now <= sent[s], "C-FIND returned an instance that was never sent"
                assert seen[s] <= now, "an instance C-FIND had returned disappeared"
                assert _missing_from_s3(stack, now - seen[s]) == []
                partial_rounds += 0 < len(now) < len(sent[s])
                seen[s] = now
    finally:
        output, _ = sender.communicate(timeout=300)
    assert sender.returncode == 0, output[-1500:]
    # the queries above did run while instances were still arriving
    assert partial_rounds > 0
    for s in series:
        def complete(s: str = s) -> bool:
            return _visible(stack, study, s) == sent[s]

        wait_until(complete, 120, what="every instance of the series visible to C-FIND")
        assert _missing_from_s3(stack, sent[s]) == []
