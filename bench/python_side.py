#!/usr/bin/env python3
"""Benchmark: the Python half of tcpipstat on a large recorded run (no kernel needed).

Builds a record stream from a real lab recording (tests/fixtures) by giving its
socket records new ports: ROWS distinct socket tuples, RECORDS records in all (each
tuple arrives RECORDS/ROWS times, as spills and closes do; its counts are the recording's,
so rows repeat a few sets of counts, unless --distinct). Then times each stage
of the pipeline (parse, model, rows, NDJSON, CSV, tables), min/median/max over
--runs runs, and can profile one pass (--profile).

It runs with the cycle collector thresholds tcpipstat sets as it starts
(tcpipstat.app.tune_gc); --default-gc keeps Python's defaults (700, 10, 10) instead.

    python3 bench/python_side.py [--rows 100000] [--records 1000000] [--runs 5]
                                 [--profile] [--distinct] [--default-gc]
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from tcpipstat.app import tune_gc  # noqa: E402
from tcpipstat.model import Collection  # noqa: E402
from tcpipstat.records import Parser  # noqa: E402
from tcpipstat.report import ReportContext, render_tables, write_csv, write_json  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bookworm-tcpwork-v4.records"


def _scaled(fields: list[str], factor: int) -> list[str]:
    """A socket record's fields with every count multiplied by ``factor``."""
    return [f"{n}={int(v) * factor}" for n, _, v in (x.partition("=") for x in fields)]


def make_stream(rows: int, records: int, distinct: bool = False) -> list[str]:
    lines = [line for line in FIXTURE.read_text().splitlines() if not line.startswith("#")]
    head = [line for line in lines if line.startswith("H\t")]
    socks = [line.split("\t") for line in lines if line.startswith("R\t") and "=" in line]
    tail = [line for line in lines if line.startswith("T\t")]
    out = list(head)
    per = max(1, records // rows)
    for rep in range(per):
        for i in range(rows):
            f = list(socks[i % len(socks)])
            f[1] = "close" if rep == per - 1 else "spill"
            f[3], f[4] = "0", "%x" % (0x0A000000 + (i >> 16))   # 10.x.y.z: distinct local addresses
            f[5] = str(i & 0xFFFF)
            if distinct:       # no two tuples with the same counts (format 2: they follow FLAGS)
                f[12:] = _scaled(f[12:], i + 1)
            out.append("\t".join(f))
    return out + tail


def stage_times(lines: list[str]) -> dict[str, float]:
    t = {}
    t0 = time.perf_counter()
    p = Parser("bench")
    recs = [r for r in (p.parse_line(line, n) for n, line in enumerate(lines, 1))
            if r is not None]
    t["parse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = Collection().extend(recs)
    t["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = c.rows("tuple")
    t["rows (index=tuple)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    c.rows("lport")
    t["rows (index=lport)"] = time.perf_counter() - t0
    ctx = ReportContext(c.counter_names)
    t0 = time.perf_counter()
    write_json(io.StringIO(), rows, ctx)
    t["NDJSON"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_csv(io.StringIO(), rows, ctx)
    t["CSV"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    render_tables(Console(file=io.StringIO(), width=100), rows, ctx, "bench")
    t["tables"] = time.perf_counter() - t0
    t["parse+model+rows+NDJSON"] = t["parse"] + t["model"] + t["rows (index=tuple)"] + t["NDJSON"]
    t["parse+model+rows+tables"] = t["parse"] + t["model"] + t["rows (index=tuple)"] + t["tables"]
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true",
                    help="profile one pass, print the top functions")
    ap.add_argument("--distinct", action="store_true",
                    help="multiply each tuple's counts by a number of its own (1 to ROWS), "
                         "so that no two rows show the same counts")
    ap.add_argument("--default-gc", action="store_true",
                    help="keep Python's cycle collector thresholds (not the ones tcpipstat sets)")
    a = ap.parse_args()
    if not a.default_gc:
        tune_gc()
    lines = make_stream(a.rows, a.records, a.distinct)
    print(f"# {len(lines) - 2:,} records, {a.rows:,} socket tuples, "
          f"Python {sys.version.split()[0]}, gc thresholds {gc.get_threshold()}")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        stage_times(lines)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
        return
    runs = [stage_times(lines) for _ in range(a.runs)]
    print(f"{'stage':<28}{'min s':>9}{'median s':>10}{'max s':>9}   ({a.runs} runs)")
    for k in runs[0]:
        v = [r[k] for r in runs]
        print(f"{k:<28}{min(v):>9.2f}{statistics.median(v):>10.2f}{max(v):>9.2f}")


if __name__ == "__main__":
    main()
