from __future__ import annotations

import pytest

from scripts.native import port_from_env
from services.gateway import statuses
from services.gateway.admission import (
    REJECT_CALLED_AET,
    REJECT_CALLING_AET,
    REJECT_NO_CONTEXT,
    admit,
    permitted,
)
from services.storage.worker import unconfirmed_age
from shared.keys import InvalidUID, is_strict_uid, object_key, validate_uid
from shared.lifecycle import EX_CONFIG, settings_or_exit
from shared.settings import GatewaySettings, SettingsError, StorageSettings, parse_nodes


def test_nodes_accept_both_orthanc_forms() -> None:
    nodes = parse_nodes('{"archive": ["ARCHIVE", "127.0.0.1", 4242],'
                        ' "ct": {"AET": "CT1", "Host": "ct.local", "Port": 104,'
                        ' "AllowMove": false}}')
    assert nodes["archive"].aet == "ARCHIVE" and nodes["archive"].port == 4242
    assert nodes["ct"].may("store") and not nodes["ct"].may("move")


@pytest.mark.parametrize("raw", ['[1,2]', '{"x": ["A", "h"]}', '{"x": ["A", "h", 70000]}',
                                 '{"x": ["A\\\\B", "h", 1]}', "not json"])
def test_bad_nodes_are_refused_with_a_reason(raw: str) -> None:
    with pytest.raises(SettingsError):
        parse_nodes(raw)


def test_settings_from_env_types_and_masking() -> None:
    s = GatewaySettings.from_env({"MINIPACS_GATEWAY_PORT": "4000", "MINIPACS_ALLOW_LIST": "yes",
                                  "MINIPACS_AMQP_URL": "amqp://u:pw@h/",
                                  "MINIPACS_NODES": '{"a": ["A", "h", 1]}'})
    assert s.gateway_port == 4000 and s.allow_list is True and "a" in s.nodes
    masked = s.masked()
    assert "pw" not in str(masked) and masked["s3_secret_key"] == "***"
    with pytest.raises(SettingsError):
        GatewaySettings.from_env({"MINIPACS_GATEWAY_PORT": "eleven"})
    assert GatewaySettings.from_env({"MINIPACS_GATEWAY_PROCESSES": "4"}).gateway_processes == 4
    with pytest.raises(SettingsError, match="GATEWAY_PROCESSES must be 1 or more"):
        GatewaySettings.from_env({"MINIPACS_GATEWAY_PROCESSES": "0"})
    assert GatewaySettings.from_env({"MINIPACS_MAX_PDU": "128"}).max_pdu == 128
    for bad in ("0", "-1", str(64 * 1024 * 1024 + 1)):  # 0 would offer peers "unlimited"
        with pytest.raises(SettingsError, match="MAX_PDU must be from 1 to 67108864 bytes"):
            GatewaySettings.from_env({"MINIPACS_MAX_PDU": bad})


@pytest.mark.parametrize("uid", ["../../etc/x", "1.2/3", "1.2\\3", "1.2\x003", "", "1..2",
                                 "1." + "2" * 64, "1.2.a", "1.2.3\n", "1.2.3\r\n"])
def test_bad_uids_are_refused(uid: str) -> None:
    with pytest.raises(InvalidUID):
        validate_uid(uid)


def test_good_uid_and_content_addressed_key() -> None:
    assert validate_uid("1.2.840.10008.1.2\x00") == "1.2.840.10008.1.2"
    key = object_key("ab" * 32)
    assert key == f"instances/ab/{'ab' * 32}.dcm"
    with pytest.raises(ValueError):
        object_key("../../x")
    with pytest.raises(ValueError):  # '$' in a pattern would let a trailing newline through
        object_key("ab" * 32 + "\n")
    assert not is_strict_uid("1.2.3\n")


def _admit(calling: str, called: str = "MINIPACS", host: str = "127.0.0.1",
           allow_list: bool = True, proposed: int = 1) -> tuple[bool, tuple[int, int, int]]:
    nodes = parse_nodes('{"m": ["MOD", "127.0.0.1", 104], "far": ["FAR", "10.9.9.9", 104],'
                        ' "any": ["ANY", "*", 104]}')
    d = admit(calling, called, host, "MINIPACS", True, allow_list, True, nodes,
              proposed=proposed)
    return d.accept, d.reject


def test_admission() -> None:
    assert _admit("MOD")[0]
    assert _admit("ANY", host="127.0.0.9")[0]
    assert _admit("MOD", called="OTHER") == (False, REJECT_CALLED_AET)
    assert _admit("NOBODY") == (False, REJECT_CALLING_AET)
    assert _admit("FAR") == (False, REJECT_CALLING_AET)
    assert _admit("NOBODY", allow_list=False)[0]
    # an A-ASSOCIATE-RQ proposing no presentation context, whoever sends it
    assert _admit("MOD", proposed=0) == (False, REJECT_NO_CONTEXT)
    assert _admit("NOBODY", allow_list=False, proposed=0) == (False, REJECT_NO_CONTEXT)


def test_per_operation_permissions() -> None:
    nodes = parse_nodes('{"ro": {"AET": "RO", "Host": "127.0.0.1", "Port": 1, '
                        '"AllowStore": false}, "far": ["FAR", "10.9.9.9", 104]}')
    assert permitted("find", "RO", "127.0.0.1", True, True, nodes)
    assert not permitted("store", "RO", "127.0.0.1", True, True, nodes)
    assert not permitted("find", "FAR", "127.0.0.1", True, True, nodes)
    assert not permitted("echo", "NOBODY", "127.0.0.1", True, True, nodes)
    assert permitted("store", "RO", "127.0.0.1", False, True, nodes)  # allow-list off


def test_statuses_are_named() -> None:
    assert statuses.describe(statuses.OUT_OF_RESOURCES) == "0xA700 out of resources"
    assert statuses.FOR_INVALID_INSTANCE["mismatch"] == statuses.DATASET_DOES_NOT_MATCH


def test_unconfirmed_files_are_announced_again_after_minutes_not_the_staging_hour() -> None:
    """A ready file whose publish was never answered waits ``MINIPACS_UNCONFIRMED_AFTER``
    (default 5 minutes), not the hour after which cut-off transfers are swept, and never less
    than twice the confirm timeout a live gateway may still be waiting out."""
    default = StorageSettings.from_env({})
    assert default.sweep_after == 3600.0
    assert unconfirmed_age(default) == 300.0
    assert unconfirmed_age(StorageSettings.from_env({"MINIPACS_UNCONFIRMED_AFTER": "2",
                                                     "MINIPACS_CONFIRM_TIMEOUT": "3"})) == 6.0
    assert unconfirmed_age(StorageSettings.from_env({"MINIPACS_UNCONFIRMED_AFTER": "60"})) == 60.0


def test_stored_events_wait_20_ms_for_company_unless_told_otherwise() -> None:
    """``MINIPACS_STORED_LINGER_MS`` (README), in milliseconds like the gateway's linger."""
    assert StorageSettings.from_env({}).stored_linger_ms == 20.0
    assert StorageSettings.from_env({"MINIPACS_STORED_LINGER_MS": "0"}).stored_linger_ms == 0.0
    assert StorageSettings.from_env({"MINIPACS_STORED_LINGER_MS": "50"}).stored_linger_ms == 50.0


def test_a_bad_setting_exits_with_one_line_and_ex_config(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MINIPACS_GATEWAY_PORT", "eleven")
    with pytest.raises(SystemExit) as exited:
        settings_or_exit(GatewaySettings, "gateway")
    assert exited.value.code == EX_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("gateway: configuration error: MINIPACS_GATEWAY_PORT='eleven'"), err
    assert err.count("\n") == 1, err
    monkeypatch.setenv("MINIPACS_GATEWAY_PORT", "11112")
    assert settings_or_exit(GatewaySettings, "gateway").gateway_port == 11112


@pytest.mark.parametrize("raw", ["", "abc", "0", "65536", "-1", " 1"])
def test_native_runner_refuses_a_port_that_is_not_one(raw: str) -> None:
    with pytest.raises(ValueError, match="MINIPACS_GATEWAY_PORT"):
        port_from_env({"MINIPACS_GATEWAY_PORT": raw}, "MINIPACS_GATEWAY_PORT", 11112)
    assert port_from_env({}, "MINIPACS_GATEWAY_PORT", 11112) == 11112


def test_a_log_level_typo_is_refused_and_any_case_is_taken() -> None:
    with pytest.raises(SettingsError, match="MINIPACS_LOG_LEVEL='TRAC'"):
        StorageSettings.from_env({"MINIPACS_LOG_LEVEL": "TRAC"})
    for level in ("trace", "Debug", "INFO", "warning"):
        assert GatewaySettings.from_env({"MINIPACS_LOG_LEVEL": level}).log_level == level
