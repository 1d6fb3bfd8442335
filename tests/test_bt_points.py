"""Tier 1: the bpftrace collector's choice of probe points per kernel (tcpipstat/bt_points.py),
on what bpftrace really listed (``bpftrace -lv``, the listing files in tests/fixtures/bpftrace/:
the lab's 6.1 guest with bpftrace 0.17, its 6.12 guest with 0.23, this CI host's 6.18 with
0.17), and its runtime warnings as bpftrace 0.23 wrote them."""
from __future__ import annotations

import pytest

from tcpipstat import bpftrace
from tcpipstat.bt_points import Choice, KernelPoints, choose, parse_listing
from tcpipstat.plan import build_plan

from .conftest import FIXTURES

BT = FIXTURES / "bpftrace"


def _points(name: str) -> KernelPoints:
    return KernelPoints(parse_listing((BT / f"listing-{name}.txt").read_text()))


@pytest.mark.parametrize("kernel, want", [
    # 6.1: no sock_*_length tracepoints (Linux 6.3), fexit on tcp_sendmsg/tcp_recvmsg
    ("bookworm", Choice("kretfunc:tcp_sendmsg", "kretfunc:tcp_recvmsg", False, True)),
    ("trixie", Choice("tracepoint:sock:sock_send_length", "tracepoint:sock:sock_recv_length",
                      False, True)),
    ("native-6.18", Choice("tracepoint:sock:sock_send_length",
                           "tracepoint:sock:sock_recv_length", True, True)),
])
def test_choice_per_kernel(kernel, want):
    assert choose(_points(kernel)) == want


def test_listing_fields_and_kfunc_spellings():
    """bpftrace 0.17 lists kfunc:vmlinux:NAME, 0.23 fentry:vmlinux:NAME: both are kfunc:NAME."""
    old, new = _points("bookworm"), _points("trixie")
    for p in (old, new):
        assert p.has_field("kfunc:tcp_sendmsg", "retval") and p.has_field("kfunc:tcp_sendmsg", "sk")
        assert p.has_field("tracepoint:sock:inet_sock_set_state", "newstate")
        assert p.has_field("tracepoint:tcp:tcp_probe", "saddr")      # (saddr[28]: the name)
    assert not old.has("tracepoint:sock:sock_send_length")
    assert not _points("native-6.18").has("kfunc:tcp_sendmsg")     # (no trampolines here)


def test_a_kernel_without_a_point_makes_its_counters_unavailable():
    none = choose(KernelPoints({}))
    available, unavailable = bpftrace.counters(("socket", "tcp"), none.missing)
    assert {"SendBytes", "SendMsgs", "RecvBytes", "RecvMsgs"} <= set(unavailable)
    assert "ActiveOpens" in available and not set(available) & set(unavailable)


def test_program_per_kernel_uses_its_points():
    plan = build_plan(["--backend", "bpftrace"])
    old = bpftrace.render_program(plan, choose(_points("bookworm")))
    new = bpftrace.render_program(plan, choose(_points("native-6.18")))
    assert "kretfunc:tcp_sendmsg" in old and "sock_send_length" not in old
    assert "tracepoint:tcp:tcp_retransmit_skb {" in old
    assert "tracepoint:sock:sock_send_length" in new and "kretfunc" not in new
    assert "tracepoint:tcp:tcp_retransmit_skb /args->err == 0/" in new
    for text in (old, new):
        assert "tracepoint:tcp:tcp_destroy_sock" in text


def test_runtime_warnings_are_not_records():
    """bpftrace 0.23 warns on stdout, in four lines, of each delete() of a missing key."""
    r = bpftrace.Runner(["true"], ("SendBytes",), 10, print)
    lines = (BT / "runtime-warning-0.23.out").read_text().splitlines(keepends=True)
    assert list(r._records(iter(lines))) == ["H\tok\n", "@a[1]: 1\n"]
    assert r.outcome.warnings == []
    other = [x.replace("Can't delete map element because it does not exist.", "map full")
             for x in lines]
    r = bpftrace.Runner(["true"], ("SendBytes",), 10, print)
    assert list(r._records(iter(other))) == ["H\tok\n", "@a[1]: 1\n"]
    assert r.outcome.warnings == ["map full"]


def test_check_says_where_this_kernel_counts(tmp_path, monkeypatch):
    """--check asks bpftrace (here a stand-in answering with the 6.1 guest's real listing)
    and names the points it would use."""
    fake = tmp_path / "bpftrace"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = -lv ] && cat '{BT / 'listing-bookworm.txt'}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TCPIPSTAT_BPFTRACE", str(fake))
    monkeypatch.setattr(bpftrace.os, "geteuid", lambda: 0)
    findings, available, _ = bpftrace.BpftraceBackend.checks(
        bpftrace.os.uname().release, True, ("socket", "tcp"), None)
    (points,) = [f for f in findings if f.name == "probe points"]
    assert "sends at kretfunc:tcp_sendmsg" in points.detail
    assert "receives at kretfunc:tcp_recvmsg" in points.detail
    assert "SendBytes" in available
