"""The broker lets a consumer hold a message as long as its work lasts.

RabbitMQ closes the channel of a consumer that holds a message unacknowledged longer than
``consumer_timeout`` (30 minutes by default) and redelivers it, one delivery counted against
the queue's limit. minipacs consumers hold messages for the length of their work: a move job,
a storage or index retry while S3 or PostgreSQL is down. ``deploy/rabbitmq/rabbitmq.conf``
raises the timeout for compose; ``make run`` and ``make test`` give the Debian broker the same
value, on the running node and in a drop-in file read at its next start. Checked on the real
broker here, restarted (waiting out the timeout itself would take a day).
The plugins compose enables (the dashboard; the shovel behind its *Move messages*, the way
dead letters go back to their work queue) are enabled on the Debian broker too.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scripts.native import (
    DEBIAN_BROKER_CONF,
    broker_conf_value,
    broker_plugins,
    ensure_rabbitmq,
    native_broker_conf,
    persist_broker_conf,
    port_open,
    wait_for,
)

DAY_MS = 24 * 3600 * 1000


def test_the_configured_consumer_timeout_is_at_least_a_day() -> None:
    assert int(broker_conf_value("consumer_timeout")) >= DAY_MS


def test_the_running_broker_has_the_configured_consumer_timeout() -> None:
    ensure_rabbitmq()
    out = broker_value("consumer_timeout")
    assert out == f"{{ok,{broker_conf_value('consumer_timeout')}}}", out


def test_the_running_broker_has_the_compose_plugins() -> None:
    assert {"rabbitmq_management", "rabbitmq_shovel_management"} <= set(broker_plugins())
    ensure_rabbitmq()
    out = subprocess.run(["rabbitmq-plugins", "list", "--enabled", "--minimal"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert set(broker_plugins()) <= set(out.split()), out


def broker_value(key: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", "eval", f"application:get_env(rabbit, {key})."],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def test_the_drop_in_file_is_written_once_and_a_failure_to_write_it_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "conf.d" / "90-minipacs.conf"
    assert persist_broker_conf(path)
    assert path.read_text() == native_broker_conf()
    assert f"consumer_timeout = {broker_conf_value('consumer_timeout')}\n" in path.read_text()
    os.utime(path, (0, 0))
    assert persist_broker_conf(path)
    assert path.stat().st_mtime == 0  # unchanged: not written again
    path.write_text("consumer_timeout = 1000\n")
    assert persist_broker_conf(path)
    assert path.read_text() == native_broker_conf()  # a stale value is replaced

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert not persist_broker_conf(blocked / "conf.d" / "90-minipacs.conf")
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.slow
def test_the_consumer_timeout_outlives_a_restart_of_the_broker() -> None:
    """Before, ``make run`` set it on the running node only: a broker restarted by hand (a
    package upgrade, ``service rabbitmq-server restart``) went back to 30 minutes while the
    stack ran on."""
    ensure_rabbitmq()
    assert DEBIAN_BROKER_CONF.read_text() == native_broker_conf()
    subprocess.run(["rabbitmqctl", "-q", "stop"], check=True, timeout=120)
    try:
        wait_for("the broker to stop", lambda: not port_open(5672), 60)
    finally:
        subprocess.run(["rabbitmq-server", "-detached"], check=True, timeout=60)
        # as found: AMQP and the dashboard up again, for whatever runs next
        wait_for("AMQP on :5672", lambda: port_open(5672), 120, 0.5)
        wait_for("the dashboard on :15672", lambda: port_open(15672), 120, 0.5)
    assert broker_value("consumer_timeout") == f"{{ok,{broker_conf_value('consumer_timeout')}}}"
