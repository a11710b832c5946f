"""Entry points of the query and retrieve benches for ``python -m bench``."""

from __future__ import annotations

import json
import time

from bench import query, retrieve
from bench.datasets import OUT
from bench.dimse import write_section
from bench.report import DOC

FULL_SHAPE = query.Shape(patients=10_000)  # x 5 studies x 4 series x 5 = 1,000,000 instances
QUICK_SHAPE = query.Shape(patients=1_000)  # 100,000 instances


def _command(argv: list[str]) -> str:
    return "make bench" + (f" BENCH_ARGS='{' '.join(argv)}'" if argv else "")


def _publish(name: str, body: str, draft: bool) -> None:
    if draft:
        path = OUT / f"benchmarks-{name}-latest.md"
        path.write_text(body + "\n")
        print(f"\nwrote {path}")
    else:
        write_section(name, body)
        print(f"\nwrote {DOC}")


def run_query_bench(quick: bool, no_doc: bool, keep: bool, argv: list[str]) -> None:
    opts = query.Options(shape=QUICK_SHAPE if quick else FULL_SHAPE,
                         small=400 if quick else 2000, keep=keep)
    result = query.run_query(opts)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"query-{stamp}.json").write_text(json.dumps(query.as_json(result), indent=1))
    print()
    print(query.text_table(result))
    print()
    print(query.target_line(result))
    _publish("query", query.markdown(result, _command(argv)), quick or no_doc)


def run_retrieve_bench(quick: bool, trials: int | None, no_doc: bool, keep: bool,
                       argv: list[str]) -> None:
    # 5 trials: a run is under a second, so one noisy moment on the shared machine moves a
    # single trial by a third; the median of 5 paired ratios is steadier than of 3
    opts = retrieve.Options(count=300, trials=trials or (1 if quick else 5), keep=keep)
    runs = retrieve.run_retrieve(opts)
    retrieve.save(runs, OUT / f"retrieve-{time.strftime('%Y%m%d-%H%M%S')}.json")
    summary = retrieve.summarize(runs)
    print()
    print(retrieve.text_table(summary))
    print()
    for line in retrieve.target_lines(summary):
        print(line)
    _publish("retrieve", retrieve.markdown(runs, opts.trials, _command(argv)), quick or no_doc)
