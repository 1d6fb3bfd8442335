#!/usr/bin/env python3
"""What the Socket group's probes cost per hit in the lab guests, by stap's own timing
(``--stap-arg=-t``): the hits and the minimum and average cycles of each probe, over
--runs runs per kernel, the kernels interleaved (bookworm, trixie, bookworm, ...).

The workload is pathwork's (lab/workload/pathwork.c) over every send and receive path,
kTLS included (the tls module loaded before the collector, as tests/test_tier3_lab_paths.py
loads it). Figures are **lab, QEMU TCG emulated** cycles: an emulated CPU, not this host's.

    python3 bench/stap_t.py [--kernels bookworm,trixie] [--runs 5] [--size 1000001]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import lab_workloads as W  # noqa: E402

PAIRS = (("write", "read"), ("sendfile", "splice"), ("splice", "zerocopy"),
         ("ktls", "ktls"), ("ktls_sendfile", "ktls"), ("ktls", "ktls_splice"))
# stap -t's report, a line per probe: its point (with @file:line), hits and cycles
_LINE = re.compile(r'^(?P<point>(?:kernel|module\("[^"]+"\))\.function\("(?P<fn>\w+)[^"]*"\)'
                   r'(?P<kind>\.return|\.call)?)\??.*?hits: (?P<hits>\d+), '
                   r'cycles: (?P<min>\d+)min/(?P<avg>\d+)avg/(?P<max>\d+)max')


def one_run(kernel: str, size: int) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(function, handler) -> (hits, min cycles, avg cycles) of one run."""
    with tempfile.TemporaryDirectory(prefix="tcpipstat-stap-t-") as tmp:
        t = Path(tmp)
        mods = W.tls_modules(kernel, t)
        insmod = "; ".join(f"insmod /{m.name}" for m in mods)
        cmd = "; ".join(f"/pathwork {a} {b} {size}" for a, b in PAIRS)
        env = {**W.pathwork_files(kernel, t, *mods), "LAB_BEFORE": insmod}
        res = subprocess.run([str(ROOT / "lab/run"), "--kernel", kernel, "--meta", str(t / "m"),
                              "--", "--groups", "socket", "--all-processes", "--json",
                              "--stap-arg=-t", "*:*-*:*", "-c", cmd],
                             capture_output=True, text=True, timeout=1200,
                             env={**os.environ, **env})
    out = {}
    for line in (res.stdout + res.stderr).splitlines():
        m = _LINE.search(line)
        if m:
            handler = {".return": "return", ".call": "call"}.get(m["kind"] or "", "entry")
            out[m["fn"], handler] = (int(m["hits"]), int(m["min"]), int(m["avg"]))
    if not out:
        sys.exit(f"{kernel}: no probe timing in the run's output (rc {res.returncode}):\n"
                 f"{res.stderr[-2000:]}")
    return out


def summary(runs: list[dict]) -> list[str]:
    """A row per probe handler: hits per run, the minimum over the runs, the hit-weighted
    average over all their hits."""
    by = defaultdict(list)
    for r in runs:
        for key, v in r.items():
            by[key].append(v)
    rows = []
    for (fn, handler), vs in sorted(by.items()):
        hits = sum(v[0] for v in vs)
        avg = sum(v[0] * v[2] for v in vs) // max(hits, 1)
        rows.append(f"| {fn} | {handler} | {' / '.join(str(v[0]) for v in vs)} | "
                    f"{min(v[1] for v in vs):,} | {avg:,} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="bookworm,trixie")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=1_000_001)
    a = ap.parse_args()
    kernels = a.kernels.split(",")
    runs: dict[str, list] = {k: [] for k in kernels}
    for i in range(a.runs):
        for k in kernels:
            print(f"run {i + 1}/{a.runs} {k}...", file=sys.stderr, flush=True)
            runs[k].append(one_run(k, a.size))
    for k in kernels:
        print(f"\n{k} (lab, QEMU TCG emulated), {a.runs} runs, pathwork {a.size:,} bytes a pair")
        print("| function | handler | hits (each run) | min cycles | avg cycles |")
        print("|---|---|---:|---:|---:|")
        print("\n".join(summary(runs[k])))


if __name__ == "__main__":
    main()
