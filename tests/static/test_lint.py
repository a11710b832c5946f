"""``make lint`` in the test suite: ruff and mypy (strict) clean, so CI refuses what they find."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _makefile_lint_commands() -> list[list[str]]:
    """The commands of the Makefile's ``lint`` target, ``$(VENV)`` resolved: the test checks
    what ``make lint`` checks, not a copy of it."""
    text = (ROOT / "Makefile").read_text()
    body = re.search(r"^lint:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert body, "the Makefile has no lint target"
    return [line.strip().replace("$(VENV)", str(ROOT / ".venv")).split()
            for line in body.group(1).splitlines()]


def test_ruff_and_mypy_are_clean() -> None:
    commands = _makefile_lint_commands()
    assert {Path(c[0]).name for c in commands} >= {"ruff", "mypy"}, commands
    for command in commands:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"
