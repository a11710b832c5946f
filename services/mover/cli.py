from __future__ import annotations

from services.mover.app import run
from shared.lifecycle import service_main
from shared.settings import MoverSettings


def main(argv: list[str]) -> int:
    return service_main("mover", argv, MoverSettings, run)
