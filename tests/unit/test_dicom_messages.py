from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from shared.dicom import InvalidInstance, index_record, inspect_instance
from shared.messages import BadMessage, InstanceReceived, InstanceStored
from shared.topology import QUEUES
from tests.dicomgen import CT_IMAGE, make_instance, uid

TS = "1.2.840.10008.1.2.1"


def _file(tmp: Path, **kw: object) -> tuple[Path, str]:
    sop = uid("unit", tmp.name)
    args: dict[str, object] = dict(sop_class=CT_IMAGE, sop_uid=sop, study_uid=uid("st"),
                                   series_uid=uid("se"), patient_id="P1",
                                   patient_name="Müller^Jürgen", rows=8, cols=8, modality="CT",
                                   instance_number=3, charset="ISO_IR 100")
    args.update(kw)
    return make_instance(tmp / "x.dcm", **args), sop  # type: ignore[arg-type]


def test_inspect_accepts_a_good_file(tmp_path: Path) -> None:
    path, sop = _file(tmp_path)
    info = inspect_instance(path, CT_IMAGE, sop, TS)
    assert info.sop_instance_uid == sop and info.study_instance_uid == uid("st")


def test_inspect_refuses_truncated_pixel_data(tmp_path: Path) -> None:
    path, sop = _file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(InvalidInstance) as err:
        inspect_instance(path, CT_IMAGE, sop, TS)
    assert err.value.kind == "unreadable"


def test_inspect_refuses_garbage_and_empty(tmp_path: Path) -> None:
    p = tmp_path / "g.dcm"
    p.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(InvalidInstance):
        inspect_instance(p, CT_IMAGE, "1.2.3", TS)
    p.write_bytes(b"")
    with pytest.raises(InvalidInstance):
        inspect_instance(p, CT_IMAGE, "1.2.3", TS)


def test_inspect_refuses_mismatch_and_bad_uids(tmp_path: Path) -> None:
    path, sop = _file(tmp_path)
    with pytest.raises(InvalidInstance) as err:
        inspect_instance(path, CT_IMAGE, sop + ".9", TS)
    assert err.value.kind == "mismatch"
    with pytest.raises(InvalidInstance) as err:
        inspect_instance(path, CT_IMAGE, "../../x", TS)
    assert err.value.kind == "missing_uid"


def test_inspect_refuses_missing_study_uid(tmp_path: Path) -> None:
    path, sop = _file(tmp_path, study_uid="")
    with pytest.raises(InvalidInstance) as err:
        inspect_instance(path, CT_IMAGE, sop, TS)
    assert err.value.kind == "missing_uid"


def test_index_record_maps_levels_and_keeps_non_ascii_names() -> None:
    header = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]},
        "00100020": {"vr": "LO", "Value": ["P1"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00200013": {"vr": "IS", "Value": [99999999999]},
        "00200011": {"vr": "IS", "Value": ["7"]},
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
    }
    rec = index_record(header)
    assert rec.patient["patient_name"] == "Müller^Jürgen"
    assert rec.study["study_instance_uid"] == "1.2.3"
    assert rec.series["series_number"] == 7
    assert rec.instance["instance_number"] is None  # out of int32: dropped, not a DB error
    assert rec.study["specific_character_set"] == "ISO_IR 100"


def test_message_round_trip_and_refusal() -> None:
    m = InstanceReceived("1.2", "1.3", "1.4", "1.5", TS, 10, "a" * 64, "x.dcm")
    assert InstanceReceived.from_bytes(m.to_bytes()) == m
    for body in (b"\xff", b"[]", b'{"v": 99}', b'{"v": 1, "nope": 1}'):
        with pytest.raises(BadMessage):
            InstanceReceived.from_bytes(body)


def test_the_stored_event_carries_every_field_of_the_received_one() -> None:
    received = InstanceReceived("1.2", "1.3", "1.4", "1.5", TS, 10, "a" * 64, "x.dcm",
                                calling_aet="CT1", peer_host="10.0.0.5",
                                received_at="2026-12-07T06:00:00+00:00")
    stored = received.stored("instances/aa/key.dcm", {"00100010": {"vr": "PN"}})
    assert isinstance(stored, InstanceStored)
    shared = {f.name for f in fields(InstanceStored)} - {"object_key", "header"}
    assert shared <= {f.name for f in fields(InstanceReceived)}
    assert {name: getattr(stored, name) for name in shared} == \
        {name: getattr(received, name) for name in shared}
    assert (stored.object_key, stored.header) == ("instances/aa/key.dcm",
                                                  {"00100010": {"vr": "PN"}})


def test_every_queue_has_a_dead_letter_queue_and_a_limit() -> None:
    for spec in QUEUES:
        args = spec.arguments()
        assert args["x-delivery-limit"] > 0
        assert args["x-dead-letter-routing-key"] == spec.name
        assert spec.dead_letter_queue.endswith(".dead")
