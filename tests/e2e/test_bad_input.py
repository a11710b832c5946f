"""Issue 2, bad input: each gets the right status or rejection, nothing is stored, the
gateway keeps serving. Raw files are sent with pynetdicom in chunked mode, so the bytes on the
wire are exactly the file's (malformed UIDs, truncation, mismatches)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE

from scripts.native import Stack
from services.gateway import statuses
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import CT_IMAGE, make_instance, uid
from tests.helpers import dcmtk, dcmtk_env, pg, storescu, wait_until

pytestmark = pytest.mark.e2e
TS = "1.2.840.10008.1.2.1"




def send_file(stack: Stack, path: Path, aet: str = "TESTSCU") -> int:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CT_IMAGE, TS)
    assoc = ae.associate("127.0.0.1", stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def instance(tmp: Path, name: str, **kw: object) -> Path:
    args: dict[str, object] = dict(sop_class=CT_IMAGE, sop_uid=uid("bad", name),
                                   study_uid=uid("bad", "study"), series_uid=uid("bad", "se"),
                                   patient_id="BAD", patient_name="B^I", rows=16, cols=16,
                                   modality="CT", instance_number=1)
    args.update(kw)
    return make_instance(tmp / f"{name}.dcm", **args)  # type: ignore[arg-type]


def rewrite(path: Path, meta_uid: str | None = None, dataset_uid: str | None = None) -> Path:
    ds = dcmread(path)
    if meta_uid is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = meta_uid
    if dataset_uid is not None:
        ds.SOPInstanceUID = dataset_uid
    ds.save_as(path, enforce_file_format=False)
    return path


def nothing_stored(stack: Stack, *sop_uids: str) -> bool:
    """No row for these UIDs once the spool has drained (other tests' instances may be in
    flight: wait for them rather than race them)."""
    ready = Path(stack.config.base_dir) / "spool" / "ready"
    wait_until(lambda: not any(ready.iterdir()), 60, what="spool drained")
    wait_until(lambda: not _queue_busy(stack), 60, what="indexer idle")
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = "
              "ANY($1::text[])", list(sop_uids))
    return bool(rows[0]["n"] == 0)


def _queue_busy(stack: Stack) -> bool:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", stack.config.vhost, "name",
                          "messages", "--no-table-headers"], capture_output=True, text=True,
                         check=True).stdout
    return any(line.split()[-1] != "0" for line in out.splitlines()
               if line.strip() and not line.split()[0].endswith(".dead"))


@pytest.mark.usefixtures("chunked_send")
@pytest.mark.parametrize(("case", "expected"), [
    ("traversal_uid", statuses.INVALID_UID),
    ("slash_uid", statuses.INVALID_UID),
    ("newline_uid", statuses.INVALID_UID),  # would forge a log line, or a second UID
    ("missing_study_uid", statuses.INVALID_UID),
    ("uid_mismatch", statuses.DATASET_DOES_NOT_MATCH),
    ("truncated", statuses.CANNOT_UNDERSTAND),
])
def test_bad_instance_gets_a_failure_status_and_nothing_is_stored(
        stack: Stack, tmp_path: Path, case: str, expected: int) -> None:
    good_uid = uid("bad", case)
    path = instance(tmp_path, case)
    if case == "traversal_uid":
        rewrite(path, meta_uid="../../x", dataset_uid="../../x")
    elif case == "slash_uid":
        rewrite(path, meta_uid="1.2/3", dataset_uid="1.2/3")
    elif case == "newline_uid":  # pydicom would clean it: the bytes are edited instead
        rewrite(path, meta_uid="1.2.3.4", dataset_uid="1.2.3.4")
        path.write_bytes(path.read_bytes().replace(b"1.2.3.4\x00", b"1.2.3.4\n"))
    elif case == "missing_study_uid":
        path = instance(tmp_path, case, study_uid="")
    elif case == "uid_mismatch":
        rewrite(path, meta_uid=good_uid + ".1")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    assert send_file(stack, path) == expected
    assert nothing_stored(stack, good_uid, good_uid + ".1", "../../x", "1.2/3", "1.2.3.4\n",
                          "1.2.3.4")
    assert "refused" in stack.log_text("gateway")
    # ...and the gateway keeps serving.
    ok = instance(tmp_path, case + "-after", sop_uid=uid("bad", case, "after"))
    assert send_file(stack, ok) == statuses.SUCCESS


def echo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-v", *args, "127.0.0.1",
                           str(stack.config.gateway_port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=60)


def test_wrong_called_ae_title_is_rejected(stack: Stack) -> None:
    proc = echo(stack, "-aec", "NOTUS")
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stderr + proc.stdout
    assert "called AE title 'NOTUS' is not ours" in stack.log_text("gateway")


def test_unknown_calling_ae_title_is_rejected(stack: Stack, tmp_path: Path) -> None:
    proc = echo(stack, "-aec", "MINIPACS", "-aet", "INTRUDER")
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr + proc.stdout
    path = instance(tmp_path, "intruder")
    result = storescu(stack.config.gateway_port, [path], aet="INTRUDER")
    assert result.successes == 0
    assert nothing_stored(stack, uid("bad", "intruder"))


def test_a_node_that_may_not_store_gets_not_authorized(stack: Stack, tmp_path: Path) -> None:
    assert echo(stack, "-aec", "MINIPACS", "-aet", "READONLY").returncode == 0  # echo allowed
    path = instance(tmp_path, "readonly")
    result = storescu(stack.config.gateway_port, [path], aet="READONLY")
    assert result.successes == 0 and result.failures == 1, result.output[-1000:]
    assert "READONLY@127.0.0.1 may not store" in stack.log_text("gateway")
    assert nothing_stored(stack, uid("bad", "readonly"))


def test_known_ae_title_from_another_host_is_rejected(stack: Stack) -> None:
    proc = echo(stack, "-aec", "MINIPACS", "-aet", "ELSEWHERE")
    assert proc.returncode != 0
    assert "known, but not from 127.0.0.1" in stack.log_text("gateway")


def test_garbage_bytes_are_dropped_and_the_gateway_keeps_serving(stack: Stack) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", stack.config.gateway_port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 1000)
        s.settimeout(30)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    assert echo(stack, "-aec", "MINIPACS").returncode == 0


def test_an_instance_the_index_refuses_is_dead_lettered_and_its_neighbours_indexed(
        private_stack: Stack, tmp_path: Path) -> None:
    """A NUL inside a name is accepted DICOM but no PostgreSQL text: that instance is parked in
    the indexer's dead-letter queue (visible, replayable) and the ones around it, which may
    share its ``instance.stored`` message, are indexed. All were stored, so all got Success."""
    study, series = uid("poison", "st"), uid("poison", "se")
    paths, sops = [], []
    for n in range(8):
        sop = uid("poison", n)
        name = "Bad\x00Name" if n == 3 else "Good^Name"
        paths.append(make_instance(tmp_path / f"{n}.dcm", sop_class=CT_IMAGE, sop_uid=sop,
                                   study_uid=study, series_uid=series, patient_id="POISON",
                                   patient_name=name, rows=8, cols=8, modality="CT",
                                   instance_number=n))
        sops.append(sop)
    stack = private_stack  # its own dead-letter queue, left with the poisoned message
    sent = storescu(stack.config.gateway_port, paths)
    assert sent.successes == 8, sent.output

    def indexed() -> set[str]:
        rows = pg(dsn(stack), "SELECT sop_instance_uid FROM instance WHERE sop_instance_uid = "
                  "ANY($1::text[])", sops)
        return {r["sop_instance_uid"] for r in rows}

    def parked() -> int:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", stack.config.vhost,
                              "name", "messages", "--no-table-headers"], capture_output=True,
                             text=True, check=True).stdout
        counts = dict(line.split() for line in out.splitlines() if line.strip())
        return int(counts.get("indexer.instances.dead", "0"))

    wait_until(lambda: indexed() == set(sops) - {sops[3]} and parked() >= 1, timeout=60)
    assert sops[3] not in indexed()


def test_association_limit_and_silent_connections(tmp_path: Path) -> None:
    """RELIABILITY: more associations than the limit are rejected as transient (the modality
    retries) while those running go on; a connection that never associates is closed after
    the ACSE timeout and its slot is free again."""
    import socket

    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    stack = make_stack(tmp_path, "limit", MINIPACS_MAX_ASSOCIATIONS="2",
                       MINIPACS_ACSE_TIMEOUT="3")
    stack.start()
    try:
        port = stack.config.gateway_port
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 10
        held: list[Any] = []

        def two_held() -> bool:
            """Both slots free: pynetdicom counts every connection's thread, and the start-up
            readiness probe's may still be winding down."""
            pair = [ae.associate("127.0.0.1", port, ae_title="MINIPACS") for _ in range(2)]
            if all(a.is_established for a in pair):
                held.extend(pair)
                return True
            for a in pair:
                if a.is_established:
                    a.release()
            return False

        wait_until(two_held, 30, what="two associations held at once")
        first, second = held
        third = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
        assert third.is_rejected
        assert third.acceptor.primitive.result == 0x02  # rejected-transient
        assert first.send_c_echo().Status == 0x0000  # the running ones are unaffected
        assert second.send_c_echo().Status == 0x0000
        first.release()
        second.release()
        # a connection that never sends an A-ASSOCIATE-RQ: closed by the gateway
        silent = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            assert silent.recv(1) == b""  # the gateway closed it (ACSE timeout 3 s)
        finally:
            silent.close()
        again = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
        assert again.is_established and again.send_c_echo().Status == 0x0000
        again.release()
        assert "rejected (association limit 2" in stack.log_text("gateway")
    finally:
        teardown(stack)
