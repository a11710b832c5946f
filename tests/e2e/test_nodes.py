"""Remote nodes changed at run time with ``python -m services.nodes``, as an admin would: the
running gateway (allow-list on) admits a new modality, moves and sends to it, applies its
permissions and forgets it, with no restart; DCMTK's tools on the other side. The session's
stack (``tests/conftest.py``): the node this adds is removed by the test itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.native import ROOT, Stack, free_port, port_open
from tests.conftest import TEST_NODES
from tests.dicomgen import ct_series
from tests.e2e.test_move import final_has, indexed, movescu
from tests.helpers import StoreResult, dcmtk, dcmtk_env, storescu, wait_until

pytestmark = pytest.mark.e2e


def nodes_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.nodes", *args], cwd=ROOT,
                          env=stack.service_env(), capture_output=True, text=True, timeout=60)


def echo(stack: Stack, aet: str) -> bool:
    proc = subprocess.run([dcmtk("echoscu"), "-aet", aet, "-aec", "MINIPACS", "127.0.0.1",
                           str(stack.config.gateway_port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=60)
    return proc.returncode == 0


def gateway_log(stack: Stack) -> str:
    return (Path(stack.config.base_dir) / "gateway.log").read_text(errors="replace")


def test_a_node_added_at_run_time_is_admitted_moved_to_and_removed_without_a_restart(
        stack: Stack, tmp_path: Path) -> None:
    gateway = stack.procs["gateway"].pid
    port = stack.config.gateway_port
    assert not echo(stack, "NEWMOD"), "an unknown calling AE title must be rejected"
    series = ct_series(tmp_path / "sent", count=3, tag="nodes-runtime", size=64)

    scp_port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "NEWMOD", "-od", str(out),
                            str(scp_port)], env=dcmtk_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(scp_port), 30, what="storescp listening")
        added = nodes_cli(stack, "put", "newmod", json.dumps(["NEWMOD", "127.0.0.1", scp_port]))
        assert added.returncode == 0, added.stderr
        assert f"added node newmod: NEWMOD@127.0.0.1:{scp_port}" in added.stdout

        wait_until(lambda: echo(stack, "NEWMOD"), 30, what="the new node admitted")
        reached = nodes_cli(stack, "echo", "newmod")  # minipacs -> the node, as Orthanc's
        assert reached.returncode == 0, reached.stderr
        assert f"node newmod (NEWMOD@127.0.0.1:{scp_port}): C-ECHO Success" in reached.stdout
        sent = storescu(port, [m.path for m in series], aet="NEWMOD")
        assert sent.successes == 3, sent.output
        wait_until(lambda: indexed(stack, [m.sop_uid for m in series]) == 3, 60,
                   what="the series indexed")
        moved = movescu(port, {"QueryRetrieveLevel": "STUDY",
                               "StudyInstanceUID": series[0].study_uid}, dest="NEWMOD")
        assert final_has(moved, "0000"), moved.output
        assert len(list(out.iterdir())) == 3

        # Orthanc's "send to modality": a move job without a C-MOVE, from the command line
        for f in out.iterdir():
            f.unlink()
        study = series[0].study_uid
        pushed = nodes_cli(stack, "send", "newmod", study)
        assert pushed.returncode == 0, pushed.stderr
        assert f"study {study} -> newmod: done: 3 of 3 sent, 0 failed" in pushed.stdout
        assert {p.name.split(".", 1)[1] for p in out.iterdir()} == {m.sop_uid for m in series}
        # no mover running: said so, and the job waits on its queue for the next mover
        stack.kill("mover", signal.SIGTERM)
        try:
            for f in out.iterdir():
                f.unlink()
            queued = nodes_cli(stack, "send", "newmod", study, "--timeout", "2")
            assert queued.returncode == 1, queued.stdout
            assert "no mover took job" in queued.stderr and "stays queued" in queued.stderr
            assert not list(out.iterdir())
        finally:
            stack.start_service("mover")
        wait_until(lambda: len(list(out.iterdir())) == 3, 60,
                   what="the queued job run by the next mover")
        unknown = nodes_cli(stack, "send", "newmod", "1.2.3.999")
        assert unknown.returncode == 1 and "not in the index: study 1.2.3.999" in unknown.stderr
        hostile = nodes_cli(stack, "send", "newmod", "../../etc")
        assert hostile.returncode == 2 and "Study Instance UID" in hostile.stderr

        # Orthanc's "AllowStore": false, set at run time: echo still, store no more
        changed = nodes_cli(stack, "put", "newmod", json.dumps(
            {"AET": "NEWMOD", "Host": "127.0.0.1", "Port": scp_port, "AllowStore": False}))
        assert changed.returncode == 0, changed.stderr
        assert "changed node newmod" in changed.stdout
        more = ct_series(tmp_path / "more", count=1, tag="nodes-refused", size=64)

        def store_refused() -> StoreResult | None:
            result = storescu(port, [more[0].path], aet="NEWMOD")
            return result if result.failures == 1 else None

        refused = wait_until(store_refused, 30, what="the store permission withdrawn")
        assert refused is not None
        assert "Store Response (Unknown Status: 0x124)" in refused.output, refused.output
        assert echo(stack, "NEWMOD")
    finally:
        scp.terminate()
        scp.wait(30)

    unreachable = nodes_cli(stack, "echo", "newmod", "--timeout", "5")
    assert unreachable.returncode == 1
    assert "node newmod" in unreachable.stderr and "no association" in unreachable.stderr

    deleted = nodes_cli(stack, "delete", "newmod")
    assert deleted.returncode == 0, deleted.stderr
    wait_until(lambda: not echo(stack, "NEWMOD"), 30, what="the removed node rejected")
    gone = movescu(port, {"QueryRetrieveLevel": "STUDY",
                          "StudyInstanceUID": series[0].study_uid}, dest="NEWMOD")
    assert final_has(gone, "a801"), gone.output  # unknown destination, as before it was added
    assert indexed(stack, [more[0].sop_uid]) == 0

    assert stack.procs["gateway"].pid == gateway and stack.procs["gateway"].poll() is None
    log = gateway_log(stack)
    assert "remote nodes now: " in log and f"newmod=NEWMOD@127.0.0.1:{scp_port}" in log


def test_nodes_from_the_settings_are_listed_and_left_to_the_settings(stack: Stack) -> None:
    listed = nodes_cli(stack, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(TEST_NODES) <= set(rows)
    assert rows["readonly"].split()[1:] == ["READONLY", "127.0.0.1", "104", "echo,find",
                                             "MINIPACS_NODES"]
    as_json = nodes_cli(stack, "list", "--json")
    assert json.loads(as_json.stdout)["readonly"]["AllowStore"] is False

    for args in (("delete", "storescu"), ("put", "storescu", '["EVIL", "10.9.9.9", 104]')):
        refused = nodes_cli(stack, *args)
        assert refused.returncode == 1
        assert "comes from MINIPACS_NODES" in refused.stderr
    malformed = nodes_cli(stack, "put", "x", '["X", "127.0.0.1"]')
    assert malformed.returncode == 2 and "expected [AET, host, port]" in malformed.stderr
    assert nodes_cli(stack, "delete", "nobody").returncode == 1
    assert echo(stack, "STORESCU")
