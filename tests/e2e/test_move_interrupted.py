"""C-MOVE jobs whose mover is interrupted without being killed: told to stop mid-job (compose
stop, a rolling restart), or cut off from PostgreSQL mid-job. Reproducers of two bugs: a mover
stopped after its grace cancelled its running jobs (0xFE00 to a requester that never sent
C-CANCEL); a failed write of a job's counts ended its progress reports (the requester heard
nothing more, and the job was sent a second time)."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from scripts.native import Stack, free_port, free_port_block
from tests.conftest import dsn, make_stack, teardown
from tests.dicomgen import Made, ct_series
from tests.e2e.test_move import (
    MoveResult,
    SlowDestination,
    final_has,
    indexed,
    movescu_in_background,
    parse_move_output,
)
from tests.helpers import pg, storescu, wait_until
from tests.proxy import CuttableProxy

pytestmark = pytest.mark.e2e


@dataclass
class Rig:
    stack: Stack
    proxy: CuttableProxy  # between the mover (only) and PostgreSQL
    series: list[Made]

    def mover_log(self, since: int = 0) -> str:
        return self.stack.log_text("mover")[since:]


def consuming(stack: Stack, since: int) -> Callable[[], bool]:
    return lambda: "consuming" in stack.log_text("mover")[since:]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("move-interrupted")
    # keep-alive every second: a progress message (and a write of the counts) each second
    stack = make_stack(tmp, "mvint", MINIPACS_MOVE_IDLE_TIMEOUT="20",
                       MINIPACS_STOP_GRACE="1", MINIPACS_KEEPALIVE_EVERY="1")
    proxy = CuttableProxy(5432, free_port_block(1)).start()
    try:
        stack.start()
        # the mover, and no other service, reaches PostgreSQL through the proxy
        before = len(stack.log_text("mover"))
        stack.kill("mover", signal.SIGTERM)
        stack.env["MINIPACS_DATABASE_URL"] = (
            f"postgresql://minipacs@127.0.0.1:{proxy.port}/{stack.config.database}")
        stack.start_service("mover")
        wait_until(consuming(stack, before), 60, what="the mover up behind the proxy")
        series = ct_series(tmp / "ct", count=24, tag="mvint", size=64)
        sent = storescu(stack.config.gateway_port, [m.path for m in series])
        assert sent.successes == len(series), sent.output
        wait_until(lambda: indexed(stack, [m.sop_uid for m in series]) == len(series), 60,
                   what="the series indexed")
        yield Rig(stack, proxy, series)
    finally:
        teardown(stack)
        proxy.close()


def slow_destination(rig: Rig, hold_from: int) -> SlowDestination:
    dest = SlowDestination(free_port(), threading.Event(), [], hold_from).start()
    pg(dsn(rig.stack), "INSERT INTO remote_node (name, aet, host, port) VALUES "
       "('slow', 'SLOWDEST', '127.0.0.1', $1) ON CONFLICT (name) DO UPDATE SET port = $1",
       dest.port)
    return dest


def move_series(rig: Rig) -> Any:
    return movescu_in_background(rig.stack.config.gateway_port, {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": rig.series[0].study_uid,
        "SeriesInstanceUID": rig.series[0].series_uid}, "SLOWDEST")


def last_job(rig: Rig) -> dict[str, Any]:
    return dict(pg(dsn(rig.stack), "SELECT * FROM move_job WHERE requested_by_aet = 'MOVESCU' "
                   "ORDER BY started_at DESC LIMIT 1")[0])


def assert_whole_series_moved(rig: Rig, result: MoveResult) -> None:
    """Success for every instance, and never a Cancel; the job row says done."""
    n = len(rig.series)
    assert final_has(result, "0000"), result.output[-3000:]
    assert re.search(rf"Completed Suboperations\s*:\s*{n}\b", result.final), result.final
    assert not re.search(r"DIMSE Status\s*:\s*0xfe00", result.output, re.I), result.output
    row = last_job(rig)
    assert (row["state"], row["completed"], row["failed"]) == ("done", n, 0), row


def test_a_mover_stopped_mid_job_hands_it_back_and_the_next_mover_resumes_it(rig: Rig) -> None:
    """RELIABILITY: a rolling restart. The mover gets SIGTERM while the destination holds its
    C-STOREs; after its grace (1 s here) it stops the job after the instances in flight, leaves
    the job row running and the message in its queue, and exits. The requester, who never sent
    C-CANCEL, gets no Cancel: the next mover resumes the job and movescu gets Success for the
    whole series."""
    dest = slow_destination(rig, hold_from=5)
    start = len(rig.mover_log())
    try:
        proc = move_series(rig)
        wait_until(lambda: dest.held > 0, 60, every=0.05, what="a C-STORE held")
        job = str(last_job(rig)["id"])[:8]
        mover = rig.stack.procs.pop("mover")
        mover.send_signal(signal.SIGTERM)
        wait_until(lambda: "handing back" in rig.mover_log(start), 30,
                   what="the mover's grace over")
        dest.release.set()  # the instances in flight are answered; no more are sent
        assert mover.wait(60) == 0
        stopped = rig.mover_log(start)
        assert f"job={job} back to the queue: this mover is stopping" in stopped, stopped
        assert "canceled" not in stopped and "Traceback" not in stopped, stopped
        row = last_job(rig)
        assert row["state"] == "running" and row["finished_at"] is None, row
        assert 0 < row["completed"] < len(rig.series), row  # its counts brought up to date
        rig.stack.start_service("mover")
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.stop()
        if "mover" not in rig.stack.procs:
            rig.stack.start_service("mover")
    assert_whole_series_moved(rig, parse_move_output(proc.returncode, output))
    assert {m.sop_uid for m in rig.series} <= set(dest.received)
    assert f"job={job} resumed" in rig.mover_log(start)


def test_postgresql_lost_mid_job_costs_neither_progress_nor_a_second_run(rig: Rig) -> None:
    """RELIABILITY: PostgreSQL unreachable from the mover (restarted, connection lost) while
    a job runs. Each write of the job's counts fails, is logged and skipped; the progress
    messages go on (movescu hears one a second); once PostgreSQL is back the job ends and is
    recorded done, each instance sent once: the job was not run a second time."""
    n = len(rig.series)
    dest = slow_destination(rig, hold_from=1)  # nothing is answered until the release
    start = len(rig.mover_log())
    try:
        proc = move_series(rig)
        wait_until(lambda: dest.held > 0, 60, every=0.05, what="a C-STORE held")
        rig.proxy.cut()
        try:
            wait_until(lambda: rig.mover_log(start).count("progress not recorded") >= 3, 60,
                       what="three writes of the job's counts failed")
        finally:
            rig.proxy.restore()
        dest.release.set()
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.stop()
    log = rig.mover_log(start)
    result = parse_move_output(proc.returncode, output)
    assert_whole_series_moved(rig, result)
    # every failed write came after a progress message, relayed as a pending response
    failed_writes = log.count("progress not recorded")
    assert result.pending.count((n, 0, 0, 0)) >= failed_writes, (result.pending, log)
    assert sorted(dest.received) == sorted(m.sop_uid for m in rig.series)  # each one once
    assert "could not run" not in log and "resumed" not in log, log
    assert not re.search(r"ERROR\s+mover minipacs", log), log
    warning = next(line for line in log.splitlines() if "progress not recorded" in line)
    assert "WARNING" in warning and "sending goes on" in warning, warning
    assert "MVINT-PAT" not in log and "CT^PATIENT" not in log  # no patient identifiers

