#!/usr/bin/env python3
"""Benchmark the bpftrace collector natively, on this host's own kernel (no emulation).
Prints figures: min / median / max over --runs runs, the modes interleaved in each run.

    sudo python3 bench/bpf_bench.py [--runs 5] [--secs 5] [--conns 3000]
                                    [--parts startup,overhead]

Parts:
  startup   seconds from starting `tcpipstat --backend bpftrace -c CMD` to CMD running:
            bpftrace starts -c's command once its probes are attached, so this is the time
            to "collecting" (rendering, bpftrace's compile and load, attaching).
  overhead  loopback iperf3 throughput (one stream, --secs seconds) and a connection-churn
            rate (tcpwork, lab/workload/tcpwork.c built here: --conns connect/send/close in a
            row) untraced, under tcpipstat with its default groups and with only the socket
            group; no filter, so every socket on the host is traced.

Needs root, bpftrace, iperf3 and a C compiler. The figures are this host's: say where they
were measured (the header line prints the kernel and CPU) and what else ran beside them.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TCPIPSTAT = [sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--json"]
MODES = {"untraced": None, "default groups": [], "socket group": ["--groups", "socket"]}
# (the server is waited for through ss, not a guessed sleep)
WAIT_LISTEN = "until ss -Hltn 'sport = :{port}' | grep -q .; do sleep 0.02; done"
IPERF3 = ("iperf3 -s -1 -p {port} >/dev/null & " + WAIT_LISTEN + "; "
          "iperf3 -4 -c 127.0.0.1 -p {port} -t {secs} -f m 2>&1 | grep -m1 sender; wait")
CHURN = ("{tcpwork} server 127.0.0.1 {port} 1 {n} & "
         "{tcpwork} client 127.0.0.1 {port} {n} 1; wait")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workload(shell: str, extra: list[str] | None) -> str:
    """The workload's output, run untraced (extra None) or as tcpipstat's -c command."""
    if extra is None:
        res = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=600)
        text = res.stdout + res.stderr
    else:   # (-c's output goes to stderr: tcpipstat's stdout is the report)
        res = subprocess.run([*TCPIPSTAT, *extra, "-c", shell], capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
        text = res.stderr
    if res.returncode != 0:
        raise SystemExit(f"workload failed ({res.returncode}): {text[-2000:]}")
    return text


def iperf3_mbits(extra, secs: int) -> float:
    text = run_workload(IPERF3.format(port=free_port(), secs=secs), extra)
    m = re.search(r"([\d.]+) Mbits/sec .*sender", text)
    if not m:
        raise SystemExit(f"no iperf3 sender line in: {text[-2000:]}")
    return float(m.group(1))


def churn_rate(extra, tcpwork: Path, n: int) -> float:
    text = run_workload(CHURN.format(tcpwork=tcpwork, port=free_port(), n=n), extra)
    m = re.search(r"tcpwork client \S+: (\d+) connections, .* (\d+) ms", text)
    if not m:
        raise SystemExit(f"no tcpwork client line in: {text[-2000:]}")
    return int(m.group(1)) / (int(m.group(2)) / 1000)


def startup_s(tmp: Path) -> float:
    mark = tmp / "started"
    mark.unlink(missing_ok=True)
    t0 = time.time()
    subprocess.run([*TCPIPSTAT, "-c", f"date +%s.%N > {mark}"], capture_output=True,
                   check=True, timeout=120, cwd=ROOT)
    return float(mark.read_text()) - t0


def build_tcpwork(tmp: Path) -> Path:
    out = tmp / "tcpwork"
    subprocess.run(["cc", "-O2", "-o", str(out), str(ROOT / "lab/workload/tcpwork.c")],
                   check=True)
    return out


def show(name: str, values: list[float], unit: str, base: list[float] | None = None) -> None:
    med = statistics.median(values)
    ratio = f"  {med / statistics.median(base) * 100:5.1f} % of untraced" if base else ""
    print(f"  {name:<16} {min(values):10.1f} {med:10.1f} {max(values):10.1f} {unit}{ratio}")


def overhead(args, tmp: Path) -> None:
    tcpwork = build_tcpwork(tmp)
    thr: dict[str, list[float]] = {m: [] for m in MODES}
    churn: dict[str, list[float]] = {m: [] for m in MODES}
    names = list(MODES)
    for i in range(args.runs):
        for mode in names[i % len(names):] + names[:i % len(names)]:   # (rotated each run)
            thr[mode].append(iperf3_mbits(MODES[mode], args.secs))
            churn[mode].append(churn_rate(MODES[mode], tcpwork, args.conns))
        print(f"  (run {i + 1} of {args.runs} done)", file=sys.stderr)
    print(f"iperf3 loopback, one stream, {args.secs} s (min / median / max)")
    for mode in names:
        show(mode, thr[mode], "Mbit/s", thr["untraced"] if mode != "untraced" else None)
    print(f"connection churn, {args.conns} connections in a row (min / median / max)")
    for mode in names:
        show(mode, churn[mode], "conn/s", churn["untraced"] if mode != "untraced" else None)


def startup(args, tmp: Path) -> None:
    times = [startup_s(tmp) for _ in range(args.runs)]
    print("start-up to collecting (bpftrace attached, -c command started)")
    show("default groups", times, "s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--parts", default="startup,overhead")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bpf_bench: needs root (bpftrace loads BPF programs)")
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo")
                if x.startswith("model name")), "?")
    print(f"native: kernel {platform.release()}, {os.cpu_count()} CPUs ({cpu}), "
          f"runs {args.runs}, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bpf-bench-") as tmp:
        for part in args.parts.split(","):
            {"startup": startup, "overhead": overhead}[part](args, Path(tmp))


if __name__ == "__main__":
    main()
