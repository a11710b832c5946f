"""Storage Commitment (Push Model) with a real modality-side peer: Debian's Orthanc, which
modalities' admins use as a storage commitment SCU (``/modalities/{id}/storage-commitment``).
It sends a study to minipacs, asks at once whether minipacs has taken charge of it, gets the
N-EVENT-REPORT on a new association and, told "committed", deletes its own copies: the
modality's workflow. Instances never sent, or sent under another SOP class, are reported
failed with their reasons. Malformed or unauthorised N-ACTIONs are refused with the status
that says why (our pynetdicom client: DCMTK has no storage commitment SCU)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from scripts.native import Stack, port_open
from shared import topology
from shared.commitment import STORAGE_COMMITMENT_INSTANCE
from tests.conftest import TEST_NODES, dsn, make_stack, teardown
from tests.dicomgen import CT_IMAGE, MR_IMAGE, Made, small_set, uid
from tests.helpers import commitment_request, pg, ready_now, storescu, wait_until
from tests.orthanc import Orthanc, start_orthanc
from tests.proxy import CuttableProxy

pytestmark = pytest.mark.e2e


@dataclass
class Site:
    stack: Stack
    modality: Orthanc
    tmp: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("commit")
    stack = make_stack(tmp, "commit", MINIPACS_COMMIT_TIMEOUT="5")
    modality = start_orthanc(tmp / "modality", "MODALITY",
                             {"minipacs": ["MINIPACS", "127.0.0.1", stack.config.gateway_port]})
    stack.config.extra_env["MINIPACS_NODES"] = json.dumps(
        {**TEST_NODES, "modality": ["MODALITY", "127.0.0.1", modality.dicom_port],
         "offline": ["OFFLINE", "127.0.0.1", 9]})  # known, but nobody listens there
    try:
        stack.start()
        yield Site(stack, modality, tmp)
    finally:
        modality.stop()
        teardown(stack)


def indexed(stack: Stack, made: list[Made]) -> int:
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = "
              "ANY($1::text[])", [m.sop_uid for m in made])
    return int(rows[0]["n"])


def ask_commitment(site: Site, refs: list[tuple[str, str]]) -> tuple[str, dict[str, Any]]:
    """Orthanc's storage commitment request to minipacs; the path of its report at Orthanc,
    and the report once it came."""
    answer = site.modality.rest("POST", "/modalities/minipacs/storage-commitment", {
        "DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i in refs]})
    path = answer["Path"]
    report: dict[str, Any] = wait_until(
        lambda: (r := site.modality.rest("GET", path))["Status"] != "Pending" and r, 60,
        what="the storage commitment report at Orthanc")
    return path, report


def uids(entries: list[dict[str, Any]]) -> set[str]:
    return {e["SOPInstanceUID"] for e in entries}


def test_a_modality_told_its_study_is_committed_deletes_its_copies(site: Site) -> None:
    made = small_set(site.tmp / "study", patients=1, studies=1, series=2, per_series=4,
                     tag="commit")
    for m in made:
        site.modality.rest("POST", "/instances", m.path.read_bytes())
    studies = site.modality.rest("GET", "/studies")
    site.modality.rest("POST", "/modalities/minipacs/store",
                       {"Resources": studies, "Synchronous": True}, timeout=120)
    # asked right after the last C-STORE: minipacs waits for the index, not reports "missing"
    path, report = ask_commitment(site, [(MR_IMAGE, m.sop_uid) for m in made])
    assert report["Status"] == "Success", report
    assert uids(report["Success"]) == {m.sop_uid for m in made}
    assert report["Failures"] == []
    assert report["RemoteAET"] == "MINIPACS"
    assert indexed(site.stack, made) == len(made)

    site.modality.rest("POST", f"{path}/remove", {})
    assert site.modality.rest("GET", "/instances") == []
    assert indexed(site.stack, made) == len(made)  # the archive keeps them
    log = site.stack.log_text("mover")
    assert f"report sent to MODALITY: {len(made)} committed, 0 failed" in log


def test_instances_not_received_or_of_another_class_are_reported_failed(site: Site) -> None:
    made = small_set(site.tmp / "partial", patients=1, studies=1, series=1, per_series=2,
                     tag="partial")
    sent = storescu(site.stack.config.gateway_port, [m.path for m in made])
    assert sent.successes == len(made), sent.output
    never_sent = uid("never", "sent")
    _, report = ask_commitment(site, [(MR_IMAGE, made[0].sop_uid),
                                   (CT_IMAGE, made[1].sop_uid),  # stored as MR
                                   (CT_IMAGE, never_sent)])
    assert report["Status"] == "Failure", report
    assert uids(report["Success"]) == {made[0].sop_uid}
    reasons = {f["SOPInstanceUID"]: f["FailureReason"] for f in report["Failures"]}
    assert reasons == {made[1].sop_uid: 0x0119, never_sent: 0x0112}, report


def n_action(site: Site, calling: str, action_type: int, info: Dataset | None,
             instance: str = STORAGE_COMMITMENT_INSTANCE) -> Dataset:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", site.stack.config.gateway_port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, instance)
    finally:
        assoc.release()
    assert status is not None and "Status" in status
    return status


@pytest.mark.parametrize(("calling", "action_type", "transaction", "refs", "instance",
                          "status"), [
    ("TESTSCU", 2, "1.2.3", [(CT_IMAGE, "1.2.3.4")], STORAGE_COMMITMENT_INSTANCE, 0x0123),
    ("TESTSCU", 1, "1.2.3", [(CT_IMAGE, "1.2.3.4")], "1.2.3.4.5", 0x0117),
    ("TESTSCU", 1, None, [(CT_IMAGE, "1.2.3.4")], STORAGE_COMMITMENT_INSTANCE, 0x0120),
    ("TESTSCU", 1, "1.2.3", [], STORAGE_COMMITMENT_INSTANCE, 0x0120),
    ("TESTSCU", 1, "1.2.3", [(CT_IMAGE, "../../x")], STORAGE_COMMITMENT_INSTANCE, 0x0106),
    ("READONLY", 1, "1.2.3", [(CT_IMAGE, "1.2.3.4")], STORAGE_COMMITMENT_INSTANCE, 0x0124),
], ids=["no-such-action", "not-the-well-known-instance", "no-transaction", "no-references",
        "path-like-uid", "node-may-not-store"])
def test_a_request_minipacs_cannot_take_is_refused_with_its_reason(
        site: Site, calling: str, action_type: int, transaction: str | None,
        refs: list[tuple[str, str]], instance: str, status: int) -> None:
    answer = n_action(site, calling, action_type, commitment_request(transaction, refs), instance)
    assert answer.Status == status
    # the gateway keeps serving
    assert n_action(site, "TESTSCU", 2, commitment_request("1.2.3", refs)).Status == 0x0123


def test_a_report_nobody_takes_is_tried_again_and_the_gateway_keeps_serving(site: Site) -> None:
    made = small_set(site.tmp / "offline", patients=1, studies=1, series=1, per_series=1,
                     tag="offline")
    assert storescu(site.stack.config.gateway_port, [m.path for m in made]).successes == 1
    wait_until(lambda: indexed(site.stack, made) == 1, 60, what="the instance indexed")
    answer = n_action(site, "OFFLINE", 1, commitment_request("1.2.9", [(MR_IMAGE,
                                                                         made[0].sop_uid)]))
    assert answer.Status == 0x0000  # taken: the report is what fails
    wait_until(lambda: "report to OFFLINE (127.0.0.1:9) not delivered (attempt 2"
               in site.stack.log_text("mover"), 60, what="the second attempt logged")
    assert n_action(site, "TESTSCU", 2, commitment_request("1.2.3", [])).Status == 0x0123


def test_a_request_taken_is_reported_after_the_gateway_and_the_mover_restart(
        site: Site) -> None:
    """DESIGN, invariant 1: the N-ACTION's Success is a promise of a report, so it is answered
    only once the request is durable. The mover is down when Orthanc asks; the gateway queues
    the request (``mover.commitments``), answers, and is killed too. Both started again, the
    mover reports, and Orthanc is told the study is committed. (Until this change the pending
    report lived in the gateway's memory and died with it: Orthanc waited for ever.)"""
    made = small_set(site.tmp / "restart", patients=1, studies=1, series=1, per_series=3,
                     tag="restart")
    stack = site.stack
    assert storescu(stack.config.gateway_port, [m.path for m in made]).successes == len(made)
    wait_until(lambda: indexed(stack, made) == len(made), 60, what="the instances indexed")
    stack.kill("mover")
    answer = site.modality.rest("POST", "/modalities/minipacs/storage-commitment", {
        "DicomInstances": [{"SOPClassUID": MR_IMAGE, "SOPInstanceUID": m.sop_uid}
                           for m in made]})
    wait_until(lambda: f"N-ACTION storage commitment of {len(made)} instance(s) -> Success"
               in stack.log_text("gateway"), 30, what="the N-ACTION answered")
    stack.kill("gateway")
    path = answer["Path"]
    assert site.modality.rest("GET", path)["Status"] == "Pending"
    stack.start_service("gateway")
    stack.start_service("mover")
    wait_until(lambda: port_open(stack.config.gateway_port), 60, what="the gateway back")
    report: dict[str, Any] = wait_until(
        lambda: (r := site.modality.rest("GET", path))["Status"] != "Pending" and r, 60,
        what="the storage commitment report at Orthanc")
    assert report["Status"] == "Success", report
    assert uids(report["Success"]) == {m.sop_uid for m in made}


def test_a_report_waits_for_an_index_it_cannot_read_and_is_not_dead_lettered(
        site: Site) -> None:
    """PostgreSQL unreachable from the mover (its connections go through a proxy that is cut)
    from before the request until well past its deadline, for more attempts than
    ``mover.commitments``' delivery limit: the request is held by the mover, not put back
    until it is dead-lettered; once the index answers, Orthanc is told the study is
    committed. (Until this change each attempt put the message back, and the fifth parked it
    in ``mover.commitments.dead``: the modality waited for ever.)"""
    made = small_set(site.tmp / "pgdown", patients=1, studies=1, series=1, per_series=2,
                     tag="pgdown")
    stack = site.stack
    assert storescu(stack.config.gateway_port, [m.path for m in made]).successes == len(made)
    wait_until(lambda: indexed(stack, made) == len(made), 60, what="the instances indexed")
    proxy = CuttableProxy(5432).start()
    stack.kill("mover")
    start = len(stack.log_text("mover"))
    stack.start_service("mover", env={"MINIPACS_DATABASE_URL": f"postgresql://minipacs@"
                                      f"127.0.0.1:{proxy.port}/{stack.config.database}"})
    try:
        wait_until(lambda: "consuming" in stack.log_text("mover")[start:], 60,
                   what="the mover consuming")
        proxy.cut()
        answer = site.modality.rest("POST", "/modalities/minipacs/storage-commitment", {
            "DicomInstances": [{"SOPClassUID": MR_IMAGE, "SOPInstanceUID": m.sop_uid}
                               for m in made]})
        limit = topology.COMMITMENTS.delivery_limit
        # a message is delivered at most limit + 1 times: one attempt more than that
        wait_until(lambda: stack.log_text("mover")[start:].count("index not readable")
                   > limit + 1, 90, what=f"more than {limit + 1} attempts to read the index")
        assert site.modality.rest("GET", answer["Path"])["Status"] == "Pending"
        dead = topology.COMMITMENTS.dead_letter_queue
        assert ready_now(stack.env["MINIPACS_AMQP_URL"], [dead]) == {dead: 0}
        proxy.restore()
        report: dict[str, Any] = wait_until(
            lambda: (r := site.modality.rest("GET", answer["Path"]))["Status"] != "Pending"
            and r, 60, what="the storage commitment report at Orthanc")
        assert report["Status"] == "Success", report
        assert uids(report["Success"]) == {m.sop_uid for m in made}
    finally:
        proxy.restore()
        stack.kill("mover")
        stack.start_service("mover")
        proxy.close()


def test_a_request_the_broker_refuses_is_not_promised(site: Site) -> None:
    """No Success without the durable hand-off: while ``mover.commitments`` refuses messages
    (full under a length limit an admin set; the queues overflow with reject-publish), the
    N-ACTION gets 0x0213 Resource limitation and the log says why; once the limit is gone,
    the same request is taken. (The mover is stopped meanwhile, so the first request stays in
    the queue and fills it.)"""
    from tests.e2e.test_broker_refusal import POLICY, _clear_policy, _queue_policy, _set_policy

    stack = site.stack
    vhost, queue = stack.config.vhost, topology.COMMITMENTS.name
    first = commitment_request("1.2.87", [(MR_IMAGE, uid("refused", "a"))])
    second = commitment_request("1.2.88", [(MR_IMAGE, uid("refused", "b"))])
    stack.kill("mover")
    try:
        _set_policy(vhost, {"max-length": 0}, queue)
        wait_until(lambda: _queue_policy(vhost, queue) == POLICY, 60,
                   what="the length limit applied")
        # a quorum queue refuses once it is over its limit: the first request fills it
        answers = [n_action(site, "TESTSCU", 1, first)]
        while answers[-1].Status == 0x0000 and len(answers) < 4:
            answers.append(n_action(site, "TESTSCU", 1, second))
        answer = answers[-1]
        assert answer.Status == 0x0213, answers
        assert "not queued" in str(answer.get("ErrorComment", ""))
        assert re.search(r"TESTSCU@127\.0\.0\.1 N-ACTION storage commitment not queued .* -> "
                         r"0x0213 resource limitation", stack.log_text("gateway"))
    finally:
        _clear_policy(vhost)
        stack.start_service("mover")
    wait_until(lambda: _queue_policy(vhost, queue) != POLICY, 60, what="the limit removed")
    assert wait_until(lambda: n_action(site, "TESTSCU", 1, second).Status == 0x0000, 30,
                      what="the request taken once the limit is gone")
