"""Scale-out: two storage and two indexer processes on the same queues, as
``docker compose up --scale storage=2 --scale indexer=2`` runs them. The broker shares the
messages out; both indexers write the same patients, studies and series at the same time, and
every instance is still stored once and indexed once, with the right counts."""

from __future__ import annotations

import re
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from scripts.native import Stack
from shared import topology
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import small_set
from tests.e2e.test_ingest import assert_stored_byte_identical, indexed
from tests.helpers import dead_letters, pg, queue_counts, storescu_at_once, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _logged(stack: Stack, name: str, pattern: str) -> bool:
    return re.search(pattern, stack.log_text(name)) is not None


def test_two_storage_and_two_indexer_processes(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, "scale")
    stack.start()
    try:
        extra = [stack.start_service("storage", replica=2),
                 stack.start_service("indexer", replica=2)]
        wait_until(lambda: all(queue_counts(stack.config.vhost, "consumers").get(q.name) == 2
                               for q in (topology.STORAGE, topology.INDEXER)), 60,
                   what="two consumers on the storage and indexer queues")

        # Few patients, many instances each, dealt out to 4 associations in turn: every
        # association carries every series, so both indexers' batches hold the same rows.
        made = small_set(tmp_path / "small", patients=4, studies=2, series=2, per_series=25,
                         tag="scale")
        results = storescu_at_once(stack.config.gateway_port,
                                   [[m.path for m in made[i::4]] for i in range(4)])
        assert sum(r.successes for r in results) == len(made), [r.output[-800:] for r in results]

        studies = sorted({m.study_uid for m in made})
        wait_until(lambda: indexed(stack, studies) == len(made), 180,
                   what="every acknowledged instance indexed")
        assert_stored_byte_identical(stack, made)

        rows = pg(dsn(stack), "SELECT p.patient_id, st.num_series, st.num_instances FROM study "
                  "st JOIN patient p ON p.id = st.patient_fk "
                  "WHERE st.study_instance_uid = ANY($1::text[])", studies)
        assert len(rows) == 8
        assert Counter(r["patient_id"] for r in rows) == {f"SCALE-{p:04d}": 2 for p in range(4)}
        assert all(r["num_series"] == 2 and r["num_instances"] == 50 for r in rows), rows
        series = pg(dsn(stack), "SELECT se.num_instances FROM series se JOIN study st ON st.id "
                    "= se.study_fk WHERE st.study_instance_uid = ANY($1::text[])", studies)
        assert [r["num_instances"] for r in series] == [25] * 16

        # Both processes of each service took part (storage reports its work every 10 s),
        # and none of them dead-lettered anything.
        for name, work in (("indexer", "indexed batch of"), ("indexer-2", "indexed batch of"),
                           ("storage", r"stored \d+ instances"),
                           ("storage-2", r"stored \d+ instances")):
            wait_until(partial(_logged, stack, name, work), 30, what=f"{name} did some work")
        dead = dead_letters(stack.config.vhost)
        assert not any(dead.values()), dead
        for name in ("storage", "indexer", *extra):
            log = stack.log_text(name)
            assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    finally:
        teardown(stack)
