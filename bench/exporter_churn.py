#!/usr/bin/env python3
"""The exporter's memory over a long run of connection churn, natively with bpftrace.

    sudo python3 bench/exporter_churn.py [--minutes 15] [--rate 50] [--every 30]
                                         [--max-series 1000] [--serve-restarts 100]

Starts ``tcpipstat --serve 127.0.0.1:0 --backend bpftrace index=rport`` filtered to a
loopback server's port, then opens and closes --rate connections a second to that server
(each from the ephemeral port the kernel picks: thousands of distinct remote ports, far more
than --max-series) for --minutes. Every --every seconds it prints tcpipstat's resident memory
(VmRSS of its process; bpftrace's beside it) and what /metrics says: collector restarts,
windows added, label sets with series, label sets folded, and the connections counted so far
(PassiveOpens over every series), which must equal the connections made once the last window
is in, when no collector ended meanwhile (a restart loses the ended one's last window).
The figures are this host's: say what else ran beside them.
"""
from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def scrape(url: str) -> dict[str, float]:
    """Per metric name, the sum of its samples."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.split("{")[0].split()[0], float(line.rsplit(" ", 1)[1])
                out[name] = out.get(name, 0.0) + value
    return out


class Churn:
    """A loopback server and a client that connects, sends, reads the reply and closes,
    --rate times a second, on threads; ``made`` counts the connections completed."""

    def __init__(self, rate: float):
        self.server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.server.getsockname()[1]
        self.rate, self.made, self.stop = rate, 0, threading.Event()
        self.threads = [threading.Thread(target=f) for f in (self._serve, self._connect)]

    def _serve(self) -> None:
        self.server.settimeout(0.5)
        while not self.stop.is_set():
            try:
                c, _ = self.server.accept()
            except TimeoutError:
                continue
            with c:
                c.recv(100)
                c.sendall(b"r" * 10)

    def _connect(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            with socket.create_connection(("127.0.0.1", self.port)) as c:
                c.sendall(b"s" * 100)
                c.recv(100)
            self.made += 1
            pause = start + self.made / self.rate - time.monotonic()
            if pause > 0:
                self.stop.wait(pause)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
                t.join()


def start_exporter(port: int, args, log) -> tuple[subprocess.Popen, str]:
    """tcpipstat --serve, its standard error into ``log`` (a file: read, it never fills)."""
    argv = ["--serve", "127.0.0.1:0", "--backend", "bpftrace", "index=rport", "--max-series",
            str(args.max_series), "--serve-restarts", str(args.serve_restarts), f"*:{port}-*:*"]
    p = subprocess.Popen([sys.executable, "-m", "tcpipstat", *argv], cwd=ROOT, stderr=log,
                         text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        m = re.search(r"^tcpipstat: serving (\S+)$", Path(log.name).read_text(), re.M)
        if m:
            return p, m.group(1)
        time.sleep(0.1)
    p.kill()
    sys.exit(f"tcpipstat did not serve: {Path(log.name).read_text()}")


def wait_up(url: str) -> None:
    """Until the collector runs (tcpipstat_up 1): churn before that would not be counted."""
    deadline = time.time() + 120
    while scrape(url).get("tcpipstat_up") != 1:
        if time.time() > deadline:
            sys.exit("tcpipstat_up stayed 0 for 120 s")
        time.sleep(0.2)


def row(t: float, p: subprocess.Popen, url: str, made: int) -> str:
    m = {k: 0.0 for k in ("tcpipstat_passive_opens_total", "tcpipstat_label_sets")}
    m.update(scrape(url))
    bpf = sum(rss_kib(c) for c in children(p.pid))
    return (f"{t / 60:6.1f} {made:9d} {m['tcpipstat_passive_opens_total']:9.0f} "
            f"{m['tcpipstat_collector_restarts_total']:4.0f} "
            f"{m['tcpipstat_windows_total']:7.0f} {m['tcpipstat_label_sets']:6.0f} "
            f"{m['tcpipstat_folded_label_sets_total']:8.0f} {rss_kib(p.pid) / 1024:9.1f} "
            f"{bpf / 1024:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--rate", type=float, default=50, help="connections a second")
    ap.add_argument("--every", type=float, default=30, help="seconds between samples")
    ap.add_argument("--max-series", type=int, default=1000)
    ap.add_argument("--serve-restarts", type=int, default=100,
                    help="tcpipstat's (bpftrace 0.17 can abort printing a map under churn)")
    args = ap.parse_args()
    churn = Churn(args.rate)
    log = tempfile.NamedTemporaryFile("w+", prefix="exporter-churn-", suffix=".log")
    p, url = start_exporter(churn.port, args, log)
    try:
        wait_up(url)
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} kernel {subprocess.getoutput('uname -r')}, "
              f"{args.rate:g} connections/s for {args.minutes:g} min, --max-series "
              f"{args.max_series}")
        print("   min     conns   counted rest windows series   folded  RSS(MiB)  bpftrace")
        churn.start()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            print(row(time.monotonic() - t0, p, url, churn.made), flush=True)
            time.sleep(min(args.every, max(0.0, end - time.monotonic())))
        churn.end()
        settled = time.time() + 60      # (the last connections are in the next window)
        while (scrape(url).get("tcpipstat_passive_opens_total", 0) < churn.made
               and time.time() < settled):
            time.sleep(0.5)
        print(row(time.monotonic() - t0, p, url, churn.made), flush=True)
    finally:
        churn.end()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        churn.server.close()
        # (what tcpipstat said besides its serving line: collectors that ended, and why)
        said = Path(log.name).read_text().splitlines()
        print("".join(f"# {x}\n" for x in said if "ended while serving" in x), end="")


if __name__ == "__main__":
    main()
