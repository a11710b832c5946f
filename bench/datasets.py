"""The benchmark data sets, generated with ``tests.dicomgen`` and cached under ``bench/out``.

Each trial gets its own copy with fresh UIDs (a different ``tag``): minipacs would take the
cheap duplicate path otherwise, and the peers are emptied between trials anyway.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# loaded by name: the generator lives with the tests, which mypy does not check with us
_gen = importlib.import_module("tests.dicomgen")
ct_series: Callable[..., object] = _gen.ct_series
small_set: Callable[..., object] = _gen.small_set

OUT = Path(__file__).resolve().parent / "out"
DATA = OUT / "data"


@dataclass(frozen=True)
class DataSet:
    kind: str  # "ct", "small" or "ct-jls"
    tag: str
    files: tuple[Path, ...]
    nbytes: int

    @property
    def count(self) -> int:
        return len(self.files)


def _generate(kind: str, count: int, tag: str, folder: Path) -> None:
    if kind == "ct":
        ct_series(folder, count=count, tag=tag)
    elif kind == "ct-jls":  # the CT series compressed by DCMTK's JPEG-LS lossless encoder
        source = folder / "source"
        ct_series(source, count=count, tag=tag)
        for path in sorted(source.glob("*.dcm")):
            subprocess.run(["dcmcjpls", str(path), str(folder / path.name)], check=True,
                           capture_output=True, timeout=120)
        shutil.rmtree(source)
    elif kind == "small":
        if count % 20:
            raise ValueError("small set sizes are multiples of 20 (2 studies x 2 series x 5)")
        per_series = 10 if count % 40 == 0 else 5
        small_set(folder, patients=count // (4 * per_series), per_series=per_series, tag=tag)
    else:
        raise ValueError(f"unknown data set {kind!r}")


def dataset(kind: str, count: int, tag: str) -> DataSet:
    """The set ``kind`` of ``count`` instances with UIDs derived from ``tag`` (cached)."""
    folder = DATA / f"{tag}-{count}"
    marker = folder / "done.json"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        _generate(kind, count, tag, folder)
        files = sorted(p.name for p in folder.glob("*.dcm"))
        marker.write_text(json.dumps({"kind": kind, "count": len(files)}))
    paths = tuple(sorted(folder.glob("*.dcm")))
    if len(paths) != count:
        raise RuntimeError(f"{folder}: expected {count} files, found {len(paths)}")
    return DataSet(kind, tag, paths, sum(p.stat().st_size for p in paths))
