"""The pure parts of ``python -m services.conflicts``: values as text, header differences."""

from __future__ import annotations

from datetime import UTC, datetime

from services.conflicts.cli import Difference, header_differences, listing, render, report


def test_values_as_text() -> None:
    assert render(None) == "(absent)"
    assert render({"vr": "LO"}) == "(empty)"
    assert render({"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]}) == "Doe^J"
    assert render({"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]}) == "ORIGINAL\\PRIMARY"
    assert render({"vr": "US", "Value": [512]}) == "512"
    assert render({"vr": "OB", "BulkDataURI": ""}) == "(OB binary)"
    assert render({"vr": "OW", "InlineBinary": "AAA="}) == "(OW binary)"
    assert render({"vr": "SQ", "Value": [{}, {}]}) == "(2 items)"
    assert render({"vr": "SQ", "Value": [{}]}) == "(1 item)"


def test_differences_in_tag_order_with_absent_elements() -> None:
    kept = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A^B"}]},
            "00080050": {"vr": "SH", "Value": ["1"]},
            "00200013": {"vr": "IS", "Value": [1]},
            "00081140": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2"]}}]}}
    other = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A^C"}]},
             "00080050": {"vr": "SH", "Value": ["1"]},
             "00081030": {"vr": "LO", "Value": ["new"]},
             "00081140": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.3"]}}]}}
    found = header_differences(kept, other)
    assert [(d.label, d.keyword, d.kept, d.other) for d in found] == [
        ("(0008,1030)", "StudyDescription", "(absent)", "new"),
        ("(0008,1140)", "ReferencedImageSequence", "(1 item)", "(1 item)"),
        ("(0010,0010)", "PatientName", "A^B", "A^C"),
        ("(0020,0013)", "InstanceNumber", "1", "(absent)")]
    assert header_differences(kept, dict(kept)) == []
    assert Difference("00091001", "x", "y").keyword == "?"  # a private tag


def test_list_and_show_text() -> None:
    row = {"id": 7, "recorded_at": datetime(2026, 12, 7, 17, 0, 5, tzinfo=UTC),
           "received_at": datetime(2026, 12, 7, 17, 0, 4, tzinfo=UTC), "calling_aet": "CT01",
           "policy": "keep-first", "sop_instance_uid": "1.2.3", "kept_sha256": "a" * 64,
           "rejected_sha256": "b" * 64, "rejected_key": "instances/bb/" + "b" * 64 + ".dcm"}
    lines = listing([row]).splitlines()
    assert lines[0].split() == ["ID", "RECORDED", "(UTC)", "FROM", "POLICY", "SOP", "INSTANCE",
                                "UID", "INDEXED", "OTHER"]
    assert lines[1].split() == ["7", "2026-12-07", "17:00:05", "CT01", "keep-first", "1.2.3",
                                "a" * 12, "b" * 12]
    text = report(row, [])
    assert "received 2026-12-07 17:00:04 UTC from CT01" in text
    assert "the copy received first (keep-first)" in text
    assert "The headers are the same" in text
    shown = report({**row, "policy": "overwrite"}, [Difference("00100010", "A", "B")])
    assert "the copy received last (overwrite)" in shown
    assert shown.splitlines()[-1].split() == ["(0010,0010)", "PatientName", "A", "B"]
