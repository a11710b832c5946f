"""The ingest bench's "held open" figure: the whole stack, and the gateway's part of it."""

from __future__ import annotations

from bench.ingest import idle_text


def test_idle_text_names_the_gateways_share() -> None:
    parts = {"gateway": 0.2, "rabbitmq": 1.5, "s3": 0.6, "postgres": 0.04}
    assert idle_text(parts) == "2.3 % of a core (gateway 0.2 %)"


def test_idle_text_of_a_single_process_server() -> None:
    assert idle_text({"orthanc": 0.04}) == "0.0 % of a core"
