#!/usr/bin/env python3
"""Real TCP traffic for the capture tests, recorded with tcpdump.

Run it in a private network namespace, as root (it changes that namespace's
firewall and loopback only, and they vanish with it):

    unshare --net python3 tests/capture_workload.py OUTDIR [--scale small|full] [--snaplen N]

It writes, in OUTDIR:

* ``lo.pcap``: the loopback device (Ethernet link type), ``any-sll2.pcap``: the
  "any" device (Linux cooked v2), ``any-sll.pcap``: the same as Linux cooked v1:
  three recordings of the same packets;
* ``manifest.json``: what each workload did (ports, connections, bytes each way).

The workloads, one per server port (IPv4 unless said):

=====  =======================================================================
7101   uploads; nftables drops every 7th data packet *after* tcpdump saw it (input
       hook): retransmissions in the capture
7102   uploads; nftables drops the data packets whose IP ID ends in 3 (binary 011)
       and the capture leaves out those very packets, as a capture behind a lossy
       hop would: holes that the retransmission fills (out of order)
7103   requests and responses with server think time (IPv4), RTTs of milliseconds
7104   the same over IPv6 ([::1])
7105   an upload to a server with a tiny receive buffer that does not read for a
       while: zero windows
7106   the server closes with unread data: a reset
7199   nothing listens: the SYN is refused with a reset
=====  =======================================================================

Loss comes from nftables rules (numgen), because this kernel has no netem.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SCALES = {
    # upload bytes per connection, connections per upload port, request/response rounds
    "small": dict(upload=200_000, conns=2, rounds=4, zero_window=120_000),
    "full": dict(upload=2_000_000, conns=3, rounds=8, zero_window=400_000),
}
RESPONSE = 100            # bytes each upload server answers with
REQ, RESP = 300, 3000     # request/response sizes (7103, 7104)
THINK_S = 0.02            # server think time per request


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


# port 7102: the capture leaves out exactly the packets nftables drops (the same IP ID bits),
# as a capture taken behind the lossy hop would: the retransmission fills a hole in it
BLIND_SPOT = "not (tcp dst port 7102 and ip[2:2] > 200 and ip[5] & 7 == 3)"


def nft_rules() -> None:
    script = """
table inet tcpipstat_test {
    chain in {
        type filter hook input priority 0; policy accept;
        tcp dport 7101 meta length > 200 numgen inc mod 7 == 3 drop
        tcp dport 7102 meta length > 200 ip id & 0x7 == 0x3 drop
    }
}
"""
    res = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True)
    if res.returncode:
        raise SystemExit(f"nft: {res.stderr.strip()}")


class Recorder:
    """tcpdump on one device, started before the traffic and stopped after it."""

    def __init__(self, path: Path, args: list[str]):
        self.path = path
        self.err = path.with_suffix(".tcpdump.log")
        # a 32 MiB kernel buffer: loopback bursts of 64 KiB packets overflow the default 2 MiB
        self.proc = subprocess.Popen(["tcpdump", "--immediate-mode", "-U", "-n", "-B", "32768",
                                      "-w", str(path), *args],
                                     stdout=subprocess.DEVNULL, stderr=open(self.err, "w"))

    def wait_ready(self) -> None:
        for _ in range(100):
            if "listening on" in self.err.read_text():
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"tcpdump failed: {self.err.read_text()}")
            time.sleep(0.05)
        raise SystemExit("tcpdump did not start listening")

    def stop(self) -> str:
        """Stops it; returns its closing statistics (packets captured, dropped by the kernel)."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)
        log = self.err.read_text()
        self.err.unlink()
        return log


def _serve(sock: socket.socket, n: int, handler) -> threading.Thread:
    def loop():
        threads = []
        for _ in range(n):
            c, _ = sock.accept()
            t = threading.Thread(target=handler, args=(c,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        sock.close()
    t = threading.Thread(target=loop)
    t.start()
    return t


def _listen(family: int, addr: str, port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((addr, port))
    s.listen(16)
    return s


def _drain(c: socket.socket) -> int:
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            return n
        n += len(b)


def upload_server(c: socket.socket) -> None:
    _drain(c)
    c.sendall(b"r" * RESPONSE)
    c.close()


def upload_client(family: int, addr: str, port: int, size: int) -> None:
    c = socket.create_connection((addr, port))
    c.sendall(b"u" * size)
    c.shutdown(socket.SHUT_WR)
    _drain(c)
    c.close()


def rr_server(rounds: int):
    def handler(c: socket.socket) -> None:
        for _ in range(rounds):
            got = 0
            while got < REQ:
                got += len(c.recv(REQ - got))
            time.sleep(THINK_S)
            c.sendall(b"s" * RESP)
        _drain(c)
        c.close()
    return handler


def rr_client(family: int, addr: str, port: int, rounds: int) -> None:
    c = socket.socket(family, socket.SOCK_STREAM)
    c.connect((addr, port))
    for _ in range(rounds):
        c.sendall(b"q" * REQ)
        got = 0
        while got < RESP:
            got += len(c.recv(RESP - got))
        time.sleep(THINK_S / 4)
    c.close()


def slow_server(c: socket.socket) -> None:
    time.sleep(0.4)
    _drain(c)
    c.close()


def reset_server(c: socket.socket) -> None:
    time.sleep(0.1)     # the client's bytes arrive, unread: close() sends a reset
    c.close()


def run_workloads(scale: dict) -> dict:
    V4, V6 = socket.AF_INET, socket.AF_INET6
    n, up = scale["conns"], scale["upload"]
    servers = [
        _serve(_listen(V4, "127.0.0.1", 7101), n, upload_server),
        _serve(_listen(V4, "127.0.0.1", 7102), n, upload_server),
        _serve(_listen(V4, "127.0.0.1", 7103), 1, rr_server(scale["rounds"])),
        _serve(_listen(V6, "::1", 7104), 1, rr_server(scale["rounds"])),
        _serve(_listen(V4, "127.0.0.1", 7105, rcvbuf=2048), 1, slow_server),
        _serve(_listen(V4, "127.0.0.1", 7106), 1, reset_server),
    ]
    for port in (7101, 7102):
        for _ in range(n):
            upload_client(V4, "127.0.0.1", port, up)
    rr_client(V4, "127.0.0.1", 7103, scale["rounds"])
    rr_client(V6, "::1", 7104, scale["rounds"])
    upload_client(V4, "127.0.0.1", 7105, scale["zero_window"])
    c = socket.create_connection(("127.0.0.1", 7106))
    c.sendall(b"x" * 1000)
    try:
        c.recv(10)
    except ConnectionResetError:
        pass
    c.close()
    try:
        socket.create_connection(("127.0.0.1", 7199), timeout=2).close()
    except ConnectionRefusedError:
        pass
    for t in servers:
        t.join(timeout=30)
    rounds = scale["rounds"]
    return {
        "7101": dict(family=4, conns=n, up=up, down=RESPONSE, loss="input"),
        "7102": dict(family=4, conns=n, up=up, down=RESPONSE, loss="before-capture"),
        "7103": dict(family=4, conns=1, up=REQ * rounds, down=RESP * rounds,
                     think_ms=THINK_S * 1000),
        "7104": dict(family=6, conns=1, up=REQ * rounds, down=RESP * rounds,
                     think_ms=THINK_S * 1000),
        "7105": dict(family=4, conns=1, up=scale["zero_window"], down=0, zero_window=True),
        "7106": dict(family=4, conns=1, up=1000, down=0, reset="remote"),
        "7199": dict(family=4, conns=1, up=0, down=0, refused=True),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--scale", choices=SCALES, default="full")
    ap.add_argument("--snaplen", type=int, default=256,
                    help="tcpdump -s (headers are enough; 0: whole packets)")
    args = ap.parse_args()
    for tool in ("tcpdump", "nft", "ip"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing (apt-get install tcpdump nftables iproute2)")
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    sh("ip", "link", "set", "lo", "up")
    nft_rules()
    snap = ["-s", str(args.snaplen)]
    recs = [Recorder(out / "lo.pcap", ["-i", "lo", *snap, BLIND_SPOT]),
            Recorder(out / "any-sll2.pcap", ["-i", "any", "-y", "LINUX_SLL2", *snap, BLIND_SPOT]),
            Recorder(out / "any-sll.pcap", ["-i", "any", "-y", "LINUX_SLL", *snap, BLIND_SPOT])]
    for r in recs:
        r.wait_ready()
    manifest = run_workloads(SCALES[args.scale])
    time.sleep(0.3)
    dropped = {}
    for r in recs:
        log = r.stop()
        m = re.search(r"(\d+) packets? dropped by kernel", log)
        dropped[r.path.name] = int(m.group(1)) if m else None
    # a capture that lost packets is no reference for anything: say so, fail
    if any(v != 0 for v in dropped.values()):
        raise SystemExit(f"tcpdump lost packets (dropped by kernel: {dropped}); run it again")
    manifest = {"scale": args.scale, "snaplen": args.snaplen, "ports": manifest}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run it as root, in a private network namespace: "
                         "unshare --net python3 " + sys.argv[0])
    sys.exit(main())
