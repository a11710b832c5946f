"""``python -m bench [ingest|query|retrieve] [--quick] [--trials N] [--only B] [--no-doc]
[--keep]``."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench import findable, stock
from bench.datasets import OUT
from bench.ingest import IDLE, Options, run_ingest
from bench.qr import run_query_bench, run_retrieve_bench
from bench.report import (
    DOC,
    ceilings,
    markdown,
    rows,
    save_runs,
    targets,
    text_table,
    write_doc,
)
from bench.servers import Server

BENCHES = ("ingest", "query", "retrieve")
FULL = {"ct": 300, "small": 2000}
QUICK = {"ct": 60, "small": 300}


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the cleanups: every process we started stops


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("bench", nargs="?", choices=BENCHES, help="default: all")
    parser.add_argument("--only", choices=BENCHES, help="run only this bench")
    parser.add_argument("--quick", action="store_true",
                        help="ct 60, small 300, 1 trial; docs/benchmarks.md is left alone")
    parser.add_argument("--trials", type=int, help="trials per measurement (default 3)")
    parser.add_argument("--no-doc", action="store_true", help="do not update the docs")
    parser.add_argument("--keep", action="store_true",
                        help="keep bench/out/run-*/ (server logs, storescu output)")
    args = parser.parse_args(argv)
    chosen = args.only or args.bench
    signal.signal(signal.SIGTERM, _sigterm)
    if chosen in (None, "ingest"):
        found_runs: list[findable.Findable] = []
        found_trials = 2 if args.quick else 5
        stock_runs: list[stock.StockRun] = []
        trials = args.trials or (1 if args.quick else 3)

        def then(servers: list[Server], work: Path) -> None:
            found_runs.extend(findable.run_findable(servers, work, found_trials))
            stock_runs.extend(stock.run_stock(servers, work, trials))

        opts = Options(sizes=QUICK if args.quick else FULL, trials=trials, keep=args.keep,
                       then=then)
        runs = run_ingest(opts)
        save_runs(runs, OUT / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.json")
        table = rows(runs)
        print()
        print(text_table(table))
        print()
        for target in targets(table):
            print(target.line())
        for ceiling in ceilings(table):
            print(ceiling.line())
        found = findable.summarize(found_runs)
        extra = findable.markdown(found, found_trials) if found else []
        if found:
            print(findable.target_line(found))
        for line in stock.lines(stock_runs):
            print(line)
        extra += stock.markdown(stock_runs, trials)
        command = "make bench" + (f" BENCH_ARGS='{' '.join(argv)}'" if argv else "")
        section = markdown(table, opts.trials, command, IDLE, extra)
        if args.quick or args.no_doc:
            (OUT / "benchmarks-latest.md").write_text(section + "\n")
        else:
            write_doc(section)
            print(f"\nwrote {DOC}")
    if chosen in (None, "query"):  # 200 C-FINDs of each kind; 1M instances (quick: 100k)
        run_query_bench(args.quick, args.no_doc, args.keep, argv)
    if chosen in (None, "retrieve"):
        run_retrieve_bench(args.quick, args.trials, args.no_doc, args.keep, argv)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted: everything started by the bench was stopped", file=sys.stderr)
        sys.exit(130)
