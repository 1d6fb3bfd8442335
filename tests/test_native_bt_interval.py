"""The bpftrace collector's interval snapshots, full tables and version check
(tcpipstat/bpftrace.py, tcpipstat/bt_templates/tcpipstat.bt.j2).

Tier 1 (no kernel): the program's formats print 64 bits. Tier "3n" (``@pytest.mark.native``,
gated as in tests/test_native_bpftrace.py): real runs on this host's kernel against
loopback workloads whose bytes and sockets are known.
"""
from __future__ import annotations

import ipaddress
import re
import time

import pytest

from tcpipstat import bpftrace
from tcpipstat.plan import build_plan
from tcpipstat.records import Header, SocketRecord, Trailer, parse_text

from .test_native_bpftrace import _free_port, _ipv6, _native, _run, _workload


# ---- tier 1 ----
def test_formats_print_64_bits():
    """bpftrace's %d and %x print 32 bits: a byte count past 4 GiB or an IPv6 half would
    be cut. Every number the program prints is %ld or %lx."""
    program = bpftrace.render_program(build_plan(["--backend", "bpftrace", "-c", "true"]))
    formats = re.findall(r'printf\("((?:[^"\\]|\\.)*)"', program)
    assert len(formats) >= 3
    for f in formats:
        assert not re.search(r"%[dx]", f), f
    assert any("%lx" in f for f in formats) and any("%ld" in f for f in formats)


def test_times_move_to_the_wall_clock():
    offset = bpftrace.boot_to_wall_ms()
    assert abs(time.time() * 1000 - (time.clock_gettime(time.CLOCK_BOOTTIME) * 1000 + offset)) < 50
    line = "H\ttcpipstat\t2\t0.3\t1500\t0\t64\tSendBytes\n"
    assert bpftrace.shift_ms(line, 4, 1000) == line.replace("1500", "2500")
    assert bpftrace.shift_ms("H\tx\n", 4, 1000) == "H\tx\n"     # (the parser names it)


# ---- tier 3n: real runs on this kernel ----
@pytest.mark.native
def test_ipv4_mapped_addresses_and_wall_clock_times(tmp_path):
    """An IPv6 socket talking to ::ffff:127.0.0.1 has 0xffff7f000001 in its address's low
    half: more than 32 bits, printed whole. The run's start and end are times of day."""
    _native()
    if not _ipv6():
        pytest.skip("no IPv6 here")
    host, port, saved = "::ffff:127.0.0.1", _free_port(), tmp_path / "run.records"
    began = time.time() * 1000
    rows = _run([f"*:*-*:{port}", f"*:{port}-*:*", "--save-records", str(saved),
                 "-c", _workload(host, port, 2, 1000, 100)])
    ended = time.time() * 1000
    assert len(rows) == 4
    for r in rows:
        mapped = ipaddress.ip_address(host)
        assert r["family"] == "ipv6" and {r["laddr"], r["raddr"]} == {str(mapped)}, r
        assert r["counters"]["SendBytes"] in (1000, 100)
    recs = parse_text(saved.read_text())
    (head,) = [x for x in recs if isinstance(x, Header)]
    (trailer,) = [x for x in recs if isinstance(x, Trailer)]
    assert began - 1000 <= head.start_ms <= trailer.end_ms <= ended + 1000, (began, ended)
    assert sum(isinstance(x, SocketRecord) for x in recs) == 4
