"""Issue 2, end to end: DCMTK storescu/echoscu against the native stack; every acknowledged
instance ends up in S3 byte-identical and indexed exactly once."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from scripts.native import Stack
from tests.conftest import dsn, make_stack, s3_client, teardown
from tests.dicomgen import CT_IMAGE, Made, ct_series, dataset_bytes, make_instance, small_set, uid
from tests.e2e.test_find import findscu
from tests.helpers import dcmtk, dcmtk_env, pg, s3_read, storescu, wait_until

pytestmark = pytest.mark.e2e


def indexed(stack: Stack, study_uids: Sequence[str]) -> int:
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance i JOIN series se ON se.id = "
              "i.series_fk JOIN study st ON st.id = se.study_fk "
              "WHERE st.study_instance_uid = ANY($1::text[])", list(study_uids))
    return int(rows[0]["n"])


def assert_stored_byte_identical(stack: Stack, made: Sequence[Made]) -> None:
    """Every sent file is indexed once, and its S3 object carries the very dataset bytes sent."""
    rows = pg(dsn(stack), "SELECT sop_instance_uid, object_key, sha256, size FROM instance "
              "WHERE sop_instance_uid = ANY($1::text[])", [m.sop_uid for m in made])
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    assert len(rows) == len(made) == len(by_uid)
    client = s3_client(stack)
    for m in made:
        row = by_uid[m.sop_uid]
        data = s3_read(client, "minipacs", row["object_key"])
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["size"]
        tmp = Path(stack.config.base_dir) / "check.dcm"
        tmp.write_bytes(data)
        assert dataset_bytes(tmp) == dataset_bytes(m.path), m.sop_uid


def test_echo(stack: Stack) -> None:
    proc = subprocess.run([dcmtk("echoscu"), "-v", "-aec", "MINIPACS", "127.0.0.1",
                           str(stack.config.gateway_port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Received Echo Response (Success)" in proc.stdout + proc.stderr


def test_ct_series_and_many_small_instances(stack: Stack, tmp_path: Path) -> None:
    ct = ct_series(tmp_path / "ct", count=120, tag="e2e-ct")
    small = small_set(tmp_path / "small", patients=6, studies=2, series=2, per_series=5,
                      tag="e2e-small")
    groups = [small[i::4] for i in range(4)]
    results: list[object] = []

    def send(paths: Sequence[Path]) -> None:
        results.append(storescu(stack.config.gateway_port, paths))

    threads = [threading.Thread(target=send, args=([m.path for m in g],)) for g in groups]
    for t in threads:
        t.start()
    ct_result = storescu(stack.config.gateway_port, [m.path for m in ct])
    for t in threads:
        t.join()
    assert ct_result.successes == len(ct), ct_result.output[-2000:]
    assert sum(r.successes for r in results) == len(small)  # type: ignore[attr-defined]

    studies = sorted({m.study_uid for m in ct + small})
    wait_until(lambda: indexed(stack, studies) == len(ct) + len(small), 120,
               what="every acknowledged instance indexed")
    assert_stored_byte_identical(stack, ct + small)

    counts = pg(dsn(stack), "SELECT st.study_instance_uid, st.num_series, st.num_instances, "
                "p.patient_id FROM study st JOIN patient p ON p.id = st.patient_fk "
                "WHERE st.study_instance_uid = ANY($1::text[])", studies)
    by_study = {r["study_instance_uid"]: r for r in counts}
    assert by_study[ct[0].study_uid]["num_instances"] == len(ct)
    assert by_study[ct[0].study_uid]["num_series"] == 1
    for m in small:
        assert by_study[m.study_uid]["num_instances"] == 10
        assert by_study[m.study_uid]["num_series"] == 2
        assert by_study[m.study_uid]["patient_id"] == m.patient_id
    patients = pg(dsn(stack), "SELECT count(*) AS n FROM patient WHERE patient_id LIKE "
                  "'E2E-SMALL-%'")
    assert patients[0]["n"] == 6


def test_resending_identical_bytes_adds_nothing(stack: Stack, tmp_path: Path) -> None:
    made = ct_series(tmp_path, count=3, tag="e2e-dup", size=32)
    first = storescu(stack.config.gateway_port, [m.path for m in made])
    again = storescu(stack.config.gateway_port, [m.path for m in made])
    assert first.successes == again.successes == 3
    wait_until(lambda: indexed(stack, [made[0].study_uid]) == 3, 60, what="indexed")
    # The second copies travelled the whole pipeline too: wait for the indexer to have seen
    # them (spool drained) before asserting nothing was added.
    spool = Path(stack.config.base_dir) / "spool" / "ready"
    wait_until(lambda: not any(spool.iterdir()), 60, what="spool drained")
    assert indexed(stack, [made[0].study_uid]) == 3
    objects = pg(dsn(stack), "SELECT count(DISTINCT object_key) AS n FROM instance WHERE "
                 "sop_instance_uid = ANY($1::text[])", [m.sop_uid for m in made])
    assert objects[0]["n"] == 3
    assert_stored_byte_identical(stack, made)


def test_same_uid_different_bytes_keeps_the_first_and_records_the_conflict(
        stack: Stack, tmp_path: Path) -> None:
    sop, study, series = uid("conflict", "sop"), uid("conflict", "st"), uid("conflict", "se")
    common = dict(sop_class="1.2.840.10008.5.1.4.1.1.2", sop_uid=sop, study_uid=study,
                  series_uid=series, patient_id="CONFLICT", patient_name="C^D", rows=16,
                  cols=16, modality="CT", instance_number=1)
    first = make_instance(tmp_path / "a.dcm", seed=1, **common)  # type: ignore[arg-type]
    second = make_instance(tmp_path / "b.dcm", seed=2, **common)  # type: ignore[arg-type]
    assert storescu(stack.config.gateway_port, [first]).successes == 1
    wait_until(lambda: indexed(stack, [study]) == 1, 60, what="first copy indexed")
    assert storescu(stack.config.gateway_port, [second]).successes == 1
    conflicts = wait_until(lambda: pg(dsn(stack), "SELECT kept_sha256, rejected_sha256 FROM "
                                      "ingest_conflict WHERE sop_instance_uid = $1", sop), 60,
                           what="conflict recorded")
    kept = pg(dsn(stack), "SELECT sha256 FROM instance WHERE sop_instance_uid = $1", sop)
    assert len(kept) == 1 and conflicts[0]["kept_sha256"] == kept[0]["sha256"]
    assert conflicts[0]["rejected_sha256"] != kept[0]["sha256"]
    assert_stored_byte_identical(stack, [Made(first, "CONFLICT", study, series, sop)])
    assert "reuses a stored SOP Instance UID" in stack.log_text("indexer")


@pytest.fixture()
def overwrite_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of the test's own, its indexer with Orthanc's OverwriteInstances behaviour."""
    s = make_stack(tmp_path, "overwrite", MINIPACS_OVERWRITE_INSTANCES="true")
    s.start()
    yield s
    teardown(s)


def test_with_overwrite_a_study_sent_again_corrected_replaces_the_first_copy(
        overwrite_stack: Stack, tmp_path: Path) -> None:
    """``MINIPACS_OVERWRITE_INSTANCES=true``: a series sent under a wrong PatientID, then sent
    again corrected with the same UIDs, as a modality resends after a correction. C-FIND finds
    it under the right patient only, S3 serves the corrected bytes, and each first copy is
    recorded as replaced, its object kept."""
    stack = overwrite_stack
    port = stack.config.gateway_port
    study, series = uid("overwrite", "st"), uid("overwrite", "se")

    def send(patient_id: str) -> list[Made]:
        made = [Made(make_instance(tmp_path / patient_id / f"{i}.dcm", sop_class=CT_IMAGE,
                                   sop_uid=uid("overwrite", "sop", i), study_uid=study,
                                   series_uid=series, patient_id=patient_id,
                                   patient_name="Over^Write", rows=16, cols=16, modality="CT",
                                   instance_number=i + 1),
                     patient_id, study, series, uid("overwrite", "sop", i)) for i in range(4)]
        sent = storescu(port, [m.path for m in made])
        assert sent.successes == len(made), sent.output[-2000:]
        return made

    wrong = send("OW-WRONG")
    wait_until(lambda: indexed(stack, [study]) == len(wrong), 60, what="the first copies indexed")
    right = send("OW-RIGHT")
    def recorded() -> list[Any]:
        return pg(dsn(stack), "SELECT sop_instance_uid, kept_sha256, rejected_key FROM "
                  "ingest_conflict WHERE policy = 'overwrite'")

    wait_until(lambda: len(recorded()) == len(right), 60,
               what="every first copy recorded as replaced")
    replaced = recorded()
    assert_stored_byte_identical(stack, right)  # the index points at the corrected copies
    kept = {r["sop_instance_uid"]: r["sha256"] for r in pg(
        dsn(stack), "SELECT sop_instance_uid, sha256 FROM instance")}
    client = s3_client(stack)
    for row, first in zip(sorted(replaced, key=lambda r: r["sop_instance_uid"]),
                          sorted(wrong, key=lambda m: m.sop_uid), strict=True):
        assert row["kept_sha256"] == kept[first.sop_uid]
        old = Path(stack.config.base_dir) / "replaced.dcm"
        old.write_bytes(s3_read(client, "minipacs", row["rejected_key"]))
        assert dataset_bytes(old) == dataset_bytes(first.path)  # the first copy, kept in S3
    found = findscu(port, ["QueryRetrieveLevel=PATIENT", "PatientID=OW-*",
                           "NumberOfPatientRelatedInstances"], model="-P")
    assert found.final == "Success", found.output
    assert [(str(x.PatientID), int(x.NumberOfPatientRelatedInstances))
            for x in found.responses] == [("OW-RIGHT", len(right))]
    assert stack.log_text("indexer").count("it replaces obj=") == len(right)


def raw_s3(stack: Stack, secret: str = "minipacs-secret") -> Any:
    from shared.s3http import RawS3

    return RawS3("127.0.0.1", stack.config.s3_port, "minipacs", "minipacs", secret,
                 "us-east-1")


@pytest.mark.parametrize("path", ["raw", "minio"])
@pytest.mark.parametrize("size", [10_000, 530_000])
def test_s3_refuses_bytes_that_do_not_match_the_gateways_hash(stack: Stack, size: int,
                                                              path: str) -> None:
    """storage's upload carries the SHA-256 the gateway took: the S3 store (SeaweedFS here,
    MinIO in compose) refuses other bytes, e.g. a spool file damaged after the ack. Both
    upload paths: storage's own signed PUT (``raw``, http:// endpoints) and the minio client
    (TLS endpoints)."""
    from io import BytesIO

    from shared import s3

    client = s3_client(stack)
    raw = raw_s3(stack) if path == "raw" else None
    data = (bytes(range(256)) * (size // 256 + 1))[:size] + path.encode()
    size = len(data)
    good = hashlib.sha256(data).hexdigest()
    key = f"instances/{good[:2]}/{good}.dcm"
    damaged = data[:-1] + b"\x00"
    with pytest.raises(s3.VerifyFailed):
        s3.put_verified(client, "minipacs", key, BytesIO(damaged), size, good, 16 << 20, raw)
    assert s3.stored_size(client, "minipacs", key, good) is None
    assert s3.put_verified(client, "minipacs", key, BytesIO(data), size, good, 16 << 20,
                           raw) == "checksum"  # verified by the store itself, nothing hashed
    assert s3.stored_size(client, "minipacs", key, good) == size
    assert s3.read_object(client, "minipacs", key, 1 << 20) == data
    with pytest.raises(s3.VerifyFailed):  # shorter than the message says
        s3.put_verified(client, "minipacs", key, BytesIO(data[:-10]), size, good, 16 << 20,
                        raw)


def test_raw_s3_client_against_the_store(stack: Stack) -> None:
    """The keep-alive GET/PUT client storage, mover and C-GET use on http:// endpoints:
    round trip, a missing object, a connection the store closed while kept alive, a wrong
    secret (an error status with its code, never taken for a verified upload)."""
    from shared.s3http import S3Refused

    raw = raw_s3(stack)
    data = os.urandom(70_000)
    sha = hashlib.sha256(data).hexdigest()
    key = f"instances/{sha[:2]}/{sha}.dcm"
    fields = raw.put(key, data, sha, {"Content-Type": "application/dicom"})
    assert fields.get("etag", "").strip('"') == hashlib.md5(data).hexdigest()
    assert raw.get(key, 1 << 20) == data
    with pytest.raises(ValueError, match="over the in-memory limit"):
        raw.get(key, 1000)
    with pytest.raises(FileNotFoundError):
        raw.get(f"instances/00/{'0' * 64}.dcm", 1 << 20)
    # the kept-alive connection dies under us: the next request opens a new one, once
    raw._local.conn.shutdown(socket.SHUT_RDWR)
    assert raw.get(key, 1 << 20) == data
    with pytest.raises(S3Refused) as refused:
        raw_s3(stack, secret="wrong").put(key, data, sha, {})
    assert refused.value.status == 403 and refused.value.code
