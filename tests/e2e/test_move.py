"""Issue 3, C-MOVE end to end: DCMTK movescu asks minipacs to send to ARCHIVE, a real Orthanc;
the mover sends; Orthanc's REST API shows exactly the requested instances, byte-identical.
Also: pending counts, unknown destination, ARCHIVE down or aborting mid-study, mover down,
C-CANCEL, jobs in PostgreSQL, "send study X to node Y" jobs, and Orthanc as the client
(/modalities/x/move)."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from scripts.native import Stack, free_port, port_open
from shared.dicom import EXPLICIT_LE
from shared.messages import MoveRequested
from tests.conftest import TEST_NODES, dsn, hot_copy, make_stack, teardown
from tests.dicomgen import Made, ct_series, dataset_bytes, small_set
from tests.helpers import dcmtk, dcmtk_env, pg, queue_counts, send_as_is, storescu, wait_until
from tests.orthanc import Orthanc, start_orthanc

pytestmark = pytest.mark.e2e


@dataclass
class World:
    stack: Stack
    archive: Orthanc
    data: list[Made]
    ct: list[Made]
    tmp: Path
    implicit_port: int  # the node IMPLICIT: a test starts a storescp there when it needs one

    @property
    def port(self) -> int:
        return self.stack.config.gateway_port


def indexed(stack: Stack, sop_uids: Sequence[str]) -> int:
    rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid = "
              "ANY($1::text[])", list(sop_uids))
    return int(rows[0]["n"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("move")
    stack = make_stack(tmp, "move", MINIPACS_MOVE_START_TIMEOUT="3",
                       MINIPACS_MOVE_IDLE_TIMEOUT="20")
    implicit_port = free_port()
    archive = start_orthanc(tmp / "archive", "ARCHIVE",
                            {"minipacs": ["MINIPACS", "127.0.0.1", stack.config.gateway_port]})
    stack.config.extra_env["MINIPACS_NODES"] = json.dumps(
        {**TEST_NODES, "archive": ["ARCHIVE", "127.0.0.1", archive.dicom_port],
         # a known node nobody listens on: "ARCHIVE down"
         "offline": ["OFFLINE", "127.0.0.1", 9], "orthanc": ["ARCHIVE", "127.0.0.1", 9],
         "implicit": ["IMPLICIT", "127.0.0.1", implicit_port]})
    try:
        stack.start()
        data = small_set(tmp / "small", patients=2, studies=2, series=2, per_series=3,
                         tag="mv")
        ct = ct_series(tmp / "ct", count=40, tag="mvct", size=128)
        sent = storescu(stack.config.gateway_port, [m.path for m in data + ct])
        assert sent.successes == len(data) + len(ct), sent.output
        wait_until(lambda: indexed(stack, [m.sop_uid for m in data + ct]) == len(data + ct),
                   60, what="the test data indexed")
        yield World(stack, archive, data, ct, tmp, implicit_port)
    finally:
        archive.stop()
        teardown(stack)


# ---- helpers --------------------------------------------------------------------------------

def clear_archive(archive: Orthanc) -> None:
    for pid in archive.rest("GET", "/patients"):
        archive.rest("DELETE", f"/patients/{pid}")


def archive_instances(archive: Orthanc) -> dict[str, str]:
    """SOP Instance UID -> Orthanc id of everything the archive holds."""
    out = {}
    for oid in archive.rest("GET", "/instances"):
        tags = archive.rest("GET", f"/instances/{oid}/simplified-tags")
        out[tags["SOPInstanceUID"]] = oid
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_archive_holds_exactly(w: World, expected: Sequence[Made]) -> None:
    held = archive_instances(w.archive)
    assert set(held) == {m.sop_uid for m in expected}
    for m in expected:
        path = w.tmp / "from-archive.dcm"
        path.write_bytes(w.archive.rest("GET", f"/instances/{held[m.sop_uid]}/file"))
        assert sha(dataset_bytes(path)) == sha(dataset_bytes(m.path)), m.sop_uid


@dataclass
class MoveResult:
    returncode: int
    output: str
    pending: list[tuple[int, int, int, int]]  # (remaining, completed, failed, warning)
    final: str


def movescu_command(port: int, keys: dict[str, str], model: str = "-S",
                    dest: str = "ARCHIVE", extra: Sequence[str] = ()) -> list[str]:
    cmd = [dcmtk("movescu"), "-v", "-d", model, "-aet", "MOVESCU", "-aec", "MINIPACS",
           "-aem", dest, *extra]
    for k, v in keys.items():
        cmd += ["-k", f"{k}={v}"]
    return [*cmd, "127.0.0.1", str(port)]


def movescu(port: int, keys: dict[str, str], model: str = "-S", dest: str = "ARCHIVE",
            extra: Sequence[str] = (), timeout: float = 120) -> MoveResult:
    proc = subprocess.run(movescu_command(port, keys, model, dest, extra), capture_output=True,
                          text=True, env=dcmtk_env(), timeout=timeout)
    return parse_move_output(proc.returncode, proc.stdout + proc.stderr)


def parse_move_output(code: int, out: str) -> MoveResult:
    """DCMTK's debug dump (``-d``) of each C-MOVE-RSP: the counts, then the status."""
    pending = []
    final = ""
    for block in re.split(r"(?=I: Received (?:Final )?Move Response)", out)[1:]:

        def count(name: str, text: str = block) -> int:
            found = re.search(rf"{name} Suboperations\s*:\s*(\d+)", text)
            return int(found.group(1)) if found else -1

        if re.search(r"DIMSE Status\s*:\s*0xff00", block, re.I):
            pending.append((count("Remaining"), count("Completed"), count("Failed"),
                            count("Warning")))
        else:
            final = block
    return MoveResult(code, out, pending, final)


def final_has(result: MoveResult, status_hex: str) -> bool:
    return re.search(rf"DIMSE Status\s*:\s*0x{status_hex}", result.final, re.I) is not None


def identifier_of(final: str) -> str:
    """The Failed SOP Instance UID List line of a final response's dump, or ""."""
    found = re.search(r"\(0008,0058\) UI \[([^\]]*)\]", final)
    return found.group(1) if found else ""


def job_rows(w: World, requested_by: str = "MOVESCU") -> list[dict[str, Any]]:
    return [dict(r) for r in pg(dsn(w.stack), "SELECT * FROM move_job WHERE requested_by_aet "
                                "= $1 ORDER BY started_at", requested_by)]


# ---- the seed's round trip ----------------------------------------------------------------------

def test_nodes_are_seeded_from_settings(world: World) -> None:
    rows = pg(dsn(world.stack), "SELECT name, aet, host, port, source FROM remote_node "
              "ORDER BY name")
    by_name = {r["name"]: r for r in rows}
    assert by_name["archive"]["aet"] == "ARCHIVE"
    assert by_name["archive"]["port"] == world.archive.dicom_port
    assert by_name["archive"]["source"] == "settings"
    assert set(by_name) == {*TEST_NODES, "archive", "offline", "orthanc", "implicit"}


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES"])
@pytest.mark.parametrize("model", ["-P", "-S"])
def test_move_sends_exactly_the_requested_instances(world: World, level: str,
                                                    model: str) -> None:
    if model == "-S" and level == "PATIENT":
        pytest.skip("the Study Root model has no PATIENT level (see the refusal test)")
    clear_archive(world.archive)
    first = world.data[0]
    keys = {"QueryRetrieveLevel": level, "PatientID": first.patient_id}
    if level in ("STUDY", "SERIES"):
        keys["StudyInstanceUID"] = first.study_uid
    if level == "SERIES":
        keys["SeriesInstanceUID"] = first.series_uid
    expected = [m for m in world.data if m.patient_id == first.patient_id
                and (level == "PATIENT" or m.study_uid == first.study_uid)
                and (level != "SERIES" or m.series_uid == first.series_uid)]
    assert len(expected) == {"PATIENT": 12, "STUDY": 6, "SERIES": 3}[level]

    result = movescu(world.port, keys, model)

    assert final_has(result, "0000"), result.output
    assert_archive_holds_exactly(world, expected)
    # pending responses count down: remaining + completed = total, never going backwards
    assert result.pending, result.output
    for remaining, completed, failed, warning in result.pending:
        assert remaining + completed + failed + warning == len(expected)
        assert failed == warning == 0
    assert [p[0] for p in result.pending] == sorted((p[0] for p in result.pending),
                                                    reverse=True)
    assert re.search(rf"Completed Suboperations\s*:\s*{len(expected)}", result.final)
    job = job_rows(world)[-1]
    assert job["state"] == "done" and job["completed"] == len(expected)
    assert job["destination"] == "archive" and job["level"] == level


def test_pending_responses_count_down_for_a_ct_series(world: World) -> None:
    clear_archive(world.archive)
    ct = world.ct
    result = movescu(world.port, {"QueryRetrieveLevel": "SERIES",
                                  "StudyInstanceUID": ct[0].study_uid,
                                  "SeriesInstanceUID": ct[0].series_uid})
    assert final_has(result, "0000"), result.output
    assert_archive_holds_exactly(world, ct)
    assert result.pending[0][0] == len(ct)  # the first pending response: nothing sent yet
    # the mover reports at most every 100 ms: fewer pending responses, each one exact
    assert all(r + c == len(ct) and f == w == 0 for r, c, f, w in result.pending)
    assert [p[0] for p in result.pending] == sorted((p[0] for p in result.pending),
                                                    reverse=True)
    assert re.search(rf"Completed Suboperations\s*:\s*{len(ct)}\b", result.final)


def test_unknown_destination_is_a801_without_a_job(world: World) -> None:
    before = len(job_rows(world))
    result = movescu(world.port, {"QueryRetrieveLevel": "STUDY",
                                  "StudyInstanceUID": world.data[0].study_uid},
                     dest="NOBODY")
    assert final_has(result, "A801"), result.output
    assert not result.pending
    assert len(job_rows(world)) == before


@pytest.mark.parametrize(("keys", "model"), [
    ({"PatientID": "MV-0000"}, "-P"),                               # no QueryRetrieveLevel
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": "MV-0000"}, "-S"),  # not in Study Root
    ({"QueryRetrieveLevel": "STUDY", "PatientID": "MV-0000"}, "-S"),    # no StudyInstanceUID
    ({"QueryRetrieveLevel": "WARD", "PatientID": "MV-0000"}, "-P"),
])
def test_malformed_identifiers_are_refused(world: World, keys: dict[str, str],
                                           model: str) -> None:
    result = movescu(world.port, keys, model)
    assert final_has(result, "A900"), result.output


def test_archive_down_fails_clearly_and_the_job_is_recorded_failed(world: World) -> None:
    # "ORTHANC" is a known node whose AE title is ARCHIVE-like but nothing listens on it:
    # use the OFFLINE node.
    study = world.data[0].study_uid
    expected = sum(1 for m in world.data if m.study_uid == study)
    result = movescu(world.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                     dest="OFFLINE")
    assert final_has(result, "A702"), result.output
    assert re.search(rf"Failed Suboperations\s*:\s*{expected}", result.final)
    # the Failed SOP Instance UID List names every instance of the study, and only those
    named = set(re.findall(r"\b\d+(?:\.\d+){4,}\b", identifier_of(result.final)))
    assert named == {m.sop_uid for m in world.data if m.study_uid == study}, result.final
    job = job_rows(world)[-1]
    assert job["state"] == "failed" and job["failed"] == expected
    assert "OFFLINE" in str(job["error"])


def store_as(w: World, syntax: str, tag: str) -> Made:
    """One MR instance in ``syntax`` (compressed ones with made-up fragments), sent as is
    (pynetdicom, chunked: the file's bytes on the wire) so minipacs stores it in that syntax."""
    from tests.dicomgen import MR_IMAGE, make_instance, uid
    from tests.e2e.test_receive import encode_as

    sop = uid("mv-as", tag)
    made = make_instance(w.tmp / f"{tag}-source.dcm", sop_class=MR_IMAGE, sop_uid=sop,
                         study_uid=uid("mv-as", tag, "st"), series_uid=uid("mv-as", tag, "se"),
                         patient_id=f"MV-{tag.upper()}", patient_name="STORED^AS", rows=32,
                         cols=32, modality="MR", instance_number=1)
    path = encode_as(made, w.tmp / f"{tag}.dcm", syntax)
    send_as_is(w.port, [path], MR_IMAGE, syntax)
    wait_until(lambda: indexed(w.stack, [sop]) == 1, 60, what=f"the {tag} instance indexed")
    return Made(path, f"MV-{tag.upper()}", uid("mv-as", tag, "st"), uid("mv-as", tag, "se"),
                sop)


DEFLATED = "1.2.840.10008.1.2.1.99"
# Orthanc 1.10 does not take HTJ2K; store_as's made-up fragments cannot be decoded either
HTJ2K = "1.2.840.10008.1.2.4.201"


def test_archive_refusing_some_instances_gives_b000_with_their_uids(world: World) -> None:
    """This Orthanc refuses the deflated transfer syntax and does not know HTJ2K. Of a mixed
    move, the HTJ2K instance fails (its fragments are made up: minipacs cannot decompress it
    for Orthanc), the deflated one arrives inflated (explicit VR little endian, the same
    values: Orthanc converts too), the CT one byte-identical."""
    deflated, htj2k = store_as(world, DEFLATED, "deflated"), store_as(world, HTJ2K, "htj2k")
    archive2 = start_orthanc(world.tmp / "picky", "ARCHIVE2",
                             {"minipacs": ["MINIPACS", "127.0.0.1", world.port]},
                             {"DeflatedTransferSyntaxAccepted": False})
    try:
        pg(dsn(world.stack), "INSERT INTO remote_node (name, aet, host, port) VALUES "
           "('picky', 'ARCHIVE2', '127.0.0.1', $1)", archive2.dicom_port)
        ct = world.ct[0]
        mixed = (deflated, htj2k, ct)
        result = movescu(world.port, {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": "\\".join(m.study_uid for m in mixed),
            "SeriesInstanceUID": "\\".join(m.series_uid for m in mixed),
            "SOPInstanceUID": "\\".join(m.sop_uid for m in mixed)}, dest="ARCHIVE2")
        assert final_has(result, "B000"), result.output
        assert re.search(r"Completed Suboperations\s*:\s*2\b", result.final)
        assert re.search(r"Failed Suboperations\s*:\s*1\b", result.final)
        assert htj2k.sop_uid in result.final
        assert deflated.sop_uid not in result.final and ct.sop_uid not in result.final
        held = archive_instances(archive2)
        assert set(held) == {ct.sop_uid, deflated.sop_uid}
        syntax = archive2.rest("GET", f"/instances/{held[deflated.sop_uid]}/metadata/"
                               "TransferSyntax")
        assert (syntax.decode() if isinstance(syntax, bytes) else syntax) == EXPLICIT_LE
        got = dcmread(BytesIO(archive2.rest("GET", f"/instances/{held[deflated.sop_uid]}/file")))
        sent = dcmread(deflated.path)
        assert [(e.tag, e.value) for e in got] == [(e.tag, e.value) for e in sent]
        row = job_rows(world)[-1]
        assert row["failed_uids"] == [htj2k.sop_uid] and row["state"] == "done"
    finally:
        archive2.stop()


class AbortingArchive:
    """An ARCHIVE that crashes mid-study: a Storage SCP (pynetdicom) that, once, aborts the
    association instead of answering its ``abort_at``-th C-STORE. It keeps the SHA-256 of the
    dataset bytes of every instance it answered with Success."""

    def __init__(self, aet: str, abort_at: int) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

        self.abort_at = abort_at
        self.stored: dict[str, str] = {}
        self.aborted: list[str] = []
        self._count = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=aet)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self._server = server
        self.port = int(self._server.server_address[1])

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        data = event.request.DataSet.getvalue()
        with self._lock:
            self._count += 1
            if self._count == self.abort_at:
                self.aborted.append(uid)
                event.assoc.abort(block=False)  # the A-ABORT goes out instead of a response
                return 0xA700
            self.stored[uid] = sha(data)
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def test_archive_aborting_mid_study_fails_only_the_instance_in_flight(world: World) -> None:
    """RELIABILITY: the ARCHIVE aborts mid-study. The instance whose C-STORE it aborted is
    failed and named in the Failed SOP Instance UID List; the mover re-associates and the rest
    of the study arrives byte-identical; the job is recorded with that UID. Asking again for
    that UID alone (the archive is back) completes the study on the archive."""
    ct = world.ct
    archive = AbortingArchive("ABORTER", abort_at=5)
    try:
        pg(dsn(world.stack), "INSERT INTO remote_node (name, aet, host, port) VALUES "
           "('aborter', 'ABORTER', '127.0.0.1', $1)", archive.port)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ct[0].study_uid}
        result = movescu(world.port, keys, dest="ABORTER")
        assert final_has(result, "B000"), result.output
        assert len(archive.aborted) == 1
        lost = archive.aborted[0]
        assert re.search(rf"Completed Suboperations\s*:\s*{len(ct) - 1}\b", result.final)
        assert re.search(r"Failed Suboperations\s*:\s*1\b", result.final)
        assert lost in result.final
        expected = {m.sop_uid: sha(dataset_bytes(m.path)) for m in ct}
        assert archive.stored == {u: h for u, h in expected.items() if u != lost}
        row = job_rows(world)[-1]
        assert row["destination_aet"] == "ABORTER" and row["state"] == "done"
        assert (row["completed"], row["failed"], row["remaining"]) == (len(ct) - 1, 1, 0)
        assert row["failed_uids"] == [lost]

        # the retry an admin makes from that list: the failed instance alone, at IMAGE level
        again = movescu(world.port, {"QueryRetrieveLevel": "IMAGE",
                                     "StudyInstanceUID": ct[0].study_uid,
                                     "SeriesInstanceUID": ct[0].series_uid,
                                     "SOPInstanceUID": lost}, dest="ABORTER")
        assert final_has(again, "0000"), again.output
        assert re.search(r"Completed Suboperations\s*:\s*1\b", again.final)
        assert archive.stored == expected
        row = job_rows(world)[-1]
        assert (row["state"], row["completed"], row["failed_uids"]) == ("done", 1, [])
    finally:
        archive.stop()
        pg(dsn(world.stack), "DELETE FROM remote_node WHERE name = 'aborter'")


def study_job(study_uid: str, requested_by: str) -> MoveRequested:
    """A job to send a study to the archive, as an API or a routing rule would put it."""
    ident = Dataset()
    ident.StudyInstanceUID = study_uid
    return MoveRequested(job_id=str(uuid.uuid4()), level="STUDY",
                         identifier=ident.to_json_dict(), destination="archive", origin="api",
                         requested_by_aet=requested_by)


def publish_job(w: World, job: MoveRequested) -> None:
    import asyncio

    from shared import broker

    async def publish() -> None:
        conn = await broker.connect(w.stack.env["MINIPACS_AMQP_URL"], 10)
        try:
            pub = broker.Publisher(conn, 10)
            await pub.open()
            await pub.publish(job)
        finally:
            await conn.close()

    asyncio.run(publish())


def test_send_study_to_node_job_without_c_move(world: World) -> None:
    """The API / routing-rule path: a move.requested message straight onto the broker."""
    clear_archive(world.archive)
    study = world.data[-1].study_uid
    expected = [m for m in world.data if m.study_uid == study]
    job = study_job(study, "API")

    publish_job(world, job)
    wait_until(lambda: [r for r in job_rows(world, "API") if r["state"] == "done"], 60,
               what="the API job done")
    assert_archive_holds_exactly(world, expected)
    row = job_rows(world, "API")[-1]
    assert row["origin"] == "api" and row["completed"] == len(expected)


def test_orthanc_as_the_client_moves_from_minipacs(world: World) -> None:
    """Orthanc's REST /modalities/minipacs/move: minipacs sends the study to Orthanc itself."""
    clear_archive(world.archive)
    study = world.data[1]
    expected = [m for m in world.data if m.study_uid == study.study_uid]
    world.archive.rest("POST", "/modalities/minipacs/move", {
        "Level": "Study", "Resources": [{"StudyInstanceUID": study.study_uid}],
        "TargetAet": "ARCHIVE", "Timeout": 60})
    assert_archive_holds_exactly(world, expected)
    assert job_rows(world, "ARCHIVE")[-1]["state"] == "done"


def test_orthanc_as_the_client_retrieves_from_minipacs(world: World) -> None:
    """Orthanc's query + /answers/0/retrieve (a C-MOVE to itself)."""
    clear_archive(world.archive)
    study = world.data[2]
    expected = [m for m in world.data if m.study_uid == study.study_uid]
    q = world.archive.rest("POST", "/modalities/minipacs/query", {
        "Level": "Study", "Query": {"StudyInstanceUID": study.study_uid}})
    world.archive.rest("POST", f"/queries/{q['ID']}/answers/0/retrieve",
                       {"TargetAet": "ARCHIVE", "Synchronous": True})
    assert_archive_holds_exactly(world, expected)


def test_orthanc_as_the_client_stores_to_minipacs(world: World) -> None:
    """Moving an archive from Orthanc to minipacs the way its admins push studies anywhere:
    Orthanc's REST /modalities/minipacs/store (C-STORE from Orthanc). Every instance arrives
    byte-identical and is indexed once, under the study Orthanc held."""
    from tests.e2e.test_ingest import assert_stored_byte_identical

    clear_archive(world.archive)
    made = small_set(world.tmp / "from-orthanc", patients=1, studies=1, series=2, per_series=3,
                     tag="fromorthanc")
    for m in made:
        world.archive.rest("POST", "/instances", m.path.read_bytes())
    studies = world.archive.rest("GET", "/studies")
    assert len(studies) == 1
    world.archive.rest("POST", "/modalities/minipacs/store",
                       {"Resources": studies, "Synchronous": True}, timeout=120)
    wait_until(lambda: indexed(world.stack, [m.sop_uid for m in made]) == len(made), 60,
               what="the study from Orthanc indexed")
    assert_stored_byte_identical(world.stack, made)
    counts = pg(dsn(world.stack), "SELECT num_series, num_instances FROM study "
                "WHERE study_instance_uid = $1", made[0].study_uid)
    assert [tuple(r) for r in counts] == [(2, len(made))]


@dataclass
class SlowDestination:
    """A pynetdicom Storage SCP as a C-MOVE destination whose C-STORE handler holds each
    instance from the ``hold_from``-th on until ``release`` is set (or 60 s pass): the move is
    certainly still running when the test cancels it or kills the mover. Records the SOP
    Instance UIDs it received; ``held`` counts the C-STOREs it is holding now. The
    ``refuse``-th C-STORE, if set, is answered 0xA700 (out of resources) and its UID kept in
    ``refused``."""

    port: int
    release: threading.Event
    received: list[str]
    hold_from: int = 1
    refuse: int = 0
    refused: list[str] = field(default_factory=list)
    server: Any = None
    held: int = 0
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def holds_more_than(self, count: int) -> Callable[[], bool]:
        return lambda: self.held > count

    def start(self) -> SlowDestination:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        def on_store(event: Any) -> int:
            with self._lock:
                self._count += 1
                if self._count == self.refuse:
                    self.refused.append(str(event.request.AffectedSOPInstanceUID))
                    return 0xA700
                hold = self._count >= self.hold_from
                self.held += hold
            if hold:
                self.release.wait(60)
                with self._lock:
                    self.held -= 1
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        ae = AE(ae_title="SLOWDEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()


def slow_node(w: World, hold_from: int, refuse: int = 0) -> SlowDestination:
    from scripts.native import free_port

    dest = SlowDestination(free_port(), threading.Event(), [], hold_from, refuse).start()
    pg(dsn(w.stack), "INSERT INTO remote_node (name, aet, host, port) VALUES "
       "('slow', 'SLOWDEST', '127.0.0.1', $1) ON CONFLICT (name) DO UPDATE SET port = $1",
       dest.port)
    return dest


def test_c_cancel_stops_the_move(world: World) -> None:
    """pynetdicom as the SCU (DCMTK's movescu cannot cancel): C-CANCEL after the first pending
    response, while the destination holds the first instances; the final response is 0xFE00
    and the job is recorded canceled with only the instances already in flight sent."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove,
    )

    dest = slow_node(world, hold_from=1)
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", world.port, ae_title="MINIPACS")
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID = world.ct[0].study_uid
    ident.SeriesInstanceUID = world.ct[0].series_uid
    statuses = []
    log_before = len(world.stack.log_text("mover"))
    try:
        for n, (status, _) in enumerate(assoc.send_c_move(
                ident, "SLOWDEST", StudyRootQueryRetrieveInformationModelMove, msg_id=7)):
            statuses.append(status)
            if n == 0:
                assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelMove)
                wait_until(lambda: "cancel requested" in world.stack.log_text("mover")[
                    log_before:], 30, every=0.05, what="the mover to take the cancel")
                dest.release.set()
    finally:
        assoc.release()
        dest.stop()
    final = statuses[-1]
    assert final.Status == 0xFE00
    row = wait_until(lambda: next((r for r in job_rows(world)[-1:]
                                   if r["state"] != "running"), None), 60,
                     what="the cancelled job recorded")
    assert row is not None
    assert row["state"] == "canceled" and row["destination"] == "slow"
    assert row["completed"] == len(dest.received) < len(world.ct)
    assert row["remaining"] == len(world.ct) - row["completed"] - row["failed"]
    assert final.NumberOfCompletedSuboperations == row["completed"]


def movescu_in_background(port: int, keys: dict[str, str], dest: str) -> subprocess.Popen[str]:
    return subprocess.Popen(movescu_command(port, keys, dest=dest), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dcmtk_env())


def kill_the_mover_mid_job(w: World, dest: SlowDestination) -> None:
    """Once the destination holds a C-STORE (the job is certainly running), SIGKILL the
    mover."""
    wait_until(lambda: dest.held > 0, 60, every=0.05, what="a C-STORE held at the destination")
    w.stack.kill("mover")


def move_ct_series_to_slow(w: World) -> subprocess.Popen[str]:
    """movescu, in the background, asking for the module's CT series to go to SLOWDEST."""
    return movescu_in_background(w.port, {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": w.ct[0].study_uid,
        "SeriesInstanceUID": w.ct[0].series_uid}, "SLOWDEST")


def assert_series_moved(w: World, returncode: int, output: str) -> None:
    """movescu got Success for every instance of the CT series; its job row says done."""
    result = parse_move_output(returncode, output)
    assert final_has(result, "0000"), output[-3000:]
    assert re.search(rf"Completed Suboperations\s*:\s*{len(w.ct)}\b", result.final)
    row = job_rows(w)[-1]
    assert (row["state"], row["completed"], row["failed"]) == ("done", len(w.ct), 0), row


def test_a_mover_killed_mid_job_resumes_it_and_the_c_move_completes(world: World) -> None:
    """RELIABILITY: a component crashes and restarts. The mover is killed while it sends a
    series; the job goes back to the queue, the restarted mover takes it again (its requester
    is still waiting) and sends the series again; movescu gets Success for every instance."""
    series = world.ct
    dest = slow_node(world, hold_from=5)
    log_before = len(world.stack.log_text("gateway"))
    try:
        proc = move_ct_series_to_slow(world)
        kill_the_mover_mid_job(world, dest)
        world.stack.start_service("mover")
        dest.release.set()
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.stop()
    assert_series_moved(world, proc.returncode, output)
    assert {m.sop_uid for m in series} <= set(dest.received)
    assert "resumed" in world.stack.log_text("mover")
    assert "no progress from the mover" not in world.stack.log_text("gateway")[log_before:]


def test_a_mover_killed_after_its_requester_gave_up_records_the_job_failed(
        world: World) -> None:
    """The mover is killed mid-job and stays down past the gateway's idle timeout: movescu
    gets a final failure with the counts it last heard and the UID the destination refused
    (not Success, not a hang). The mover,
    restarted, does not send the rest to a requester that is gone: it records the job failed,
    with the counts it had recorded and the UID the destination had refused."""
    series = world.ct
    dest = slow_node(world, hold_from=5, refuse=2)
    try:
        proc = move_ct_series_to_slow(world)
        wait_until(lambda: dest.held > 0, 60, every=0.05, what="a C-STORE held")
        # the mover writes its counts to the job row after it publishes them (keep-alive:
        # within 5 s): then the gateway has heard of the four answered
        wait_until(lambda: (job_rows(world)[-1]["completed"],
                            job_rows(world)[-1]["failed"]) == (3, 1), 30, every=0.05,
                   what="the four answered C-STOREs recorded")
        world.stack.kill("mover")
        output, _ = proc.communicate(timeout=120)  # the gateway's idle timeout: 20 s here
        result = parse_move_output(proc.returncode, output)
        assert final_has(result, "B000"), output[-3000:]
        assert re.search(r"Completed Suboperations\s*:\s*3\b", result.final), result.final
        assert re.search(rf"Failed Suboperations\s*:\s*{len(series) - 3}\b", result.final)
        # the Failed SOP Instance UID List names the refused one, read from the job row
        assert len(dest.refused) == 1 and dest.refused[0] in result.final, result.final
        job_id = str(job_rows(world)[-1]["id"])
        world.stack.start_service("mover")
        row = wait_until(lambda: next((r for r in job_rows(world) if str(r["id"]) == job_id
                                       and r["state"] != "running"), None), 60,
                         what="the interrupted job recorded")
        dest.release.set()
    finally:
        dest.stop()
    assert row is not None
    assert row["state"] == "failed" and "interrupted" in row["error"], row
    assert (row["completed"], row["failed"], row["remaining"]) == (3, 1, len(series) - 4)
    assert row["failed_uids"] == dest.refused and len(dest.refused) == 1, row
    # the four answered, and those held when the mover died (one per association): no more
    assert len(set(dest.received)) <= 3 + 4


def test_a_job_that_stops_its_mover_every_time_is_recorded_failed_and_parked(
        world: World) -> None:
    """RELIABILITY: a poison job. The mover is killed during each of the job's three attempts
    (the queue's delivery limit); the fourth and last delivery does not run it again: the job
    row ends failed with the reason, the message is in ``mover.jobs.dead`` where an admin sees
    it, and movescu gets a final failure instead of waiting for a job nobody runs. Moved back
    to the job queue by the admin, the job runs again, to the end."""
    from shared import topology
    from tests.e2e.test_poison_and_sweep import move_messages

    dest = slow_node(world, hold_from=5)
    dead = f"{topology.MOVER.name}.dead"
    dead_before = queue_counts(world.stack.config.vhost).get(dead, 0)
    try:
        proc = move_ct_series_to_slow(world)
        for _ in range(topology.MOVER.delivery_limit):
            # each attempt opens new associations, whose C-STOREs the destination holds too
            wait_until(dest.holds_more_than(dest.held), 60, every=0.05,
                       what="a C-STORE of this attempt held")
            world.stack.kill("mover")
            world.stack.start_service("mover")
        output, _ = proc.communicate(timeout=120)
        row = job_rows(world)[-1]
        result = parse_move_output(proc.returncode, output)
        assert final_has(result, "A702") and "interrupted" in result.final, output[-3000:]
        assert row["state"] == "failed", row
        assert f"interrupted {topology.MOVER.delivery_limit} times" in row["error"], row
        wait_until(lambda: queue_counts(world.stack.config.vhost).get(dead, 0)
                   == dead_before + 1, 30, what="the job's message dead-lettered")
        assert "not tried again" in world.stack.log_text("mover")

        # The cause fixed, an admin moves it back (the dashboard's Move messages): Orthanc's
        # resubmit, the job runs again from the start, this time to the end.
        dest.release.set()
        move_messages(world.stack, dead, topology.MOVER.name)
        done = wait_until(lambda: next((r for r in job_rows(world) if r["id"] == row["id"]
                                        and r["state"] == "done"), None), 120,
                          what="the job moved back run to the end")
    finally:
        dest.release.set()
        dest.stop()
    assert done is not None and (done["completed"], done["failed"]) == (len(world.ct), 0), done
    assert {m.sop_uid for m in world.ct} <= set(dest.received)
    assert "moved back from mover.jobs.dead: running it again" in world.stack.log_text("mover")


def close_broker_connections(vhost: str, name: str) -> int:
    """Close (``rabbitmqctl close_connection``) the connections of ``vhost`` whose client
    named itself ``name``: a lost connection, as a network cut or a broker-side consumer
    timeout leaves it. Returns how many were closed."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid",
                          "vhost", "client_properties"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    pids = [line.split()[0] for line in out.splitlines()
            if line.strip() and line.split()[1] == vhost and f'"{name}"' in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "closed by a test"],
                       check=True, timeout=60, capture_output=True)
    return len(pids)


def test_a_job_redelivered_while_it_runs_is_not_run_twice(world: World) -> None:
    """RELIABILITY: the movers' broker connections are lost mid-job (a network cut; RabbitMQ's
    consumer timeout does the same to a long job). Two movers run, as ``--scale mover=2``
    would. The job's message comes back, to either mover, while its first run goes on: it is
    taken up when that run ends, not run a second time beside it; each instance reaches the
    destination once."""
    series = world.ct
    dest = slow_node(world, hold_from=5)
    logs = ("mover", "mover-2")
    before = {name: len(world.stack.log_text(name)) for name in logs}

    def logged(pattern: str) -> bool:
        return any(re.search(pattern, world.stack.log_text(name)[before[name]:])
                   for name in logs)

    second = world.stack.start_service("mover", replica=2)
    try:
        wait_until(lambda: logged(r"mover \S+ consuming"), 60, what="the second mover up")
        proc = move_ct_series_to_slow(world)
        wait_until(lambda: dest.held > 0, 60, every=0.05, what="a C-STORE held")
        assert close_broker_connections(world.stack.config.vhost, "minipacs-mover") == 2
        wait_until(lambda: logged(r"redelivered while it runs|resumed"), 60,
                   what="the job redelivered to a mover")
        dest.release.set()
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.release.set()
        dest.stop()
        world.stack.kill(second, signal.SIGTERM)
    assert_series_moved(world, proc.returncode, output)
    assert sorted(dest.received) == sorted(m.sop_uid for m in series)  # each one once
    assert not logged("resumed")


def hold_job_lock(w: World, job_id: str) -> subprocess.Popen[str]:
    """A psql session holding the job's lock, as a mover running the job holds it; closing
    its stdin ends the session and frees the lock."""
    from services.mover.jobs import LOCK_CLASS

    proc = subprocess.Popen(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                             dsn(w.stack)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"SELECT pg_advisory_lock({LOCK_CLASS}, hashtext('{job_id}'));\n"
                     "\\echo locked\n")
    proc.stdin.flush()
    while (line := proc.stdout.readline()) and line.strip() != "locked":
        pass
    assert line.strip() == "locked", "psql did not take the lock"
    return proc


def test_a_mover_told_to_stop_puts_back_a_job_waiting_for_its_lock(world: World) -> None:
    """A job waiting for the lock of a run elsewhere when its mover gets SIGTERM (compose
    stop, a rolling restart) goes back to the queue at once: the mover stops without waiting
    for it or cancelling anything, and the next mover runs the job once the lock is free."""
    clear_archive(world.archive)
    study = world.data[0].study_uid
    expected = [m for m in world.data if m.study_uid == study]
    job = study_job(study, "LOCKWAIT")
    start = len(world.stack.log_text("mover"))
    holder = hold_job_lock(world, job.job_id)
    try:
        publish_job(world, job)
        wait_until(lambda: "redelivered while it runs" in world.stack.log_text("mover")[start:],
                   60, what="the mover waiting for the job's lock")
        world.stack.kill("mover", signal.SIGTERM)
        stopped = world.stack.log_text("mover")[start:]
        assert f"job={job.job_id[:8]} back to the queue" in stopped, stopped
        assert "still running" not in stopped and "Traceback" not in stopped, stopped
        assert not job_rows(world, "LOCKWAIT")  # never started
        world.stack.start_service("mover")
        wait_until(lambda: world.stack.log_text("mover")[start:].count(
            "redelivered while it runs") > stopped.count("redelivered while it runs"), 60,
                   what="the restarted mover waiting for the lock in turn")
    finally:
        if "mover" not in world.stack.procs:
            world.stack.start_service("mover")
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    wait_until(lambda: [r for r in job_rows(world, "LOCKWAIT") if r["state"] == "done"], 60,
               what="the job done once the lock was free")
    assert job_rows(world, "LOCKWAIT")[0]["completed"] == len(expected)
    assert_archive_holds_exactly(world, expected)


def s3_client(stack: Stack) -> Any:
    from minio import Minio

    env = stack.env
    return Minio(env["MINIPACS_S3_ENDPOINT"], access_key=env["MINIPACS_S3_ACCESS_KEY"],
                 secret_key=env["MINIPACS_S3_SECRET_KEY"], secure=False)


def store_series_missing_one_object(w: World, tag: str, count: int) -> tuple[list[Made], Made]:
    """A new CT series, indexed, then the S3 object of its third instance deleted: its fetch
    fails in the middle of the prefetch."""
    made = ct_series(w.tmp / tag, count=count, tag=tag, size=64)
    sent = storescu(w.port, [m.path for m in made])
    assert sent.successes == count, sent.output
    wait_until(lambda: indexed(w.stack, [m.sop_uid for m in made]) == count, 60,
               what="the series indexed")
    lost = made[2]
    key = pg(dsn(w.stack), "SELECT object_key FROM instance WHERE sop_instance_uid = $1",
             lost.sop_uid)[0]["object_key"]
    s3_client(w.stack).remove_object(w.stack.env["MINIPACS_S3_BUCKET"], key)
    wait_until(lambda: hot_copy(w.stack, key).exists(), 30, what="the hot copy")
    hot_copy(w.stack, key).unlink()  # lost from S3 and from the hot cache
    return made, lost


def test_an_instance_missing_from_s3_is_counted_failed_and_the_rest_arrive(world: World) -> None:
    clear_archive(world.archive)
    made, lost = store_series_missing_one_object(world, "mvlost", 12)
    result = movescu(world.port, {"QueryRetrieveLevel": "SERIES",
                                  "StudyInstanceUID": made[0].study_uid,
                                  "SeriesInstanceUID": made[0].series_uid})
    assert final_has(result, "B000"), result.output
    assert re.search(r"Completed Suboperations\s*:\s*11\b", result.final)
    assert re.search(r"Failed Suboperations\s*:\s*1\b", result.final)
    assert lost.sop_uid in result.final
    assert_archive_holds_exactly(world, [m for m in made if m is not lost])
    row = job_rows(world)[-1]
    assert row["failed_uids"] == [lost.sop_uid] and row["completed"] == 11


def test_a_series_whose_every_object_is_gone_is_a_failed_job(world: World) -> None:
    """Nothing can be sent (every object lost from S3 and from the hot cache): the requester
    hears 0xA702 with every UID, and the job is recorded failed, as when the destination is
    down (not "done" with everything failed)."""
    made, lost = store_series_missing_one_object(world, "mvnone", 3)
    for m in made:
        if m is not lost:
            key = pg(dsn(world.stack), "SELECT object_key FROM instance WHERE "
                     "sop_instance_uid = $1", m.sop_uid)[0]["object_key"]
            s3_client(world.stack).remove_object(world.stack.env["MINIPACS_S3_BUCKET"], key)
            hot_copy(world.stack, key).unlink(missing_ok=True)
    result = movescu(world.port, {"QueryRetrieveLevel": "SERIES",
                                  "StudyInstanceUID": made[0].study_uid,
                                  "SeriesInstanceUID": made[0].series_uid})
    assert final_has(result, "A702"), result.output
    assert set(re.findall(r"\b\d+(?:\.\d+){4,}\b", identifier_of(result.final))) == {
        m.sop_uid for m in made}
    row = job_rows(world)[-1]
    assert (row["state"], row["completed"], row["failed"]) == ("failed", 0, 3), row
    assert "none of the 3 instances could be sent" in row["error"]


def test_the_mover_reads_the_hot_cache_first(world: World) -> None:
    """An instance whose S3 object is gone but whose hot copy is not still reaches the
    ARCHIVE: the mover read the cache."""
    clear_archive(world.archive)
    made = ct_series(world.tmp / "mvhot", count=5, tag="mvhot", size=64)
    sent = storescu(world.port, [m.path for m in made])
    assert sent.successes == len(made), sent.output
    wait_until(lambda: indexed(world.stack, [m.sop_uid for m in made]) == len(made), 60,
               what="the series indexed")
    key = pg(dsn(world.stack), "SELECT object_key FROM instance WHERE sop_instance_uid = $1",
             made[2].sop_uid)[0]["object_key"]
    wait_until(lambda: hot_copy(world.stack, key).exists(), 30, what="the hot copy")
    s3_client(world.stack).remove_object(world.stack.env["MINIPACS_S3_BUCKET"], key)
    result = movescu(world.port, {"QueryRetrieveLevel": "SERIES",
                                  "StudyInstanceUID": made[0].study_uid,
                                  "SeriesInstanceUID": made[0].series_uid})
    assert final_has(result, "0000"), result.output
    assert_archive_holds_exactly(world, made)


def test_mover_not_running_is_a_clear_failure_not_a_hang(world: World) -> None:
    world.stack.kill("mover")
    try:
        started = time.monotonic()
        result = movescu(world.port, {"QueryRetrieveLevel": "STUDY",
                                      "StudyInstanceUID": world.data[0].study_uid}, timeout=60)
        took = time.monotonic() - started
        assert final_has(result, "A702"), result.output
        assert took < 15, took
    finally:
        world.stack.start_service("mover")
    # the job the gateway gave up on is recorded as expired once a mover sees it, not run
    wait_until(lambda: [r for r in job_rows(world) if r["state"] == "expired"], 60,
               what="the abandoned job recorded as expired")


def move_series_to_implicit_only(world: World, first: Made, folder: str) -> Path:
    """C-MOVE ``first``'s series to the node IMPLICIT, a ``storescp +xi`` started for it
    (implicit VR little endian only) writing into ``world.tmp / folder``; Success expected."""
    out = world.tmp / folder
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "+xi", "-aet", "IMPLICIT", "-od", str(out),
                            str(world.implicit_port)], env=dcmtk_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(world.implicit_port), 30, what="storescp listening")
        result = movescu(world.port, {"QueryRetrieveLevel": "SERIES",
                                      "StudyInstanceUID": first.study_uid,
                                      "SeriesInstanceUID": first.series_uid}, dest="IMPLICIT")
        assert final_has(result, "0000"), result.output
    finally:
        scp.terminate()
        scp.wait(30)
    return out


def test_a_destination_taking_only_implicit_vr_gets_the_series_converted(world: World) -> None:
    """Some workstations and older archives accept implicit VR little endian only (DCMTK's
    ``storescp +xi`` here). minipacs keeps instances as received, explicit VR here; like
    Orthanc it now also offers the destination the other little endian syntax and converts
    (element values and pixel data unchanged), where every sub-operation used to fail with
    "no accepted presentation context"."""
    out = move_series_to_implicit_only(world, world.ct[0], "implicit-only")
    received = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, out.iterdir())}
    assert set(received) == {m.sop_uid for m in world.ct}
    for m in world.ct:
        got, sent = received[m.sop_uid], dcmread(m.path)
        assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # implicit VR LE
        assert sent.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert [(e.tag, e.value) for e in got] == [(e.tag, e.value) for e in sent], m.sop_uid


def test_a_big_endian_series_goes_out_little_endian_where_big_endian_is_refused(
        world: World) -> None:
    """Explicit VR big endian, retired from DICOM in 2017, still comes from old modalities,
    and many applications no longer take it. A series converted by DCMTK's ``dcmconv +tb``
    and sent by ``storescu -xb`` is stored as received (big endian). Moved to a
    ``storescp +xi`` (implicit VR little endian only) and taken back by ``getscu +xi +B``
    (DCMTK 3.6.7's ``getscu`` then proposes explicit VR little endian alone for its storage
    contexts, as its ``-d`` output shows; ``+B`` writes what arrives), it arrives in that
    syntax with every value of the original, pixel data included (its words swapped back), as
    Orthanc transcodes. Both used to fail: no accepted presentation context."""
    from tests.e2e.test_get import getscu, received

    originals = ct_series(world.tmp / "be-source", count=4, tag="mvbe", size=64)
    big = world.tmp / "be"
    big.mkdir()
    for m in originals:
        subprocess.run([dcmtk("dcmconv"), "+tb", str(m.path), str(big / m.path.name)],
                       check=True, env=dcmtk_env(), timeout=60)
    assert dcmread(big / originals[0].path.name).file_meta.TransferSyntaxUID == \
        "1.2.840.10008.1.2.2"
    sent = storescu(world.port, sorted(big.iterdir()), extra=["-xb"])
    assert sent.successes == len(originals), sent.output
    sops = [m.sop_uid for m in originals]
    wait_until(lambda: indexed(world.stack, sops) == len(sops), 60, what="indexed")
    rows = pg(dsn(world.stack), "SELECT DISTINCT transfer_syntax FROM instance WHERE "
              "sop_instance_uid = ANY($1::text[])", sops)
    assert [r["transfer_syntax"] for r in rows] == ["1.2.840.10008.1.2.2"]  # as received

    def assert_little_endian_originals(files: dict[str, Path], syntax: str) -> None:
        assert set(files) == set(sops)
        for m in originals:
            got, original = dcmread(files[m.sop_uid]), dcmread(m.path)
            assert got.file_meta.TransferSyntaxUID == syntax, m.sop_uid
            assert [(e.tag, e.value) for e in got] == \
                [(e.tag, e.value) for e in original], m.sop_uid
            assert (got.pixel_array == original.pixel_array).all()

    out = move_series_to_implicit_only(world, originals[0], "be-moved")
    assert_little_endian_originals({str(dcmread(p).SOPInstanceUID): p for p in out.iterdir()},
                                   "1.2.840.10008.1.2")

    got = getscu(world.port, {"QueryRetrieveLevel": "STUDY",
                              "StudyInstanceUID": originals[0].study_uid},
                 world.tmp / "be-got", extra=["+xi", "+B"])  # +B: as received
    assert re.search(r"DIMSE Status\s*:\s*0x0000", got.final), got.output
    proposed = re.search(r"=CTImageStorage\n.*\n.*Proposed Transfer Syntax\(es\):\n"
                         r"((?:D:       =\w+\n)+)", got.output)
    assert proposed and proposed.group(1).split() == ["D:", "=LittleEndianExplicit"]
    assert_little_endian_originals(received(world.tmp / "be-got"), EXPLICIT_LE)


class EvictingArchive:
    """A Storage SCP (pynetdicom) that, at its first C-STORE, waits a second (the mover has
    fetched the next instances from the hot cache meanwhile) and removes the hot copies of
    ``keys``, as a trim would; every C-STORE is answered once that is done. It keeps the
    SHA-256 of the dataset bytes of every instance."""

    def __init__(self, aet: str, stack: Stack, keys: Sequence[str]) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

        self.stack, self.keys = stack, keys
        self.stored: dict[str, str] = {}
        self._evicted = threading.Event()
        self._first = threading.Lock()
        ae = AE(ae_title=aet)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self._server = server
        self.port = int(self._server.server_address[1])

    def _on_store(self, event: Any) -> int:
        if self._first.acquire(blocking=False):
            time.sleep(1.0)
            for key in self.keys:
                hot_copy(self.stack, key).unlink(missing_ok=True)
            self._evicted.set()
        self._evicted.wait(30)
        self.stored[str(event.request.AffectedSOPInstanceUID)] = sha(
            event.request.DataSet.getvalue())
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def test_hot_copies_evicted_mid_move_are_still_sent(world: World) -> None:
    """Instances over the 4 MiB held in memory go out from their hot-cache file; a trim that
    evicts the files the mover has fetched ahead takes nothing away: every instance arrives,
    byte-identical, and the C-MOVE is Success. (The file used to be opened only at send time:
    each such instance aborted its association and was counted failed.)"""
    made = ct_series(world.tmp / "mvevict", count=12, tag="mvevict", size=1500)
    assert all(m.path.stat().st_size > 4 * 1024 * 1024 for m in made)
    sent = storescu(world.port, [m.path for m in made])
    assert sent.successes == len(made), sent.output
    uids = [m.sop_uid for m in made]
    wait_until(lambda: indexed(world.stack, uids) == len(made), 60, what="the series indexed")
    keys = [r["object_key"] for r in pg(dsn(world.stack), "SELECT object_key FROM instance "
                                        "WHERE sop_instance_uid = ANY($1::text[])", uids)]
    for key in keys:
        def copied(key: str = key) -> bool:
            return hot_copy(world.stack, key).exists()

        wait_until(copied, 30, what="hot copies")
    archive = EvictingArchive("EVICTOR", world.stack, keys)
    try:
        pg(dsn(world.stack), "INSERT INTO remote_node (name, aet, host, port) VALUES "
           "('evictor', 'EVICTOR', '127.0.0.1', $1)", archive.port)
        result = movescu(world.port, {"QueryRetrieveLevel": "SERIES",
                                      "StudyInstanceUID": made[0].study_uid,
                                      "SeriesInstanceUID": made[0].series_uid},
                         dest="EVICTOR")
        assert not any(hot_copy(world.stack, key).exists() for key in keys)  # really evicted
        assert final_has(result, "0000"), result.output
        assert re.search(rf"Completed Suboperations\s*:\s*{len(made)}\b", result.final)
        assert archive.stored == {m.sop_uid: sha(dataset_bytes(m.path)) for m in made}
    finally:
        archive.stop()
        pg(dsn(world.stack), "DELETE FROM remote_node WHERE name = 'evictor'")
