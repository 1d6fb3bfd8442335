"""Tier "3n": the counters the bpftrace collector takes from a tracepoint other than the
socket's own (OutRsts: tcp:tcp_send_reset), for real on this host's kernel, against a
workload with a known count and this host's /proc/net/snmp.

Each connect() to a port nothing listens on is answered by one reset, sent without a
socket (tcp_v4_send_reset()/tcp_v6_send_reset() with no sock): charged to the tuple of
the segment it answers, the closed port's side. The host may send other resets
meanwhile (other suites run here): the kernel's delta is at least the workload's, and the
closed port's rows hold exactly the workload's.
"""
from __future__ import annotations

import sys

import pytest

from tcpipstat.bt_points import choose, list_points

from .test_native_bpftrace import _free_port, _ipv6, _native, _run, _snmp

pytestmark = pytest.mark.native
REFUSED = """import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    try:
        socket.create_connection((host, port)).close()
    except ConnectionRefusedError:
        pass
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_resets_to_a_closed_port(host, tmp_path):
    _native()
    if ":" in host and not _ipv6():
        pytest.skip("no IPv6 loopback here")
    if choose(list_points(["bpftrace"])).rsts != "tracepoint":
        pytest.skip("this kernel's tcp:tcp_send_reset misses resets without a socket")
    port, n = _free_port(host), 5
    script = tmp_path / "refused.py"
    script.write_text(REFUSED)
    before = _snmp()
    rows = _run(["--all-processes", f"*:{port}-*:*", f"*:*-*:{port}",
                 "-c", f"{sys.executable} {script} {host} {port} {n}"])
    delta = _snmp()["OutRsts"] - before["OutRsts"]
    closed = [r for r in rows if r["lport"] == port]
    assert len(closed) == n and all(r["counters"]["OutRsts"] == 1 for r in closed), closed
    assert all(r["processes"] == [] and r["rport"] != port for r in closed)
    assert sum(r["counters"]["OutRsts"] for r in rows) == n <= delta, delta
    # the refused client sockets (each its own row: its port is read even after it went)
    # sent none, each attempt failed, and each received its reset
    clients = [r for r in rows if r["rport"] == port]
    assert [(r["counters"]["AttemptFails"], r["counters"]["OutRsts"]) for r in clients] == [
        (1, 0)] * n, clients
    assert sorted(r["lport"] for r in clients) == sorted(r["rport"] for r in closed)


def test_a_filter_keeps_the_resets_it_names(tmp_path):
    """Counts by tuple obey the filters as the sockets' counts do."""
    _native()
    if choose(list_points(["bpftrace"])).rsts != "tracepoint":
        pytest.skip("this kernel's tcp:tcp_send_reset misses resets without a socket")
    port, other, n = _free_port(), _free_port(), 3
    script = tmp_path / "refused.py"
    script.write_text(REFUSED)
    cmd = (f"{sys.executable} {script} 127.0.0.1 {port} {n}; "
           f"{sys.executable} {script} 127.0.0.1 {other} {n}")
    rows = _run([f"*:{port}-*:*", "-c", cmd, "--all-processes"])
    assert {r["lport"] for r in rows} == {port}
    assert sum(r["counters"]["OutRsts"] for r in rows) == n
