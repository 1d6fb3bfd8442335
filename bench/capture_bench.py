#!/usr/bin/env python3
"""Benchmark: tcpipstat --read on a large capture, beside tcptrace; dpkt beside scapy.

Generates a capture (pcap, Ethernet, 96-byte snapshots as tcpdump -s 96 writes) of
--packets packets (default 1,000,000) of TCP traffic: connections that open, send
a request, get a response of a few to a few thousand segments acknowledged every
second segment, lose a segment now and then (the capture misses it; the server
resends it after three duplicate ACKs: out of order at the capture point) or resend
one spuriously (a retransmission the capture sees twice), and close. ``--shape
many`` keeps --concurrent connections open at a time and opens new ones as they
close (many connections); ``--shape long`` runs --concurrent connections for the
whole capture (memory must stay flat: it does not grow with the capture's length).

Then it prints, for the same file:

* tcpipstat --read (the whole path: read, decode, flows, rows, NDJSON to /dev/null):
  packets per second and peak memory (maximum resident set size of the process);
* tcptrace -l -r -n --csv: packets per second (when tcptrace is installed);
* decoding alone (read each packet, get addresses, ports, sequence numbers, flags)
  with dpkt and with scapy (--scapy-packets of them: scapy is slow), and with
  Python's struct module for scale.

    python3 bench/capture_bench.py [--packets 1000000] [--shape many|long] [--keep FILE]

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


def run_tcpipstat(path: Path) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of tcpipstat --read PATH --json > /dev/null."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tcpipstat", "--read", str(path), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tcpipstat failed: {err}")
    return dt, usage.ru_maxrss


def run_tcptrace(path: Path) -> float | None:
    if not shutil.which("tcptrace"):
        return None
    t0 = time.perf_counter()
    subprocess.run(["tcptrace", "-l", "-r", "-n", "--csv", str(path)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def decode_dpkt(path: Path, limit: int) -> tuple[int, float]:
    import dpkt
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for ts, buf in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(buf).data
            tcp = ip.data
            (ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.win, ip.len)
            n += 1
            if n >= limit:
                break
    return n, time.perf_counter() - t0


def decode_scapy(path: Path, limit: int) -> tuple[int, float] | None:
    try:
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether
        from scapy.utils import RawPcapReader
    except ImportError:
        return None
    n = 0
    t0 = time.perf_counter()
    for buf, _meta in RawPcapReader(str(path)):
        p = Ether(buf)
        ip, tcp = p[IP], p[TCP]
        (ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.window, ip.len)
        n += 1
        if n >= limit:
            break
    return n, time.perf_counter() - t0


def decode_struct(path: Path, limit: int) -> tuple[int, float]:
    n = 0
    rec, ipt = struct.Struct("<IIII"), struct.Struct(">BBH4x4x4s4s")
    tcpt = struct.Struct(">HHIIBBH")
    t0 = time.perf_counter()
    with open(path, "rb", buffering=1 << 20) as f:
        f.read(24)
        while n < limit:
            h = f.read(16)
            if len(h) < 16:
                break
            buf = f.read(rec.unpack(h)[2])
            ipt.unpack_from(buf, 14)
            tcpt.unpack_from(buf, 14 + (buf[14] & 15) * 4)
            n += 1
    return n, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--concurrent", type=int, default=200, help="connections open at a time")
    ap.add_argument("--shape", choices=("many", "long"), default="many")
    ap.add_argument("--scapy-packets", type=int, default=200_000, help="packets scapy decodes")
    ap.add_argument("--keep", metavar="FILE", help="write the capture here and keep it")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.keep) if args.keep else Path(tmp.name) / "bench.pcap"
    t0 = time.perf_counter()
    n, conns = generate(path, args.packets, args.concurrent, args.shape)
    size = path.stat().st_size
    print(f"capture: {n:,} packets, {conns:,} connections, {size / 2**20:.0f} MiB, "
          f"shape={args.shape} (generated in {time.perf_counter() - t0:.1f} s)")
    dt, rss = run_tcpipstat(path)
    print(f"tcpipstat --read --json : {dt:6.1f} s  {n / dt:>10,.0f} packets/s  "
          f"peak memory {rss / 1024:.0f} MiB")
    tt = run_tcptrace(path)
    if tt is not None:
        print(f"tcptrace -l -r --csv    : {tt:6.1f} s  {n / tt:>10,.0f} packets/s")
    else:
        print("tcptrace: not installed (apt-get install tcptrace)")
    print("decoding only (read each packet; addresses, ports, sequence numbers, flags):")
    k, d = decode_dpkt(path, n)
    print(f"  dpkt   {k:>9,} packets {d:6.1f} s  {k / d:>10,.0f} packets/s")
    sc = decode_scapy(path, min(n, args.scapy_packets))
    if sc is None:
        print("  scapy  not installed (pip install scapy)")
    else:
        k, d = sc
        print(f"  scapy  {k:>9,} packets {d:6.1f} s  {k / d:>10,.0f} packets/s")
    k, d = decode_struct(path, n)
    print(f"  struct {k:>9,} packets {d:6.1f} s  {k / d:>10,.0f} packets/s  "
          "(no library: for scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
