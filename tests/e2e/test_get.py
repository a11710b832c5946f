"""Issue 3, C-GET end to end: DCMTK getscu retrieves from minipacs on the same association;
the files it writes carry the very dataset bytes that were stored."""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from scripts.native import Stack
from shared import dimse_wire as wire
from tests.conftest import dsn, hot_copy, make_stack, teardown
from tests.dicomgen import Made, ct_series, dataset_bytes, small_set
from tests.helpers import dcmtk, dcmtk_env, pg, storescu, wait_until

pytestmark = pytest.mark.e2e


@dataclass
class World:
    stack: Stack
    data: list[Made]
    ct: list[Made]

    @property
    def port(self) -> int:
        return self.stack.config.gateway_port


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("get")
    stack = make_stack(tmp, "get")
    try:
        stack.start()
        data = small_set(tmp / "small", patients=2, studies=2, series=2, per_series=3,
                         tag="gt")
        ct = ct_series(tmp / "ct", count=30, tag="gtct", size=128)
        sent = storescu(stack.config.gateway_port, [m.path for m in data + ct])
        assert sent.successes == len(data) + len(ct), sent.output
        uids = [m.sop_uid for m in data + ct]

        def indexed() -> bool:
            rows = pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE sop_instance_uid "
                      "= ANY($1::text[])", uids)
            return int(rows[0]["n"]) == len(uids)

        wait_until(indexed, 60, what="the test data indexed")
        yield World(stack, data, ct)
    finally:
        teardown(stack)


@dataclass
class GetResult:
    returncode: int
    output: str
    pending: list[tuple[int, int, int, int]]
    final: str


def getscu(port: int, keys: dict[str, str], out: Path, model: str = "-S",
           extra: Sequence[str] = ()) -> GetResult:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [dcmtk("getscu"), "-d", model, "-aet", "GETSCU", "-aec", "MINIPACS", "-od", str(out),
           *extra]
    for k, v in keys.items():
        cmd += ["-k", f"{k}={v}"]
    cmd += ["127.0.0.1", str(port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=120)
    text = proc.stdout + proc.stderr
    pending, final = [], ""
    for block in re.split(r"(?=Received C-GET Response|Received Final C-GET Response)",
                          text)[1:]:

        def count(name: str, b: str = block) -> int:
            found = re.search(rf"{name} Suboperations\s*:\s*(\d+)", b)
            return int(found.group(1)) if found else -1

        if re.search(r"DIMSE Status\s*:\s*0xff00", block, re.I):
            pending.append((count("Remaining"), count("Completed"), count("Failed"),
                            count("Warning")))
        elif "DIMSE Status" in block and "C-GET RSP" in block:
            final = block
    return GetResult(proc.returncode, text, pending, final)


def received(out: Path) -> dict[str, Path]:
    files = {}
    for path in out.iterdir():
        if path.is_file():
            files[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return files


def test_getscu_retrieves_a_study_byte_identical(world: World, tmp_path: Path) -> None:
    first = world.data[0]
    expected = [m for m in world.data if m.study_uid == first.study_uid]
    result = getscu(world.port, {"QueryRetrieveLevel": "STUDY",
                                 "StudyInstanceUID": first.study_uid}, tmp_path / "out")
    assert re.search(r"DIMSE Status\s*:\s*0x0000", result.final), result.output
    files = received(tmp_path / "out")
    assert set(files) == {m.sop_uid for m in expected}
    for m in expected:
        assert dataset_bytes(files[m.sop_uid]) == dataset_bytes(m.path), m.sop_uid
    # pending responses after each sub-operation but the last, counting down
    assert [p[0] for p in result.pending] == list(range(len(expected) - 1, 0, -1))
    assert all(r + c == len(expected) and f == w == 0 for r, c, f, w in result.pending)


def test_getscu_patient_root_series_level(world: World, tmp_path: Path) -> None:
    ct = world.ct
    result = getscu(world.port, {"QueryRetrieveLevel": "SERIES", "PatientID": ct[0].patient_id,
                                 "StudyInstanceUID": ct[0].study_uid,
                                 "SeriesInstanceUID": ct[0].series_uid}, tmp_path / "out",
                    model="-P")
    assert re.search(r"DIMSE Status\s*:\s*0x0000", result.final), result.output
    files = received(tmp_path / "out")
    assert set(files) == {m.sop_uid for m in ct}
    for m in ct:
        assert dataset_bytes(files[m.sop_uid]) == dataset_bytes(m.path)


def test_get_of_nothing_is_success_with_zero_counts(world: World, tmp_path: Path) -> None:
    result = getscu(world.port, {"QueryRetrieveLevel": "STUDY",
                                 "StudyInstanceUID": "1.2.3.4.5.6.7.8.9"}, tmp_path / "out")
    assert re.search(r"DIMSE Status\s*:\s*0x0000", result.final), result.output
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("keys", [
    {"StudyInstanceUID": "1.2.3"},                                    # no QueryRetrieveLevel
    {"QueryRetrieveLevel": "PATIENT", "PatientID": "GT-0000"},        # not in Study Root
    {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3"},    # no SeriesInstanceUID
])
def test_malformed_identifiers_are_refused(world: World, tmp_path: Path,
                                           keys: dict[str, str]) -> None:
    result = getscu(world.port, keys, tmp_path / "out")
    assert re.search(r"DIMSE Status\s*:\s*0xa900", result.final, re.I), result.output


def test_get_without_a_storage_context_fails_the_sub_operations(world: World) -> None:
    """A C-GET SCU that offers no storage context for the stored SOP class: every
    sub-operation fails, the final status is 0xA702 with the failed UIDs, nothing hangs."""
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)  # the study is MR
    assoc = ae.associate("127.0.0.1", world.port, ae_title="MINIPACS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)])
    assert assoc.is_established
    study = world.data[0].study_uid
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    try:
        responses = list(assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    status, identifier = responses[-1]
    expected = {m.sop_uid for m in world.data if m.study_uid == study}
    assert status.Status == 0xA702
    assert status.NumberOfFailedSuboperations == len(expected)
    assert identifier is not None
    assert set(identifier.FailedSOPInstanceUIDList) == expected


def test_getscu_retrieves_a_ct_study_through_the_prefetch_byte_identical(
        world: World, tmp_path: Path) -> None:
    """Every instance of the CT series (prefetched from S3 while the previous ones are sent),
    pending responses after each sub-operation but the last, counting down exactly."""
    ct = world.ct
    result = getscu(world.port, {"QueryRetrieveLevel": "STUDY",
                                 "StudyInstanceUID": ct[0].study_uid}, tmp_path / "out")
    assert re.search(r"DIMSE Status\s*:\s*0x0000", result.final), result.output
    files = received(tmp_path / "out")
    assert set(files) == {m.sop_uid for m in ct}
    for m in ct:
        assert dataset_bytes(files[m.sop_uid]) == dataset_bytes(m.path), m.sop_uid
    assert [p[:2] for p in result.pending] == [(len(ct) - n, n) for n in range(1, len(ct))]


def _s3(stack: Stack) -> Any:
    from minio import Minio

    env = stack.env
    return Minio(env["MINIPACS_S3_ENDPOINT"], access_key=env["MINIPACS_S3_ACCESS_KEY"],
                 secret_key=env["MINIPACS_S3_SECRET_KEY"], secure=False)


def store_and_index(world: World, made: list[Made]) -> list[str]:
    """Send ``made`` with storescu and wait until all are indexed; their SOP Instance UIDs."""
    sent = storescu(world.port, [m.path for m in made])
    assert sent.successes == len(made), sent.output
    uids = [m.sop_uid for m in made]
    wait_until(lambda: int(pg(dsn(world.stack), "SELECT count(*) AS n FROM instance WHERE "
                              "sop_instance_uid = ANY($1::text[])", uids)[0]["n"]) == len(made),
               60, what="the series indexed")
    return uids


def test_an_instance_missing_from_s3_is_counted_failed_and_the_rest_arrive(
        world: World, tmp_path: Path) -> None:
    made = ct_series(tmp_path / "lost", count=10, tag="gtlost", size=64)
    store_and_index(world, made)
    lost = made[3]
    key = pg(dsn(world.stack), "SELECT object_key FROM instance WHERE sop_instance_uid = $1",
             lost.sop_uid)[0]["object_key"]
    _s3(world.stack).remove_object(world.stack.env["MINIPACS_S3_BUCKET"], key)
    wait_until(lambda: hot_copy(world.stack, key).exists(), 30, what="the hot copy")
    hot_copy(world.stack, key).unlink()  # lost from S3 and from the hot cache

    result = getscu(world.port, {"QueryRetrieveLevel": "SERIES",
                                 "StudyInstanceUID": made[0].study_uid,
                                 "SeriesInstanceUID": made[0].series_uid}, tmp_path / "out")
    assert re.search(r"DIMSE Status\s*:\s*0xb000", result.final, re.I), result.output
    assert re.search(r"Completed Suboperations\s*:\s*9\b", result.final)
    assert re.search(r"Failed Suboperations\s*:\s*1\b", result.final)
    files = received(tmp_path / "out")
    assert set(files) == {m.sop_uid for m in made if m is not lost}
    for m in made:
        if m is not lost:
            assert dataset_bytes(files[m.sop_uid]) == dataset_bytes(m.path)
    # the pending response after the lost one already counts it as failed
    assert (len(made) - 4, 3, 1, 0) in result.pending


def test_the_hot_cache_serves_c_get_and_what_s3_serves_is_kept_there(
        world: World, tmp_path: Path) -> None:
    """Storage moves each verified spool file into the hot cache; C-GET reads it there first
    (here: an instance S3 lost still arrives) and keeps what it had to read from S3."""
    made = ct_series(tmp_path / "hot", count=6, tag="gthot", size=64)
    uids = store_and_index(world, made)
    keys = {r["sop_instance_uid"]: r["object_key"] for r in pg(
        dsn(world.stack), "SELECT sop_instance_uid, object_key FROM instance WHERE "
        "sop_instance_uid = ANY($1::text[])", uids)}
    for key in keys.values():
        def copied(key: str = key) -> bool:
            return hot_copy(world.stack, key).exists()

        wait_until(copied, 30, what="hot copies")
    only_hot, only_s3 = keys[made[0].sop_uid], keys[made[1].sop_uid]
    _s3(world.stack).remove_object(world.stack.env["MINIPACS_S3_BUCKET"], only_hot)
    hot_copy(world.stack, only_s3).unlink()

    identifier = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": made[0].study_uid,
                  "SeriesInstanceUID": made[0].series_uid}
    result = getscu(world.port, identifier, tmp_path / "out")
    assert re.search(r"DIMSE Status\s*:\s*0x0000", result.final, re.I), result.output
    files = received(tmp_path / "out")
    assert set(files) == set(uids)
    for m in made:
        assert dataset_bytes(files[m.sop_uid]) == dataset_bytes(m.path)
    # the copy read from S3 is back in the cache, byte for byte the object (named by its hash)
    copy = hot_copy(world.stack, only_s3)
    assert copy.exists()
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == copy.stem


def test_c_cancel_stops_the_get(world: World) -> None:
    """The SCU cancels from inside its handler of the first sub-operation, before answering
    it: the C-GET stops there with 0xFE00, the rest still remaining, nothing hangs."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
        Verification,
    )

    got: list[str] = []
    assoc: Any = None

    def on_store(event: Any) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        if len(got) == 1:
            assoc.send_c_cancel(9, query_model=StudyRootQueryRetrieveInformationModelGet)
        return 0x0000

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", world.port, ae_title="MINIPACS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID = world.ct[0].study_uid
    ident.SeriesInstanceUID = world.ct[0].series_uid
    try:
        responses = list(assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet,
                                          msg_id=9))
        assert assoc.is_established  # the association is still usable afterwards
        echo_ok = assoc.send_c_echo().Status == 0x0000 if assoc.is_established else False
    finally:
        assoc.release()
    status, _ = responses[-1]
    assert status.Status == 0xFE00
    assert status.NumberOfCompletedSuboperations == len(got) == 1
    assert status.NumberOfRemainingSuboperations == len(world.ct) - 1
    assert echo_ok


def get_ct_series(world: World, on_store: Callable[[Any], int],
                  syntaxes: Sequence[str] | None = None) -> Any:
    """A C-GET of the CT series from our pynetdicom client (a CT storage context, SCP role,
    with ``syntaxes`` or pynetdicom's default ones), ``on_store`` handling its
    sub-operations; the association once the C-GET is over."""
    return get_series(world, world.ct[0], on_store, syntaxes)[0]


def get_series(world: World, of: Made, on_store: Callable[[Any], int],
               syntaxes: Sequence[str] | None = None, timeout: float = 30
               ) -> tuple[Any, list[tuple[Any, Any]]]:
    """``get_ct_series`` for the series of ``of``: the association and the C-GET responses
    (status dataset, identifier); the client waits ``timeout`` s at most for each."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    ae = AE(ae_title="TESTSCU")
    ae.dimse_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    if syntaxes:
        ae.add_requested_context(CTImageStorage, list(syntaxes))
    else:
        ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", world.port, ae_title="MINIPACS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID = of.study_uid
    ident.SeriesInstanceUID = of.series_uid
    return assoc, list(assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet))


def assert_next_get_served(world: World, out: Path) -> None:
    first = world.data[0]
    result = getscu(world.port, {"QueryRetrieveLevel": "STUDY",
                                 "StudyInstanceUID": first.study_uid}, out)
    assert re.search(r"DIMSE Status\s*:\s*0x0000", result.final), result.output


def test_an_scu_aborting_mid_get_leaves_the_gateway_serving(world: World,
                                                             tmp_path: Path) -> None:
    """The SCU aborts the association from its handler of the second sub-operation (the
    gateway is reading that socket itself then): the abort goes back to pynetdicom, the C-GET
    stops, and the next C-GET is served normally."""
    got: list[str] = []

    def on_store(event: Any) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        if len(got) == 2:
            event.assoc.abort()
        return 0x0000

    log_before = len(world.stack.log_text("gateway"))
    assoc = get_ct_series(world, on_store)
    assert assoc.is_aborted and len(got) == 2
    wait_until(lambda: "C-GET: association lost" in world.stack.log_text("gateway")[log_before:],
               30, what="the gateway to see the abort")
    assert_next_get_served(world, tmp_path / "out")


def test_an_scu_sending_an_endless_command_mid_get_is_aborted(world: World,
                                                               tmp_path: Path) -> None:
    """RELIABILITY: bounded memory whatever a peer sends. While a C-GET runs the gateway reads
    the SCU's socket itself; a command set that never ends (fragments without the last bit)
    grew its buffer without limit. Past ``COMMAND_MAX`` the association is aborted with a log
    line saying why, and the next C-GET is served."""

    def on_store(event: Any) -> int:
        sock = event.assoc.dul.socket.socket
        cx = event.context.context_id
        fragment = struct.pack(">BBLLBB", 0x04, 0, 16384 + 6, 16384 + 2, cx, 0x01) + bytes(16384)
        sent = 0
        try:  # in place of the C-STORE response, 32 times what the gateway holds
            while sent < 32 * wire.COMMAND_MAX:
                sock.sendall(fragment)
                sent += 16384
        except OSError:
            pass
        return 0x0000

    log_before = len(world.stack.log_text("gateway"))
    assoc = get_ct_series(world, on_store)
    wait_until(lambda: assoc.is_aborted, 30, what="the gateway to abort the association")
    wait_until(lambda: f"the SCU sent a command set of more than {wire.COMMAND_MAX} bytes "
               "during C-GET: aborting" in world.stack.log_text("gateway")[log_before:],
               30, what="the reason logged")
    assert_next_get_served(world, tmp_path / "out")


def test_an_scu_taking_only_implicit_vr_gets_the_series_converted(world: World) -> None:
    """A C-GET SCU that offers its storage context in implicit VR little endian only: the
    instances, stored in explicit VR, are converted for it (every element's value and the
    pixel data unchanged) instead of failing "no accepted context"."""
    got: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        assert event.context.transfer_syntax == "1.2.840.10008.1.2"
        ds = event.dataset
        got[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    assoc = get_ct_series(world, on_store, ["1.2.840.10008.1.2"])
    assoc.release()
    assert set(got) == {m.sop_uid for m in world.ct}
    for m in world.ct:
        sent = dcmread(m.path)
        assert [(e.tag, e.value) for e in got[m.sop_uid]] == [(e.tag, e.value) for e in sent]


@pytest.mark.parametrize("syntax", ["as stored", "converted"])
def test_hot_copies_evicted_mid_get_are_still_sent_and_the_get_answered(
        world: World, tmp_path: Path, syntax: str) -> None:
    """Instances over the 4 MiB held in memory are sent from their hot-cache file. A trim (any
    process's) may evict those files after they were fetched ahead and before they are sent:
    here the SCU removes them from its handler of the first sub-operation, once the gateway
    has fetched the next ones. Every instance still arrives and the final response says so.
    (The file used to be opened only at send time: as stored, the gateway took the missing
    file for a lost association and sent no final response, the SCU waiting for its timeout;
    converted, the C-GET ended early with Success, three instances unsent.)"""
    made = ct_series(tmp_path / "evict", count=4, tag=f"gtevict{syntax[0]}", size=1500)
    assert all(m.path.stat().st_size > 4 * 1024 * 1024 for m in made)
    uids = store_and_index(world, made)
    keys = [r["object_key"] for r in pg(dsn(world.stack), "SELECT object_key FROM instance "
                                        "WHERE sop_instance_uid = ANY($1::text[])", uids)]
    for key in keys:
        def copied(key: str = key) -> bool:
            return hot_copy(world.stack, key).exists()

        wait_until(copied, 30, what="hot copies")
    got: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        if not got:
            time.sleep(1.0)  # the gateway fetches the next instances meanwhile (local files)
            for key in keys:
                hot_copy(world.stack, key).unlink(missing_ok=True)
        got[str(event.request.AffectedSOPInstanceUID)] = event.dataset
        return 0x0000

    syntaxes = ["1.2.840.10008.1.2"] if syntax == "converted" else None
    assoc, responses = get_series(world, made[0], on_store, syntaxes, timeout=20)
    if assoc.is_established:
        assoc.release()
    assert not any(hot_copy(world.stack, key).exists() for key in keys)  # really evicted
    status = responses[-1][0]
    assert status is not None and "Status" in status, "no final C-GET response"
    assert (status.Status, status.NumberOfCompletedSuboperations,
            status.get("NumberOfFailedSuboperations", 0)) == (0x0000, len(made), 0)
    assert set(got) == set(uids)
    for m in made:
        sent = dcmread(m.path)
        assert got[m.sop_uid].PixelData == sent.PixelData, m.sop_uid


def test_temp_files_of_a_gateway_killed_mid_get_are_removed_when_it_starts_again(
        tmp_path: Path) -> None:
    """Instances over 4 MiB read from S3 (no hot cache here) wait for their sub-operation in
    temp files under ``<spool>/retrieve``. A gateway SIGKILLed mid-C-GET left them there for
    ever; now each process keeps them in a folder of its own that the next gateway to start
    (or any running one, every minute) removes once its owner is gone."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    from scripts.native import port_open

    stack = make_stack(tmp_path, "getkill", MINIPACS_CACHE_MB="0")
    try:
        stack.start()
        port = stack.config.gateway_port
        made = ct_series(tmp_path / "big", count=4, tag="gtkill", size=1500)
        sent = storescu(port, [m.path for m in made])
        assert sent.successes == len(made), sent.output
        uids = [m.sop_uid for m in made]
        wait_until(lambda: int(pg(dsn(stack), "SELECT count(*) AS n FROM instance WHERE "
                                  "sop_instance_uid = ANY($1::text[])", uids)[0]["n"])
                   == len(made), 60, what="the series indexed")
        retrieve = Path(stack.config.base_dir) / "spool" / "retrieve"

        def temp_files() -> list[Path]:
            return [p for p in retrieve.rglob("*.dcm") if p.is_file()]

        held = threading.Event()

        def on_store(event: Any) -> int:
            held.wait(60)  # the gateway fetches the next ones meanwhile, then is killed
            return 0x0000

        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS",
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = made[0].study_uid
        ident.SeriesInstanceUID = made[0].series_uid
        getter = threading.Thread(target=lambda: list(assoc.send_c_get(
            ident, StudyRootQueryRetrieveInformationModelGet)), daemon=True)
        getter.start()
        wait_until(lambda: len(temp_files()) >= 2, 30,
                   what="temp files of the instances fetched ahead")
        left = temp_files()
        stack.kill("gateway")  # SIGKILL: no clean-up of its own
        held.set()
        getter.join(30)
        assert all(p.exists() for p in left)  # what the bug left for ever

        log_before = len(stack.log_text("gateway"))
        stack.start_service("gateway")
        wait_until(lambda: port_open(port), 60, what="the gateway back")
        assert not any(p.exists() for p in left)
        assert temp_files() == []
        assert re.search(r"removed \d+ C-GET temp files left by gateways that ended mid-C-GET",
                         stack.log_text("gateway")[log_before:])
        # the gateway's own folder, and a C-GET through it that leaves nothing behind
        result = getscu(port, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID":
                               made[0].study_uid, "SeriesInstanceUID": made[0].series_uid},
                        tmp_path / "out")
        assert re.search(r"DIMSE Status\s*:\s*0x0000", result.final), result.output
        assert set(received(tmp_path / "out")) == set(uids)
        assert temp_files() == []
    finally:
        teardown(stack)
