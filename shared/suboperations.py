"""The C-STORE sub-operations of a C-MOVE or C-GET: how a response status counts, and the
running counts (shared by the mover's sending threads and the gateway's C-GET)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_WARNING = frozenset({0x0001, 0x0107, 0x0116})


def classify(status: int | None) -> str:
    """A C-STORE response status -> "completed", "warning" or "failed" (PS3.4 C.4.2.1.4)."""
    if status is None:
        return "failed"
    if status == 0x0000:
        return "completed"
    if status in _WARNING or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failed"


@dataclass
class Tally:
    """Sub-operation counts, safe to update from several threads; ``on_change`` is called
    (from the updating thread) after each update."""

    remaining: int
    on_change: Callable[[], None] = lambda: None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, uid: str, outcome: str) -> None:
        with self._lock:
            self.remaining -= 1
            if outcome == "completed":
                self.completed += 1
            elif outcome == "warning":
                self.warning += 1
            else:
                self.failed += 1
                self.failed_uids.append(uid)
        self.on_change()

    def snapshot(self) -> tuple[int, int, int, int, list[str]]:
        """(remaining, completed, failed, warning, failed UIDs)."""
        with self._lock:
            return (self.remaining, self.completed, self.failed, self.warning,
                    list(self.failed_uids))
