"""Send a set of files with DCMTK storescu over N parallel associations and count the
Success responses (storescu exits 0 even when the server answers a failure status)."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.servers import nodelay_env, stock_env, wait_exited

STORESCU = "/usr/bin/storescu"  # DCMTK's, never the pynetdicom one in .venv/bin
_OK = re.compile(rb"Received Store Response \(Success\)")
_BAD = re.compile(rb"Received Store Response \((?!Success)")


@dataclass(frozen=True)
class Sent:
    acked: int
    failed: int
    seconds: float
    t0: float  # time.monotonic() at launch
    exit_codes: tuple[int, ...]


def split(files: tuple[Path, ...], parts: int) -> list[list[Path]]:
    """Contiguous groups of nearly equal size (so a series mostly stays on one association)."""
    size, extra = divmod(len(files), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(files[start:end]))
        start = end
    return [g for g in out if g]


def send(files: tuple[Path, ...], port: int, called: str, associations: int, logs: Path,
         timeout: float = 1800, nodelay: bool = True, extra: tuple[str, ...] = ()) -> Sent:
    """``nodelay=False``: ``storescu`` as Debian ships it, with Nagle's algorithm on.
    ``extra``: more ``storescu`` options (``-xt`` to propose JPEG-LS lossless)."""
    env = nodelay_env() if nodelay else stock_env()
    logs.mkdir(parents=True, exist_ok=True)
    groups = split(files, associations)
    outputs = [logs / f"storescu-{i}.log" for i in range(len(groups))]
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        for group, out in zip(groups, outputs, strict=True):
            with out.open("wb") as sink:
                procs.append(subprocess.Popen(
                    [STORESCU, "-v", *extra, "-aet", "STORESCU", "-aec", called, "127.0.0.1",
                     str(port), *map(str, group)],
                    stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        codes = wait_exited(procs, timeout)
        seconds = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    acked = failed = 0
    for out in outputs:
        text = out.read_bytes()
        acked += len(_OK.findall(text))
        failed += len(_BAD.findall(text))
    return Sent(acked, failed, seconds, t0, codes)
