#!/usr/bin/env python3
"""Benchmark the bpftrace collector natively, on this host's own kernel (no emulation).
Prints figures: min / median / max over --runs runs, the modes interleaved in each run.

    sudo python3 bench/bpf_bench.py [--runs 5] [--secs 5] [--conns 3000]
                                    [--parts startup,overhead,floor] [--compare TREE]

Before and after a change: check the older commit out in a worktree of its own (git worktree
add ../before REF) and pass it as --compare: its tcpipstat is measured too, interleaved
with this tree's, each figure beside the other (its rows are marked "(TREE's name)").

Parts:
  startup   seconds from starting `tcpipstat --backend bpftrace -c CMD` to CMD running:
            bpftrace starts -c's command once its probes are attached, so this is the time
            to "collecting" (rendering, bpftrace's compile and load, attaching).
  overhead  loopback iperf3 throughput (one stream, --secs seconds) and a connection-churn
            rate (tcpwork, lab/workload/tcpwork.c built here: --conns connect/send/close in a
            row) untraced, under tcpipstat with its default groups and with only the socket
            group; no filter, so every socket on the host is traced.

  floor     the same two workloads untraced, under bpftrace running empty programs on the
            collector's own probe points (what attaching costs: captured from the program
            tcpipstat runs on this host), under bench/bt_floor.bt (the least a per-socket
            counting program does: one lookup and one update an event, no record until
            END) and under tcpipstat (default groups): where the goals are out of reach
            of any such program on this host, and where of the collector's design.

The churn also prints the host's CPU time per connection (busy jiffies of /proc/stat over
the churn, every process and interrupt, at USER_HZ: a 10 ms grain, 3 us a connection at
3,000), which says more than the rate where the rate's spread is wide.

Needs root, bpftrace, iperf3 and a C compiler. The figures are this host's: say where they
were measured (the header line prints the kernel and CPU) and what else ran beside them
(each run prints the load average as it ends). A traced run whose bpftrace lost events
(its perf buffers full) says how many: its rate then left work undone.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
TCPIPSTAT = [sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--json"]
# mode -> tcpipstat's options (None: untraced); with --compare, each traced mode twice
MODES = {"untraced": None, "default groups": [], "socket group": ["--groups", "socket"]}
LOST = re.compile(r"Lost (\d+) events")
# (the server is waited for through ss, not a guessed sleep)
WAIT_LISTEN = "until ss -Hltn 'sport = :{port}' | grep -q .; do sleep 0.02; done"
IPERF3 = ("iperf3 -s -1 -p {port} >/dev/null & " + WAIT_LISTEN + "; "
          "iperf3 -4 -c 127.0.0.1 -p {port} -t {secs} -f m 2>&1 | grep -m1 sender; wait")
# The client starts once the server listens (ss: tcpwork's ready file may be an earlier
# churn's on the same port, and a connect refused then ended a measure); a client that fails
# (it names the errno) takes its server with it: the server would wait in accept() for ever
CHURN = ("rm -f /tmp/tcpwork-ready-{port}; {tcpwork} server 127.0.0.1 {port} 1 {n} & s=$!; "
         + WAIT_LISTEN + "; "
         "{tcpwork} client 127.0.0.1 {port} {n} 1 || {{ kill $s; exit 1; }}; wait")
# A churn leaves its client's ports in TIME-WAIT for 60 s; the next one waits until fewer
# than this many remain, so that connect() finds a free ephemeral port (EADDRNOTAVAIL ended
# a 10-run measure in its 9th run)
TIME_WAIT_MAX = 8000
# bpftrace's environment under --parts floor: the map size tcpipstat gives it by default
# (--max-sockets 8192), so that the floor's maps are sized as the collector's
BT_ENV = {**os.environ, "BPFTRACE_MAP_KEYS_MAX": "8192", "BPFTRACE_MAX_MAP_KEYS": "8192"}
# The host's busy time (/proc/stat's first line: all but idle and iowait, in USER_HZ
# ticks) around the churn, written by the workload's own shell (so tracer start-up and end
# are outside it)
BUSY = "head -1 /proc/stat > {out}"
USER_HZ = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mode(NamedTuple):
    """How a workload runs: untraced (options and program None), as the -c command of the
    tcpipstat in ``tree`` with ``options``, or under bpftrace running ``program``."""
    tree: Path
    options: list[str] | None
    program: Path | None = None


def modes(compare: Path | None) -> dict[str, Mode]:
    """Each mode's name -> its Mode."""
    out = {name: Mode(ROOT, extra) for name, extra in MODES.items()}
    if compare is not None:
        out.update({f"{name} ({compare.name})": Mode(compare, extra)
                    for name, extra in MODES.items() if extra is not None})
    return out


def run_workload(shell: str, mode: Mode, lost: list[int]) -> str:
    """The workload's output, run untraced, under a bpftrace program or as tcpipstat's -c
    command (the events its bpftrace lost are added to ``lost``)."""
    tree, extra, program = mode
    if program is not None:     # (bpftrace splits -c at spaces: the shell goes in a file)
        script = Path(tempfile.gettempdir()) / f"bpf-bench-{os.getpid()}.sh"
        script.write_text(shell + "\n")
        try:
            res = subprocess.run(["bpftrace", "-q", str(program), "-c", f"/bin/sh {script}"],
                                 capture_output=True, text=True, timeout=600, env=BT_ENV)
        finally:
            script.unlink()
        text = res.stdout + res.stderr
    elif extra is None:
        res = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=600)
        text = res.stdout + res.stderr
    else:   # (-c's output goes to stderr: tcpipstat's stdout is the report)
        res = subprocess.run([*TCPIPSTAT, *extra, "-c", shell], capture_output=True, text=True,
                             timeout=600, cwd=tree)
        text = res.stderr
        lost.append(sum(int(n) for n in LOST.findall(text)))
    if res.returncode != 0:
        raise SystemExit(f"workload failed ({res.returncode}): {text[-2000:]}")
    return text


def iperf3_mbits(mode, secs: int, lost: list[int]) -> float:
    text = run_workload(IPERF3.format(port=free_port(), secs=secs), mode, lost)
    m = re.search(r"([\d.]+) Mbits/sec .*sender", text)
    if not m:
        raise SystemExit(f"no iperf3 sender line in: {text[-2000:]}")
    return float(m.group(1))


def time_wait_sockets() -> int:
    out = subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True,
                         text=True).stdout
    return out.count("\n")


def wait_for_ports(limit: int = TIME_WAIT_MAX, timeout: float = 120) -> None:
    """Wait until fewer than ``limit`` sockets are in TIME-WAIT (at most ``timeout`` s)."""
    t0 = time.monotonic()
    while (n := time_wait_sockets()) >= limit:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"{n} sockets still in TIME-WAIT after {timeout:.0f} s")
        time.sleep(1)
    if time.monotonic() - t0 > 1:
        print(f"  (waited {time.monotonic() - t0:.0f} s for TIME-WAIT sockets to expire)",
              file=sys.stderr)


def busy_ticks(path: Path) -> int:
    ticks = [int(x) for x in path.read_text().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4]


def churn_rate(mode, tcpwork: Path, n: int, lost: list[int], cpu: list[float]) -> float:
    """Connections a second; the host's CPU microseconds a connection go to ``cpu``."""
    wait_for_ports()
    before, after = tcpwork.with_name("busy-before"), tcpwork.with_name("busy-after")
    shell = "; ".join([BUSY.format(out=before),
                       CHURN.format(tcpwork=tcpwork, port=free_port(), n=n),
                       BUSY.format(out=after)])
    text = run_workload(shell, mode, lost)
    m = re.search(r"tcpwork client \S+: (\d+) connections, .* (\d+) ms", text)
    if not m:
        raise SystemExit(f"no tcpwork client line in: {text[-2000:]}")
    ticks = busy_ticks(after) - busy_ticks(before)
    cpu.append(ticks * 1e6 / USER_HZ / int(m.group(1)))
    return int(m.group(1)) / (int(m.group(2)) / 1000)


def startup_s(tmp: Path, tree: Path) -> float:
    mark = tmp / "started"
    mark.unlink(missing_ok=True)
    t0 = time.time()
    subprocess.run([*TCPIPSTAT, "-c", f"date +%s.%N > {mark}"], capture_output=True,
                   check=True, timeout=120, cwd=tree)
    return float(mark.read_text()) - t0


def build_tcpwork(tmp: Path) -> Path:
    out = tmp / "tcpwork"
    subprocess.run(["cc", "-O2", "-o", str(out), str(ROOT / "lab/workload/tcpwork.c")],
                   check=True)
    return out


def show(name: str, values: list[float], unit: str, base: list[float] | None = None,
         lost: list[int] | None = None) -> None:
    med = statistics.median(values)
    ratio = f"  {med / statistics.median(base) * 100:5.1f} % of untraced" if base else ""
    lost_text = f"  (events lost: {sum(lost)})" if lost and sum(lost) else ""
    print(f"  {name:<28} {min(values):10.2f} {med:10.2f} {max(values):10.2f} {unit}{ratio}"
          f"{lost_text}")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def overhead(args, tmp: Path) -> None:
    traffic(args, tmp, modes(args.compare))


def traffic(args, tmp: Path, all_modes: dict[str, Mode]) -> None:
    """iperf3 and the churn under each mode, interleaved (the order rotated each run)."""
    tcpwork = build_tcpwork(tmp)
    names = list(all_modes)
    thr: dict[str, list[float]] = {m: [] for m in names}
    churn: dict[str, list[float]] = {m: [] for m in names}
    cpu: dict[str, list[float]] = {m: [] for m in names}
    lost: dict[str, list[int]] = {m: [] for m in names}
    for i in range(args.runs):
        for mode in names[i % len(names):] + names[:i % len(names)]:
            thr[mode].append(iperf3_mbits(all_modes[mode], args.secs, lost[mode]))
            churn[mode].append(churn_rate(all_modes[mode], tcpwork, args.conns, lost[mode],
                                          cpu[mode]))
        print(f"  (run {i + 1} of {args.runs} done, {load()})")
    print(f"iperf3 loopback, one stream, {args.secs} s (min / median / max)")
    for mode in names:
        show(mode, thr[mode], "Mbit/s", thr["untraced"] if mode != "untraced" else None)
    print(f"connection churn, {args.conns} connections in a row (min / median / max; "
          "events lost: over both workloads)")
    for mode in names:
        show(mode, churn[mode], "conn/s", churn["untraced"] if mode != "untraced" else None,
             lost[mode])
    print("the host's CPU time over the churn, all processes (min / median / max)")
    for mode in names:
        show(mode, cpu[mode], "us/conn")


# A probe's first line in the collector's text: its points (and predicate), up to its body
PROBE = re.compile(r"^((?:tracepoint|rawtracepoint|kfunc|kretfunc|kprobe|kretprobe|fentry"
                   r"|fexit):[^{]*)\{", re.M)
# tcpipstat's bpftrace, through a stand-in (TCPIPSTAT_BPFTRACE) that keeps its program
CAPTURE = "for a; do case $a in *.bt) cp \"$a\" {out} ;; esac; done; exec bpftrace \"$@\"\n"


def host_program(tmp: Path) -> str:
    """The program tcpipstat (default groups) runs on this host."""
    wrapper, out = tmp / "capture.sh", tmp / "collector.bt"
    wrapper.write_text(CAPTURE.format(out=out))
    env = {**os.environ, "TCPIPSTAT_BPFTRACE": f"/bin/sh {wrapper}"}
    subprocess.run([*TCPIPSTAT, "-c", "true"], capture_output=True, check=True, timeout=120,
                   cwd=ROOT, env=env)
    return out.read_text()


def empty_program(collector: str) -> str:
    """The collector's probe points with empty bodies (a predicate that reads a map of the
    collector's is dropped: the map is not there)."""
    heads = (m.group(1).strip() for m in PROBE.finditer(collector))
    return "".join(re.sub(r"/[^/]*@[^/]*/", "", h).strip() + " { }\n" for h in heads)


def floor(args, tmp: Path) -> None:
    """The traffic under empty programs and bt_floor.bt beside untraced and tcpipstat."""
    empty = tmp / "empty.bt"
    empty.write_text(empty_program(host_program(tmp)))
    print("the collector's probes on this host, emptied:\n  "
          + empty.read_text().strip().replace("\n", "\n  "))
    traffic(args, tmp, {"untraced": Mode(ROOT, None),
                        "empty programs": Mode(ROOT, None, empty),
                        "bt_floor.bt": Mode(ROOT, None, ROOT / "bench" / "bt_floor.bt"),
                        "default groups": Mode(ROOT, [])})


def startup(args, tmp: Path) -> None:
    trees = [ROOT] + ([args.compare] if args.compare else [])
    times: dict[Path, list[float]] = {tree: [] for tree in trees}
    for i in range(args.runs):
        for tree in trees[i % len(trees):] + trees[:i % len(trees)]:
            times[tree].append(startup_s(tmp, tree))
        print(f"  (start-up run {i + 1} of {args.runs} done, {load()})")
    print("start-up to collecting (bpftrace attached, -c command started; min / median / max)")
    for tree in trees:
        show("default groups" + (f" ({tree.name})" if tree != ROOT else ""), times[tree], "s")


PARTS = {"startup": startup, "overhead": overhead, "floor": floor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--parts", default="startup,overhead",
                    help=f"{', '.join(PARTS)} (comma-separated)")
    ap.add_argument("--compare", type=Path, metavar="TREE",
                    help="another tcpipstat tree (a worktree of an older commit) to measure")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"--parts: {', '.join(sorted(set(parts) - set(PARTS)))}: not one of "
                 f"{', '.join(PARTS)}")
    if os.geteuid() != 0:
        raise SystemExit("bpf_bench: needs root (bpftrace loads BPF programs)")
    missing = [tool for tool in ("bpftrace", "iperf3", "cc", "ss") if not shutil.which(tool)]
    if missing:     # (a missing iperf3 left the workload waiting for its server for ever)
        raise SystemExit(f"bpf_bench: needs {', '.join(missing)} (apt-get install ...)")
    if args.compare is not None:
        args.compare = args.compare.resolve()
        if not (args.compare / "tcpipstat" / "__main__.py").is_file():
            raise SystemExit(f"bpf_bench: --compare {args.compare}: no tcpipstat tree there")
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo")
                if x.startswith("model name")), "?")
    print(f"native: kernel {platform.release()}, {os.cpu_count()} CPUs ({cpu}), "
          f"runs {args.runs}, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bpf-bench-") as tmp:
        for part in parts:
            PARTS[part](args, Path(tmp))


if __name__ == "__main__":
    main()
