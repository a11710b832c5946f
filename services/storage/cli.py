from __future__ import annotations

from services.storage.app import run
from shared.lifecycle import service_main
from shared.settings import StorageSettings


def main(argv: list[str]) -> int:
    return service_main("storage", argv, StorageSettings, run)
