"""Invariant 8: every service reports health and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.native import ROOT, Stack
from tests.conftest import make_stack, teardown
from tests.helpers import dcmtk, dcmtk_env

pytestmark = pytest.mark.e2e


def test_health_commands_and_clean_stop_on_sigterm(tmp_path: Path) -> None:
    # ACSE timeout longer than the stop deadline below: a gateway that waited for the silent
    # probe connection to time out would miss it.
    stack = make_stack(tmp_path, "life", MINIPACS_ACSE_TIMEOUT="120")
    stack.start()
    try:
        _check_and_stop(stack)
    finally:
        teardown(stack)


def _check_and_stop(stack: Stack) -> None:
    for name in ("gateway", "storage", "indexer", "mover"):
        env = {**stack.env, "MINIPACS_HEARTBEAT_FILE": stack.heartbeat_file(name)}
        check = subprocess.run([sys.executable, "-m", f"services.{name}", "--check"], env=env,
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, (name, check.stdout)
    # an open connection that never associates must not hold the gateway's stop up
    probe = socket.create_connection(("127.0.0.1", stack.config.gateway_port))
    try:
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "MINIPACS", "127.0.0.1",
                               str(stack.config.gateway_port)], env=dcmtk_env(), timeout=60)
        assert echo.returncode == 0
        for name in ("gateway", "storage", "indexer", "mover"):
            proc = stack.procs.pop(name)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, name  # a deadline, not a speed check
            assert f"{name} stopped" in stack.log_text(name), name
    finally:
        probe.close()


@pytest.mark.parametrize("service", ["gateway", "storage"])
def test_an_unusable_spool_stops_the_service_with_one_line(tmp_path: Path, service: str) -> None:
    """Before it connects to anything: exit 1 and an ERROR line naming the spool, no
    traceback (a spool the gateway cannot write would otherwise fail every C-STORE)."""
    afile = tmp_path / "not-a-directory"
    afile.write_text("x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIPACS_")}
    env["MINIPACS_SPOOL_DIR"] = str(afile / "spool")
    done = subprocess.run([sys.executable, "-m", f"services.{service}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"the spool directory {afile / 'spool'} is not usable" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
