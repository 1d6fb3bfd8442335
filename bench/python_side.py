#!/usr/bin/env python3
"""Benchmark: the Python half of tcpipstat on a large recorded run (no kernel needed).

Builds a record stream from a real lab recording (tests/fixtures) by giving its
socket records new ports: ROWS distinct socket tuples, RECORDS records in all (each
tuple arrives RECORDS/ROWS times, as spills and closes do; its counts are the recording's,
so rows repeat a few sets of counts, unless --distinct). Then times each stage
of the pipeline (parse, model, rows, NDJSON, CSV, tables), min/median/max over
--runs runs, in wall time and in CPU time (the process's user + system time: what a
busy host inflates least), and can profile one pass (--profile). It says which
reader parsed the records (the compiled one where it is built: tcpipstat/records.py)
and the load average before and after; --python-parser takes the pure-Python reader.

It runs with the cycle collector thresholds tcpipstat sets as it starts
(tcpipstat.app.tune_gc); --default-gc keeps Python's defaults (700, 10, 10) instead.

    python3 bench/python_side.py [--rows 100000] [--records 1000000] [--runs 5]
                                 [--profile] [--distinct] [--default-gc] [--python-parser]
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from tcpipstat import records  # noqa: E402
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


class Clock:
    """Each stage's wall time and CPU time (user + system of this process)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._at = (time.perf_counter(), time.process_time())

    def lap(self, stage: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[stage] = now[0] - self._at[0]
        self.cpu[stage] = now[1] - self._at[1]
        self._at = (time.perf_counter(), time.process_time())

    def sums(self) -> None:
        for t in (self.wall, self.cpu):
            common = t["parse"] + t["model"] + t["rows (index=tuple)"]
            t["parse+model+rows+NDJSON"] = common + t["NDJSON"]
            t["parse+model+rows+tables"] = common + t["tables"]


def stage_times(lines: list[str]) -> Clock:
    clock = Clock()
    p = Parser("bench")
    recs = [r for r in (p.parse_line(line, n) for n, line in enumerate(lines, 1))
            if r is not None]
    clock.lap("parse")
    c = Collection().extend(recs)
    clock.lap("model")
    rows = c.rows("tuple")
    clock.lap("rows (index=tuple)")
    c.rows("lport")
    clock.lap("rows (index=lport)")
    ctx = ReportContext(c.counter_names)
    write_json(io.StringIO(), rows, ctx)
    clock.lap("NDJSON")
    write_csv(io.StringIO(), rows, ctx)
    clock.lap("CSV")
    render_tables(Console(file=io.StringIO(), width=100), rows, ctx, "bench")
    clock.lap("tables")
    clock.sums()
    return clock


def parser_path() -> str:
    """Which reader parses the records (a checkout without the compiled one: Python's)."""
    if getattr(records, "_compiled", None) is not None:
        return "compiled (tcpipstat._records)"
    return f"pure Python ({getattr(records, 'UNAVAILABLE', '') or 'no compiled reader'})"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def show(runs: list[Clock], n: int) -> None:
    print(f"{'':<28}{'wall time':^28}   {'CPU time':^28}")
    print(f"{'stage':<28}" + f"{'min s':>9}{'median s':>10}{'max s':>9}   " * 2 + f"({n} runs)")
    for k in runs[0].wall:
        cells = ""
        for v in ([r.wall[k] for r in runs], [r.cpu[k] for r in runs]):
            cells += f"{min(v):>9.2f}{statistics.median(v):>10.2f}{max(v):>9.2f}   "
        print(f"{k:<28}{cells.rstrip()}")


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
    ap.add_argument("--python-parser", action="store_true",
                    help="parse with the pure-Python reader, as where the compiled one is not "
                         "built")
    a = ap.parse_args()
    if not a.default_gc:
        tune_gc()
    if a.python_parser:
        records._compiled, records.UNAVAILABLE = None, "--python-parser"
    lines = make_stream(a.rows, a.records, a.distinct)
    print(f"# {len(lines) - 2:,} records, {a.rows:,} socket tuples, "
          f"Python {sys.version.split()[0]}, gc thresholds {gc.get_threshold()}")
    print(f"# parser: {parser_path()}; load average {load()}")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        stage_times(lines)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
        return
    show([stage_times(lines) for _ in range(a.runs)], a.runs)
    print(f"# load average after: {load()}")


if __name__ == "__main__":
    main()
