"""``python -m services.nodes``: the pure parts (what a command line asks for, what it prints)."""

from __future__ import annotations

import json

import pytest

from services.nodes.cli import (
    ORDER,
    Usage,
    as_modalities,
    c_echo,
    node_from,
    outcome,
    study_job,
    table,
)
from shared.settings import OPERATIONS, Node, SettingsError, parse_nodes


def test_put_takes_both_of_orthancs_forms() -> None:
    assert node_from("archive", '["ARCHIVE", "10.0.0.9", 4242]') == Node(
        "archive", "ARCHIVE", "10.0.0.9", 4242, OPERATIONS)
    ct = node_from("ct-1", '{"AET": "CT1", "Host": "ct.local", "Port": "104", '
                           '"AllowMove": false, "AllowGet": false}')
    assert ct == Node("ct-1", "CT1", "ct.local", 104, frozenset({"echo", "store", "find"}))


@pytest.mark.parametrize(("name", "spec", "says"), [
    ("archive", "[ARCHIVE, 1.2.3.4, 104]", "not JSON"),
    ("archive", '["ARCHIVE", "10.0.0.9"]', "expected [AET, host, port]"),
    ("archive", '["ARCHIVE", "10.0.0.9", 0]', "out of range"),
    ("archive", '["ARCHIVE", "10.0.0.9", "x"]', "not a number"),
    ("archive", '["AN AE TITLE TOO LONG", "10.0.0.9", 104]', "invalid AE title"),
    ("archive", '["BACK\\\\SLASH", "10.0.0.9", 104]', "invalid AE title"),
    ("archive", '["ARCHIVE", "", 104]', "host"),
    ("archive", '["ARCHIVE", "a host; rm -rf /", 104]', "host"),
    ("../x", '["ARCHIVE", "10.0.0.9", 104]', "node name"),
    ("", '["ARCHIVE", "10.0.0.9", 104]', "node name"),
    ("n" * 65, '["ARCHIVE", "10.0.0.9", 104]', "node name"),
])
def test_put_refuses_a_malformed_node_saying_why(name: str, spec: str, says: str) -> None:
    with pytest.raises(Usage, match=says.replace("[", r"\[")):
        node_from(name, spec)


def test_minipacs_nodes_refuses_a_host_that_is_not_one() -> None:
    with pytest.raises(SettingsError, match="host"):
        parse_nodes('{"a": ["A", "two words", 104]}')
    assert parse_nodes('{"a": ["A", " * ", 104], "b": ["B", "::1", 104]}')["a"].host == "*"


def test_list_json_reads_back_as_the_same_nodes() -> None:
    found = {"archive": Node("archive", "ARCHIVE", "10.0.0.9", 4242, OPERATIONS),
             "ro": Node("ro", "RO", "*", 104, frozenset({"echo", "find"}))}
    again = parse_nodes(json.dumps(as_modalities(found)))
    assert again == found
    assert as_modalities(found)["ro"]["AllowStore"] is False


def test_list_is_one_aligned_row_per_node_with_its_origin() -> None:
    found = {"archive": Node("archive", "ARCHIVE", "10.0.0.9", 4242, OPERATIONS),
             "ro": Node("ro", "RO", "*", 104, frozenset({"echo", "find"}))}
    lines = table(found, {"archive": "settings", "ro": "api"}).splitlines()
    assert lines[0].split() == ["NAME", "AET", "HOST", "PORT", "ALLOWS", "FROM"]
    assert lines[1].split() == ["archive", "ARCHIVE", "10.0.0.9", "4242",
                                "echo,store,find,move,get", "MINIPACS_NODES"]
    assert lines[2].split() == ["ro", "RO", "*", "104", "echo,find", "run", "time"]
    assert len({line.index("AET") if i == 0 else line.index(v) for i, (line, v) in
                enumerate(zip(lines, ["", "ARCHIVE", "RO"], strict=True))}) == 1


def test_every_operation_is_listed() -> None:
    assert set(ORDER) == OPERATIONS


def test_echo_does_not_call_a_node_whose_host_is_any() -> None:
    problem = c_echo(Node("any", "ANY", "*", 104, OPERATIONS), "MINIPACS", 1.0)
    assert problem is not None and "no address" in problem


def test_send_asks_the_mover_for_one_whole_study() -> None:
    job = study_job("1.2.3.4", "archive")
    assert (job.level, job.destination, job.origin) == ("STUDY", "archive", "api")
    assert job.identifier == {"0020000D": {"vr": "UI", "Value": ["1.2.3.4"]}}
    assert job.job_id != study_job("1.2.3.4", "archive").job_id


def test_a_finished_job_in_words() -> None:
    row = {"state": "failed", "total": 3, "completed": 1, "failed": 2, "warning": 0,
           "error": "association rejected"}
    assert outcome(row) == ("failed: 1 of 3 sent, 2 failed, 0 with a warning "
                            "(association rejected)")
