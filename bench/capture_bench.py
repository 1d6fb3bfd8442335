#!/usr/bin/env python3
"""Benchmark: tcpipstat --read beside tcptrace, on the same generated captures.

Generates captures (pcap, Ethernet, 96-byte snapshots as tcpdump -s 96 writes) of
--packets packets (default 2,000,000) of TCP traffic: connections that open, send a
request, get a response of a few to a few thousand segments acknowledged every second
segment, lose a segment now and then (the capture misses it; the server resends it after
three duplicate ACKs: out of order at the capture point) or resend one spuriously (a
retransmission the capture sees twice), and close. Two shapes: ``many`` keeps 200
connections open at a time and opens new ones as they close (many short connections);
``long`` runs 20 connections for the whole capture.

On each capture it runs, --runs times, interleaved (one of each, then again):

* tcpipstat --read FILE --json > /dev/null on its compiled path (TCPIPSTAT_READER=compiled)
  and on its pure-Python one (=python): the whole run, Python's start-up included, with
  byte-compiled modules as an installed package has them;
* tcptrace -l -r -n --csv FILE > /dev/null (what tests/test_capture.py compares with);

and prints for each the median wall time and packets per second, the median CPU time
(user + system: what the run cost one core, whatever else the machine was doing) and
packets per second of it, the largest peak memory (maximum resident set size), and the
ratio of tcpipstat's rates to tcptrace's. Last, memory per connection: the difference
of peak memory between the two captures over the difference of their connections.

    python3 bench/capture_bench.py [--packets 2000000] [--runs 3] [--keep DIR]

Figures measured on the project's machine are in bench/capture_results.md.
"""
from __future__ import annotations

import argparse
import heapq
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

SNAPLEN = 96
MSS = 1448
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_ETH = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
_IP = struct.Struct(">BBHHHBBH4s4s")
_TCP = struct.Struct(">HHIIBBHHH")
_TS_OPT = b"\x01\x01\x08\x0a" + b"\x00" * 8          # NOP NOP timestamps: a 32-byte TCP header


def _packet(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
            payload: int, ipid: int, win: int = 502) -> tuple[bytes, int]:
    tlen = 20 + 32 + payload
    ip = _IP.pack(0x45, 0, tlen, ipid & 0xFFFF, 0x4000, 64, 6, 0, src, dst)
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 8 << 4, flags, win, 0,
                    0) + _TS_OPT
    frame = _ETH + ip + tcp
    return frame[:SNAPLEN], len(frame) + payload


def connection(rng: random.Random, cid: int, t0: float, segments: int):
    """One connection's packets, (time, frame, wire length), in time order, as the
    client's side sees them."""
    cli = bytes([10, 1, (cid >> 8) & 0xFF, cid & 0xFF])
    srv = bytes([10, 2, 0, 1 + cid % 200])
    cport, sport = 20000 + cid % 40000, 80 if cid % 3 else 443
    rtt = rng.uniform(0.001, 0.05)
    gap = rng.uniform(0.00002, 0.0002)
    ic, isv = rng.getrandbits(32), rng.getrandbits(32)
    ids = [rng.getrandbits(16), rng.getrandbits(16)]

    def c2s(t, seq, ack, flags, n=0):
        ids[0] += 1
        return (t, *_packet(cli, srv, cport, sport, seq, ack, flags, n, ids[0]))

    def s2c(t, seq, ack, flags, n=0):
        ids[1] += 1
        return (t, *_packet(srv, cli, sport, cport, seq, ack, flags, n, ids[1]))

    t = t0
    yield c2s(t, ic, 0, SYN)
    t += rtt
    yield s2c(t, isv, ic + 1, SYN | ACK)
    t += 0.00001
    yield c2s(t, ic + 1, isv + 1, ACK)
    t += 0.00001
    yield c2s(t, ic + 1, isv + 1, PSH | ACK, 300)
    cseq = ic + 301
    t += rtt
    base = isv + 1
    lost = None                                   # the segment the capture never saw
    for i in range(segments):
        seq = base + i * MSS
        t += gap
        r = rng.random()
        if r < 0.002 and lost is None and i + 4 < segments:
            lost = seq                            # lost before the capture point
            continue
        yield s2c(t, seq, cseq, ACK, MSS)
        if r > 0.998:                             # a spurious retransmission, seen twice
            yield s2c(t + gap / 2, seq, cseq, ACK, MSS)
        if lost is not None:
            yield c2s(t + 0.00001, cseq, lost, ACK)       # duplicate ACK
            if seq >= lost + 3 * MSS:             # fast retransmit after three of them
                t += rtt / 2
                yield s2c(t, lost, cseq, ACK, MSS)
                lost = None
                yield c2s(t + 0.00001, cseq, seq + MSS, ACK)
        elif i % 2:
            yield c2s(t + 0.00001, cseq, seq + MSS, ACK)
    end = base + segments * MSS
    if lost is not None:
        t += rtt
        yield s2c(t, lost, cseq, ACK, MSS)
    t += gap
    yield s2c(t, end, cseq, FIN | ACK)
    t += 0.00001
    yield c2s(t, cseq, end + 1, FIN | ACK)
    t += rtt
    yield s2c(t, end + 1, cseq + 1, ACK)


def generate(path: Path, packets: int, concurrent: int, shape: str,
             seed: int = 1) -> tuple[int, int]:
    """Writes the capture; returns (packets, connections)."""
    rng = random.Random(seed)
    out = open(path, "wb", buffering=1 << 20)
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, 1))
    pack = struct.Struct("<IIII").pack
    heap: list = []
    cid = 0
    long_segments = packets // max(1, concurrent) * 2 // 3

    def start(t0: float) -> None:
        nonlocal cid
        cid += 1
        segs = long_segments if shape == "long" else int(rng.paretovariate(1.2) * 8) % 3000 + 2
        g = connection(rng, cid, t0, segs)
        first = next(g)
        heapq.heappush(heap, (first[0], cid, first, g))

    t = 1_700_000_000.0
    for i in range(concurrent):
        start(t + i * 0.0001)
    n = 0
    while heap and n < packets:
        ts, c, (pt, frame, wirelen), g = heapq.heappop(heap)
        sec = int(pt)
        out.write(pack(sec, int((pt - sec) * 1e6), len(frame), wirelen))
        out.write(frame)
        n += 1
        nxt = next(g, None)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], c, nxt, g))
        elif shape == "many":
            start(pt + 0.0001)
    out.close()
    return n, cid


class Run(NamedTuple):
    wall: float           # seconds
    cpu: float            # seconds of user and system time
    rss: int              # KiB, the maximum resident set size


def timed(argv: list[str], env: dict | None = None, expect: str = "") -> Run:
    """One run of ``argv``, its output thrown away; ``expect``: a line its stderr must hold
    (which path tcpipstat took). GNU time starts it: a process forked from this one would
    count this one's memory in its peak until it runs the tool."""
    gnu_time = shutil.which("time")
    if gnu_time is None:
        raise SystemExit("GNU time is needed to measure peak memory (apt-get install time)")
    with tempfile.NamedTemporaryFile("r") as stats:
        t0 = time.perf_counter()
        proc = subprocess.run([gnu_time, "-o", stats.name, "-f", "%U %S %M", *argv], env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)        # (cwd: python3 -m imports from there first)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or expect not in proc.stderr:
            raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr}")
        user, system, rss = stats.read().split()
    return Run(wall, float(user) + float(system), int(rss))


def tools(path: Path) -> dict[str, tuple[list[str], dict | None, str]]:
    """name -> (command, environment, what its stderr must say)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "tcpipstat", "--read", str(path), "--json"]
    out = {}
    for name, reader, note in (("tcpipstat (compiled)", "compiled", "the compiled reader"),
                               ("tcpipstat (pure Python)", "python", "the pure-Python reader")):
        out[name] = (cmd, {**env, "TCPIPSTAT_READER": reader}, note)
    out["tcptrace"] = (["tcptrace", "-l", "-r", "-n", "--csv", str(path)], None, "")
    return out


def measure(path: Path, runs: int) -> dict[str, list[Run]]:
    """Every tool ``runs`` times, interleaved, after one unmeasured run of tcpipstat (which
    byte-compiles its modules, as installing it does)."""
    cmds = tools(path)
    if not shutil.which("tcptrace"):
        raise SystemExit("tcptrace is not installed (apt-get install tcptrace)")
    timed(*cmds["tcpipstat (compiled)"])
    results: dict[str, list[Run]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            results[name].append(timed(*cmd))
    return results


def report(n: int, results: dict[str, list[Run]]) -> None:
    print(f"  {'':24} {'wall s':>7} {'packets/s':>11} {'cpu s':>7} {'packets/s cpu':>13} "
          f"{'peak RSS':>9}")
    rates = {}
    for name, rs in results.items():
        wall, cpu = median(r.wall for r in rs), median(r.cpu for r in rs)
        rates[name] = (n / wall, n / cpu)
        print(f"  {name:24} {wall:7.2f} {n / wall:11,.0f} {cpu:7.2f} {n / cpu:13,.0f} "
              f"{max(r.rss for r in rs) / 1024:6.0f} MiB")
    tt = rates["tcptrace"]
    for name in ("tcpipstat (compiled)", "tcpipstat (pure Python)"):
        w, c = rates[name]
        print(f"  {name} / tcptrace: {w / tt[0]:.2f}x packets/s (wall), {c / tt[1]:.2f}x (cpu)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--packets", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=3, help="runs of each tool (median)")
    ap.add_argument("--keep", metavar="DIR", help="write the captures here and keep them")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    where = Path(args.keep or tmp.name)
    peaks = {}
    for shape, concurrent in (("many", 200), ("long", 20)):
        path = where / f"bench-{shape}.pcap"
        t0 = time.perf_counter()
        n, conns = generate(path, args.packets, concurrent, shape)
        print(f"{shape}: {n:,} packets, {conns:,} connections, "
              f"{path.stat().st_size / 2**20:.0f} MiB (generated in "
              f"{time.perf_counter() - t0:.0f} s), {args.runs} runs each, medians:")
        results = measure(path, args.runs)
        report(n, results)
        peaks[shape] = conns, {k: max(r.rss for r in rs) for k, rs in results.items()}
    (c_many, many), (c_long, long_) = peaks["many"], peaks["long"]
    print("memory per connection (peak RSS, many minus long, over their connections):")
    for name in many:
        print(f"  {name:24} {(many[name] - long_[name]) * 1024 / (c_many - c_long):7,.0f} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
