"""Native tier: the host reconciliation of a real bpftrace run on this host, read from the
tool's own output (tcpipstat/reconcile.py).

tcpipstat and its workload (tests/bpf_workload.py) run in a network namespace of their
own: the host counters tcpipstat reads are that namespace's, which nothing but the workload
uses, and --netns keeps its sockets. In the machine's own namespace other test suites open
hundreds of connections a second, and what falls in the milliseconds between the
collector's moments and tcpipstat's readings (RECONCILIATION in the man page) would make
the remainder differ from run to run.
"""
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest

from .conftest import json_rows
from .test_native_bpftrace import ROOT, WORKLOAD, _native

CONNS = 3
OPENS = ("ActiveOpens", "PassiveOpens")


@contextmanager
def _namespace():
    """A fresh network namespace (its loopback up): its name and its inode."""
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("needs iproute2's ip")
    name = f"tcpipstat-recon-{id(object())}"
    subprocess.run([ip, "netns", "add", name], check=True)
    try:
        inside = [ip, "netns", "exec", name]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        inode = subprocess.run([*inside, "stat", "-L", "-c", "%i", "/proc/self/ns/net"],
                               check=True, capture_output=True, text=True).stdout.strip()
        yield inside, inode
    finally:
        subprocess.run([ip, "netns", "del", name], check=True)


def _free_port(inside: list[str]) -> int:
    """A port the namespace's kernel hands out (no fixed ports, even there)."""
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(subprocess.run([*inside, sys.executable, "-c", code], check=True,
                              capture_output=True, text=True).stdout)


def _reconciled(filters=lambda port: []) -> tuple[dict, list[dict], int]:
    """A run around the workload in its namespace, ``filters(port)`` given: the
    reconciliation, the rows, the workload's port."""
    with _namespace() as (inside, inode):
        port = _free_port(inside)
        res = subprocess.run(
            [*inside, sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--json",
             "--all-processes", "--netns", inode, *filters(port), "-c",
             f"{sys.executable} {WORKLOAD} 127.0.0.1 {port} {CONNS} 1000 100"],
            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.splitlines()[-1])
    return last["reconciliation"], json_rows(res.stdout), port


@pytest.mark.native
def test_match_everything_leaves_no_open_unattributed():
    _native()
    rec, rows, port = _reconciled()
    assert rec["source"] == "local", rec
    for name in OPENS:
        assert rec["counters"][name] == {"host": CONNS, "attributed": CONNS,
                                         "not_attributed": 0, "mib": [f"Tcp.{name}"]}, rec
    # the rows are the workload's own: the clients' and the server's sockets
    assert sorted((r["counters"]["ActiveOpens"], r["counters"]["PassiveOpens"])
                  for r in rows) == [(0, 1)] * CONNS + [(1, 0)] * CONNS, rows


@pytest.mark.native
def test_the_remainder_is_what_the_filter_left_out():
    """The server's end only: the clients' opens are the namespace's, not the report's."""
    _native()
    rec, rows, port = _reconciled(lambda port: [f"*:{port}-*:*"])
    assert {r["lport"] for r in rows} == {port}, rows
    c = rec["counters"]
    assert (c["ActiveOpens"]["host"], c["ActiveOpens"]["attributed"],
            c["ActiveOpens"]["not_attributed"]) == (CONNS, 0, CONNS), rec
    assert (c["PassiveOpens"]["host"], c["PassiveOpens"]["attributed"],
            c["PassiveOpens"]["not_attributed"]) == (CONNS, CONNS, 0), rec
