"""``shared/crash.py``: crash points are opt-in by name, and a typo is refused."""

from __future__ import annotations

import pytest

from shared import crash
from shared.settings import SettingsError, StorageSettings


def test_an_unknown_crash_point_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match=r"storage\.uplaoded"):
        StorageSettings.from_env({"MINIPACS_CRASH_AT": "storage.uplaoded"})
    armed = StorageSettings.from_env({"MINIPACS_CRASH_AT": " storage.uploaded,indexer.committed"})
    assert crash.parse(armed.crash_at) == {"storage.uploaded", "indexer.committed"}
    assert crash.parse(StorageSettings.from_env({}).crash_at) == frozenset()


def test_a_step_is_left_as_it_is_unless_its_point_is_armed() -> None:
    def step(x: int) -> int:
        return x + 1

    assert crash.after(frozenset(), "gateway.confirmed", step) is step
    assert crash.after(frozenset({"storage.uploaded"}), "gateway.confirmed", step) is step
    wrapped = crash.after(frozenset({"gateway.confirmed"}), "gateway.confirmed", step)
    assert wrapped is not step
    crash.reached(frozenset({"storage.uploaded"}), "gateway.confirmed")  # not armed: returns
