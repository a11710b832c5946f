"""The broker lets a consumer hold a message as long as its work lasts.

RabbitMQ closes the channel of a consumer that holds a message unacknowledged longer than
``consumer_timeout`` (30 minutes by default) and redelivers it, one delivery counted against
the queue's limit. minipacs consumers hold messages for the length of their work: a move job,
a storage or index retry while S3 or PostgreSQL is down. ``deploy/rabbitmq/rabbitmq.conf``
raises the timeout for compose; ``make run`` and ``make test`` give the Debian broker the same
value. Checked on the real broker here (waiting out the timeout itself would take a day).
The plugins compose enables (the dashboard; the shovel behind its *Move messages*, the way
dead letters go back to their work queue) are enabled on the Debian broker too.
"""

from __future__ import annotations

import subprocess

from scripts.native import broker_conf_value, broker_plugins, ensure_rabbitmq

DAY_MS = 24 * 3600 * 1000


def test_the_configured_consumer_timeout_is_at_least_a_day() -> None:
    assert int(broker_conf_value("consumer_timeout")) >= DAY_MS


def test_the_running_broker_has_the_configured_consumer_timeout() -> None:
    ensure_rabbitmq()
    out = subprocess.run(["rabbitmqctl", "-q", "eval",
                          "application:get_env(rabbit, consumer_timeout)."],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert out == f"{{ok,{broker_conf_value('consumer_timeout')}}}", out


def test_the_running_broker_has_the_compose_plugins() -> None:
    assert {"rabbitmq_management", "rabbitmq_shovel_management"} <= set(broker_plugins())
    ensure_rabbitmq()
    out = subprocess.run(["rabbitmq-plugins", "list", "--enabled", "--minimal"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert set(broker_plugins()) <= set(out.split()), out
