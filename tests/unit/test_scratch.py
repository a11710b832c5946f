"""Scratch folders (``shared/scratch.py``): a dead process's C-GET temp files are swept, a live
one's never, on the real filesystem with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.scratch import LOCK, OLD_AFTER, STARTING, Scratch, sweep

# a process that opens its scratch folder, writes a temp file there, says where, and waits
_HOLDER = """
import sys, time
from pathlib import Path
from shared.scratch import Scratch
scratch = Scratch(Path(sys.argv[1])).open()
(scratch.path / "retrieve-1.dcm").write_bytes(b"x" * 1000)
print(scratch.path, flush=True)
time.sleep(600)
"""


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(parent)], cwd=root,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_process_s_folder_is_swept_a_live_one_s_is_not(tmp_path: Path) -> None:
    parent = tmp_path / "retrieve"
    dead, dead_folder = _holder(parent)
    alive, alive_folder = _holder(parent)
    try:
        with Scratch(parent) as ours:
            (ours.path / "retrieve-2.dcm").write_bytes(b"y")
            dead.send_signal(signal.SIGKILL)  # no clean-up of its own
            dead.wait(10)
            assert (dead_folder / "retrieve-1.dcm").exists()  # what the bug left for ever
            assert sweep(parent) == 1
            assert not dead_folder.exists()
            assert not (parent / f"{dead_folder.name}{LOCK}").exists()
            # another live process's folder and ours are untouched
            assert (alive_folder / "retrieve-1.dcm").exists()
            assert (ours.path / "retrieve-2.dcm").exists()
            assert sweep(parent) == 0
        assert not ours.path.exists()  # a clean stop removes its own
        assert sorted(p.name for p in parent.iterdir()) == sorted(
            [alive_folder.name, f"{alive_folder.name}{LOCK}"])
    finally:
        for proc in (dead, alive):
            proc.kill()
            proc.wait(10)
    assert sweep(parent) == 1  # now that one is gone too
    assert list(parent.iterdir()) == []


def test_old_layout_files_go_when_old_and_other_names_stay(tmp_path: Path) -> None:
    parent = tmp_path / "retrieve"
    parent.mkdir()
    old, fresh = parent / "retrieve-abc.dcm", parent / "retrieve-def.dcm"
    foreign = parent / "notes.txt"
    for path in (old, fresh, foreign):
        path.write_bytes(b"x")
    long_ago = time.time() - OLD_AFTER - 10
    os.utime(old, (long_ago, long_ago))
    os.utime(foreign, (long_ago, long_ago))
    (parent / "somebody's folder").mkdir()
    assert sweep(parent) == 1
    assert sorted(p.name for p in parent.iterdir()) == [
        "notes.txt", "retrieve-def.dcm", "somebody's folder"]


def test_a_lock_alone_goes_only_when_old_a_folder_alone_goes_at_once(tmp_path: Path) -> None:
    """A lock file without its folder may be a process starting (before its flock): kept while
    young. A folder without its lock is what a sweep cut short leaves: removed."""
    parent = tmp_path / "retrieve"
    parent.mkdir()
    young, old = parent / f"{'a' * 32}{LOCK}", parent / f"{'b' * 32}{LOCK}"
    young.touch()
    old.touch()
    long_ago = time.time() - STARTING - 10
    os.utime(old, (long_ago, long_ago))
    orphan = parent / ("c" * 32)
    orphan.mkdir()
    (orphan / "retrieve-1.dcm").write_bytes(b"x")
    assert sweep(parent) == 1
    assert [p.name for p in parent.iterdir()] == [young.name]


def test_sweeping_a_missing_folder_is_nothing(tmp_path: Path) -> None:
    assert sweep(tmp_path / "nothing here") == 0
