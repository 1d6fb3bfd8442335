#!/usr/bin/env python3
"""Memory of long bpftrace-collector runs under connection churn, natively on this host.

    sudo python3 bench/bt_memory.py [--minutes 10] [--rate 500] [--sample-s 30]
                                    [--modes oneshot,onclose,interval]

Each mode is one run of ``tcpipstat --backend bpftrace --json`` filtered to one loopback
server port, for --minutes, while a workload of its own makes --rate short connections a
second to that port (each from a source address of its own in 127.1.0.0/16: no tuple
comes twice, so a model that keeps what it need not grows with every closed socket):

  oneshot   index=lport: records as sockets are destroyed, one report at the end
  onclose   onclose=1: a row as each socket closes
  interval  --interval 30 index=lport: a snapshot every 30 s

Every --sample-s seconds the resident set of the tcpipstat process (the Python side) and
of its bpftrace are sampled from /proc; a table per mode follows, then what the run
reported of its full kernel maps (--outcome-json: untracked sockets, untracked events,
dropped events, skipped probe hits, lost events). With onclose=1 each row must hold one
connection's counts (100 bytes up, 10 down): rows that hold more are counted.

Needs root and bpftrace. The figures are this host's: say what else ran beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"oneshot": ["index=lport"], "onclose": ["onclose=1"],
         "interval": ["--interval", "30", "index=lport"]}
UP, DOWN = 100, 10          # bytes each connection sends and gets back

CHURN = """import socket, sys, threading, time
port, rate, secs = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
srv = socket.create_server(("127.0.0.1", port), backlog=128)
def serve():
    while True:
        c, _ = srv.accept()
        with c:                     # (the server closes first: TIME-WAIT is its own)
            n = 0
            while n < {up}:
                n += len(c.recv({up}))
            c.sendall(b"r" * {down})
threading.Thread(target=serve, daemon=True).start()
t0, n = time.monotonic(), 0
while time.monotonic() - t0 < secs:
    with socket.socket() as c:
        c.bind(("127.1.%d.%d" % (n // 250 % 250, n % 250 + 1), 0))
        c.connect(("127.0.0.1", port))
        c.sendall(b"s" * {up})
        while c.recv(64):
            pass
    n += 1
    lag = t0 + n / rate - time.monotonic()
    if lag > 0:
        time.sleep(lag)
print(n)
""".format(up=UP, down=DOWN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """A process's resident set (VmRSS), MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child_pid(pid: int, name: str) -> int | None:
    """The child of ``pid`` named ``name`` (tcpipstat's bpftrace)."""
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                if Path(f"/proc/{c}/comm").read_text().strip() == name:
                    return int(c)
    except OSError:
        pass
    return None


class Rows:
    """Reads tcpipstat's stdout (NDJSON) as it comes: rows, and with onclose=1 the rows
    that hold more than one connection's counts."""

    def __init__(self, stream):
        self.rows = self.merged = 0
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            if not line.strip():
                continue
            row = json.loads(line)
            self.rows += 1
            c = row.get("counters", {})
            if row.get("closed") == 1 and row.get("sockets") == 1 and (
                    c.get("SendBytes", 0) + c.get("RecvBytes", 0) > UP + DOWN):
                self.merged += 1


def bpf_programs(pid: int) -> int:
    """BPF programs a process holds open."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog"
            except OSError:
                pass
    except OSError:
        pass
    return n


def wait_collecting(proc: subprocess.Popen, said: deque, timeout: float = 120) -> None:
    """Until tcpipstat's bpftrace holds its programs (then 2 s for the last to attach).
    ``said`` keeps the last lines of its stderr."""
    threading.Thread(target=said.extend, args=(proc.stderr,), daemon=True).start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        bt = child_pid(proc.pid, "bpftrace")
        if bt and bpf_programs(bt):
            time.sleep(2)
            return
        time.sleep(0.1)
    raise SystemExit(f"tcpipstat did not start collecting within {timeout} s")


def run_mode(mode: str, minutes: float, rate: float, every: float, tmp: Path) -> dict:
    port, secs = free_port(), minutes * 60
    outcome = tmp / f"{mode}.json"
    cmd = [sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--json",
           "--outcome-json", str(outcome), f"timeout={secs + 5:g}",
           f"*:{port}-*:*", f"*:*-*:{port}", *MODES[mode]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    said: deque = deque(maxlen=3)
    wait_collecting(proc, said)
    rows = Rows(proc.stdout)
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(port), str(rate), str(secs)],
                             stdout=subprocess.PIPE, text=True)
    samples, t0 = [], time.monotonic()
    while churn.poll() is None:
        bt = child_pid(proc.pid, "bpftrace")
        samples.append((time.monotonic() - t0, rows.rows, rss_mb(proc.pid),
                        rss_mb(bt) if bt else None))
        time.sleep(min(every, max(0.5, secs + 1 - (time.monotonic() - t0))))
    made = int(churn.stdout.read() or 0)
    proc.wait(timeout=600)
    rows.thread.join(60)
    return {"mode": mode, "samples": samples, "connections": made, "rows": rows.rows,
            "merged": rows.merged, "rc": proc.returncode, "said": list(said),
            "outcome": json.loads(outcome.read_text()) if outcome.exists() else {}}


def _mb(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


def report(r: dict) -> None:
    print(f"\n{r['mode']}: {r['connections']:,} connections, {r['rows']:,} rows out, "
          f"exit {r['rc']}")
    if r["rc"]:
        print("  " + "  ".join(r["said"]), end="")
    print(f"  {'t (s)':>6}  {'rows so far':>11}  {'tcpipstat RSS MB':>16}  "
          f"{'bpftrace RSS MB':>15}")
    for t, n, py, bt in r["samples"]:
        print(f"  {t:6.0f}  {n:11,}  {_mb(py):>16}  {_mb(bt):>15}")
    o = r["outcome"]
    print(f"  untracked sockets {o.get('untracked')}, untracked events "
          f"{o.get('untracked_events')}, dropped {o.get('dropped')}, skipped hits "
          f"{o.get('skipped')}, warnings {o.get('warnings')}")
    if r["mode"] == "onclose":
        print(f"  rows holding more than one connection: {r['merged']:,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--sample-s", type=float, default=30)
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args()
    print(f"# {os.uname().release}, {os.cpu_count()} CPUs; {a.rate:g} connections/s for "
          f"{a.minutes:g} min per mode")
    with tempfile.TemporaryDirectory(prefix="tcpipstat-bench-") as tmp:
        for mode in a.modes.split(","):
            report(run_mode(mode, a.minutes, a.rate, a.sample_s, Path(tmp)))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
