"""C-MOVE jobs whose mover is interrupted: told to stop mid-job (compose stop, a rolling
restart), cut off from PostgreSQL before, during or at the end of a job, or killed mid-job.
Reproducers of five bugs: a mover stopped after its grace cancelled its running jobs (0xFE00
to a requester that never sent C-CANCEL); a failed write of a job's counts ended its progress
reports (the requester heard nothing more, and the job was sent a second time); a job that
PostgreSQL refused to start (unreachable) went back to the queue each second, a delivery each
time, and was dead-lettered within seconds (0xA702); a job whose end could not be recorded
was sent a second time; a mover killed mid-job left its temp files for ever."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.native import Stack, free_port, free_port_block
from shared import topology
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
from tests.helpers import pg, queue_counts, storescu, wait_until
from tests.proxy import CuttableProxy

pytestmark = pytest.mark.e2e


@dataclass
class Rig:
    stack: Stack
    proxy: CuttableProxy  # between the mover (only) and PostgreSQL
    series: list[Made]
    tmp: Path

    def mover_log(self, since: int = 0) -> str:
        return self.stack.log_text("mover")[since:]


def consuming(stack: Stack, since: int) -> Callable[[], bool]:
    return lambda: "consuming" in stack.log_text("mover")[since:]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("move-interrupted")
    # keep-alive every second: a progress message (and a write of the counts) each second;
    # no hot cache: instances over 4 MiB wait for their C-STORE in the mover's temp files
    stack = make_stack(tmp, "mvint", MINIPACS_MOVE_IDLE_TIMEOUT="20",
                       MINIPACS_STOP_GRACE="1", MINIPACS_KEEPALIVE_EVERY="1",
                       MINIPACS_CACHE_MB="0")
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
        yield Rig(stack, proxy, series, tmp)
    finally:
        teardown(stack)
        proxy.close()


def slow_destination(rig: Rig, hold_from: int) -> SlowDestination:
    dest = SlowDestination(free_port(), threading.Event(), [], hold_from).start()
    pg(dsn(rig.stack), "INSERT INTO remote_node (name, aet, host, port) VALUES "
       "('slow', 'SLOWDEST', '127.0.0.1', $1) ON CONFLICT (name) DO UPDATE SET port = $1",
       dest.port)
    return dest


def move_series(rig: Rig, series: list[Made] | None = None) -> Any:
    first = (series or rig.series)[0]
    return movescu_in_background(rig.stack.config.gateway_port, {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": first.study_uid,
        "SeriesInstanceUID": first.series_uid}, "SLOWDEST")


def dead_letters(rig: Rig) -> int:
    return queue_counts(rig.stack.config.vhost).get(topology.MOVER.dead_letter_queue, 0)


def last_job(rig: Rig) -> dict[str, Any]:
    return dict(pg(dsn(rig.stack), "SELECT * FROM move_job WHERE requested_by_aet = 'MOVESCU' "
                   "ORDER BY started_at DESC LIMIT 1")[0])


def assert_whole_series_moved(rig: Rig, result: MoveResult,
                              series: list[Made] | None = None) -> None:
    """Success for every instance, and never a Cancel; the job row says done."""
    n = len(series or rig.series)
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



# longer than the mover took to dead-letter a job while PostgreSQL was unreachable: a nack a
# second, each one a delivery of the quorum queue, ``delivery_limit`` deliveries
CUT_FOR = 8.0
assert CUT_FOR > 2 * topology.MOVER.delivery_limit


def test_postgresql_unreachable_when_a_c_move_arrives_holds_the_job_until_it_is_back(
        rig: Rig) -> None:
    """RELIABILITY: PostgreSQL stopped. The mover, cut off from PostgreSQL (the gateway is
    not: it resolves the C-MOVE), takes the job and holds it, trying again with backoff and
    telling the requester it has it, for longer than it took to dead-letter the job before
    (it returned it to the queue after a second each time, and every return was a delivery).
    Once PostgreSQL is back the job runs: Success, each instance sent once, nothing in
    ``mover.jobs.dead``, not recorded expired although it starts past its ``start_by``."""
    dest = slow_destination(rig, hold_from=len(rig.series) + 1)  # answers at once
    start = len(rig.mover_log())
    dead_before = dead_letters(rig)
    try:
        rig.proxy.cut()
        try:
            proc = move_series(rig)
            time.sleep(CUT_FOR)
            assert dead_letters(rig) == dead_before  # the bug: the job was dead-lettered
            assert proc.poll() is None, proc.communicate()[0][-3000:]  # still waiting
            assert "held: PostgreSQL unavailable" in rig.mover_log(start)
        finally:
            rig.proxy.restore()
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.stop()
    log = rig.mover_log(start)
    result = parse_move_output(proc.returncode, output)
    assert_whole_series_moved(rig, result)
    assert sorted(dest.received) == sorted(m.sop_uid for m in rig.series)  # each one once
    assert dead_letters(rig) == dead_before
    assert "could not run" not in log and "back to the queue" not in log, log
    assert "expired" not in log and "resumed" not in log, log
    # the requester heard from the mover while it held the job: pending responses
    assert len(result.pending) >= 3, result.pending
    held = [line for line in log.splitlines() if "held: PostgreSQL unavailable" in line]
    assert all("WARNING" in line for line in held), held
    # backoff: a try after 0.5 s, then twice as long each time (not one a second)
    assert len(held) <= 6, held


def test_a_mover_stopped_while_it_holds_a_job_returns_it_and_the_next_one_runs_it(
        rig: Rig) -> None:
    """A mover told to stop while PostgreSQL is unreachable puts the jobs it holds back in
    the queue at once (it does not wait its grace for them); the next mover, PostgreSQL back,
    runs them: Success, each instance once, nothing dead-lettered."""
    dest = slow_destination(rig, hold_from=len(rig.series) + 1)
    start = len(rig.mover_log())
    dead_before = dead_letters(rig)
    try:
        rig.proxy.cut()
        try:
            proc = move_series(rig)
            wait_until(lambda: "held: PostgreSQL unavailable" in rig.mover_log(start), 30,
                       what="the job held")
            mover = rig.stack.procs.pop("mover")
            mover.send_signal(signal.SIGTERM)
            assert mover.wait(30) == 0
        finally:
            rig.proxy.restore()
        stopped = rig.mover_log(start)
        assert "back to the queue: PostgreSQL unavailable and this mover is stopping" in \
            stopped, stopped
        rig.stack.start_service("mover")
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.stop()
        if "mover" not in rig.stack.procs:
            rig.stack.start_service("mover")
    assert_whole_series_moved(rig, parse_move_output(proc.returncode, output))
    assert sorted(dest.received) == sorted(m.sop_uid for m in rig.series)
    assert dead_letters(rig) == dead_before


def test_postgresql_lost_at_the_end_of_a_job_holds_its_record_not_a_second_run(
        rig: Rig) -> None:
    """RELIABILITY: PostgreSQL unreachable when a job has sent everything and records its end.
    The mover holds the job (its requester hears the final counts as pending) until the record
    is written; it neither returns the job to the queue, which sent every instance again (or
    dead-lettered it), nor answers Success before the record."""
    n = len(rig.series)
    dest = slow_destination(rig, hold_from=1)  # nothing is answered until the release
    start = len(rig.mover_log())
    dead_before = dead_letters(rig)
    try:
        proc = move_series(rig)
        wait_until(lambda: dest.held > 0, 60, every=0.05, what="a C-STORE held")
        rig.proxy.cut()
        try:
            dest.release.set()
            wait_until(lambda: len(dest.received) == n, 60, what="every instance sent")
            time.sleep(CUT_FOR)
            assert dead_letters(rig) == dead_before  # the bug: dead-lettered, or sent again
            assert len(dest.received) == n
            assert proc.poll() is None, proc.communicate()[0][-3000:]  # no Success yet
            assert "done, not recorded yet" in rig.mover_log(start)
        finally:
            rig.proxy.restore()
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.stop()
    log = rig.mover_log(start)
    result = parse_move_output(proc.returncode, output)
    assert_whole_series_moved(rig, result)
    assert (0, n, 0, 0) in result.pending, result.pending  # heard while the record waited
    assert sorted(dest.received) == sorted(m.sop_uid for m in rig.series)  # each one once
    assert dead_letters(rig) == dead_before
    assert "resumed" not in log and "back to the queue" not in log, log


def test_temp_files_of_a_mover_killed_mid_job_are_removed_when_it_starts_again(
        rig: Rig) -> None:
    """Instances over 4 MiB read from S3 (no hot cache here) wait for their C-STORE in temp
    files. A mover SIGKILLed mid-job left them in the system's temp folder for ever; now each
    mover process keeps them in a folder of its own under ``<spool>/move``, which the next
    mover to start (or any running one, every minute) removes once its owner is gone. The job
    is resumed and completes; no temp file is left."""
    big = ct_series(rig.tmp / "big", count=6, tag="mvtemp", size=1500)
    stack = rig.stack
    sent = storescu(stack.config.gateway_port, [m.path for m in big])
    assert sent.successes == len(big), sent.output
    wait_until(lambda: indexed(stack, [m.sop_uid for m in big]) == len(big), 60,
               what="the big series indexed")
    scratch = Path(stack.config.base_dir) / "spool" / "move"

    def temp_files() -> list[Path]:
        return [p for p in scratch.rglob("*.dcm") if p.is_file()]

    dest = slow_destination(rig, hold_from=1)
    try:
        proc = move_series(rig, big)
        wait_until(lambda: dest.held > 0 and len(temp_files()) >= 2, 60, every=0.05,
                   what="temp files of instances on their way out")
        left = temp_files()
        stack.kill("mover")  # SIGKILL: no clean-up of its own
        assert all(p.exists() for p in left)  # what the bug left for ever (in /tmp then)
        before = len(rig.mover_log())
        stack.start_service("mover")
        wait_until(consuming(stack, before), 60, what="the mover back")
        assert not any(p.exists() for p in left)
        assert re.search(r"removed \d+ C-MOVE temp files left by movers that ended mid-job",
                         rig.mover_log(before))
        dest.release.set()
        output, _ = proc.communicate(timeout=120)
    finally:
        dest.stop()
        if "mover" not in stack.procs:
            stack.start_service("mover")
    assert_whole_series_moved(rig, parse_move_output(proc.returncode, output), big)
    assert {m.sop_uid for m in big} <= set(dest.received)
    assert "resumed" in rig.mover_log(before)
    wait_until(lambda: temp_files() == [], 30, what="the live mover's temp files removed")
    # only the live mover's folder and its lock are left
    assert len([p for p in scratch.iterdir() if p.is_dir()]) == 1
