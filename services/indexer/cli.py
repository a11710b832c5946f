from __future__ import annotations

from services.indexer.app import run
from shared.lifecycle import service_main
from shared.settings import IndexerSettings


def main(argv: list[str]) -> int:
    return service_main("indexer", argv, IndexerSettings, run)
