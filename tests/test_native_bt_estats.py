"""--rfc4898 with the bpftrace collector: the RFC 4898 variables of each connection as it
closes (tcpipstat/bpftrace.py, BT_EVARS; the template's estats_record).

The workload (tests/bpf_estats_workload.py) reads getsockopt(TCP_INFO) of each socket
once the socket is in CLOSE, when the collector reads it and after which nothing changes
it: each variable TCP_INFO shows must then be equal, and the others agree across the two
ends of a connection or with the bytes the workload sent.

Tier 1 (no kernel): the output of a real run of bpftrace on the CI host, with that run's
TCP_INFO (tests/fixtures/bpftrace/refresh-rfc4898.sh records both), is joined and
parsed into the E records; the pieces of a record are joined whatever comes between
them; a variable this kernel lacks is left out and n/a. Tier "3n" (``TCPIPSTAT_NATIVE=1``,
root): the same against a live run.
"""
from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import pytest

from tcpipstat import bpftrace
from tcpipstat.estats import EVARS
from tcpipstat.plan import build_plan
from tcpipstat.records import EstatsRecord, parse_text

from .test_native_bpftrace import _free_port, _ipv6, _native, _run

FIX = Path(__file__).resolve().parent / "fixtures" / "bpftrace"
RECORDED = FIX / "rfc4898.bpftrace.out"
TCP_INFO = FIX / "rfc4898.tcp_info.ndjson"
STRUCTS = FIX / "rfc4898.structs.txt"
RECORDED_HZ = 250           # CONFIG_HZ of the kernel the fixtures were recorded on
SEND, REPLY = 300000, 1000  # each client's bytes up, the server's down (refresh-rfc4898.sh)
WORKLOAD = Path(__file__).resolve().parent / "bpf_estats_workload.py"


def _ms(us: int, hz: int) -> int:
    """TCP_INFO's microseconds (jiffies_to_usecs()) as the collector's milliseconds."""
    jiffies = round(us * hz / 10**6)
    return jiffies * 1000 // hz


def from_tcp_info(info: dict, hz: int) -> dict:
    """The variables as getsockopt(TCP_INFO) shows them (tcp_get_info())."""
    mss, opts = info["snd_mss"], info["options"]
    ssthresh = info["snd_ssthresh"]
    return {
        "SegsOut": info["segs_out"], "DataSegsOut": info["data_segs_out"],
        "DataOctetsOut": info["bytes_sent"], "SegsRetrans": info["total_retrans"],
        "OctetsRetrans": info["bytes_retrans"], "SegsIn": info["segs_in"],
        "DataSegsIn": info["data_segs_in"], "SmoothedRTT": info["rtt"],
        "CurRTO": _ms(info["rto"], hz), "CurMSS": mss, "CurCwnd": info["snd_cwnd"] * mss,
        "CurSsthresh": None if ssthresh >= 0x7FFFFFFF else ssthresh * mss,
        "PipeSize": (info["unacked"] - info["sacked"] - info["lost"] + info["retrans"]) * mss,
        "Timeouts": info["total_rto"], "CurRwinSent": info["rcv_wnd"],
        "CurRwinRcvd": info["snd_wnd"], "SndLimTimeRwin": _ms(info["rwnd_limited"], hz),
        "SndLimTimeSnd": _ms(info["sndbuf_limited"], hz),
        "MinRTT": None if info["min_rtt"] == 0xFFFFFFFF else info["min_rtt"],
        "MSSSent": info["advmss"], "WinScaleSent": info["wscale"] >> 4,
        "WinScaleRcvd": info["wscale"] & 15, "SACK": int(bool(opts & 2)),
        "TimeStamps": opts & 1, "ECN": int(bool(opts & 8)), "DSACKDups": info["dsack_dups"],
        "MaxReordering": info["reordering"], "ThruOctetsAcked": info["bytes_acked"],
        "ThruOctetsReceived": info["bytes_received"],
    }


def check_connections(got: dict[tuple[int, int], dict], infos: list[dict], hz: int,
                      send: int, reply: int) -> None:
    """Each socket's variables (``got``, by (lport, rport)) against its TCP_INFO, its
    peer's and the workload's bytes."""
    assert len(got) == len(infos)
    for info in infos:
        v = got[info["lport"], info["rport"]]
        peer = got[info["rport"], info["lport"]]
        assert list(v) == [e.name for e in EVARS]
        expected = from_tcp_info(info, hz)
        assert {k: v[k] for k in expected} == expected, info
        # not in TCP_INFO: everything was acknowledged; each end's next sequence number is
        # what the other expects; the MSS the peer sent in its SYN is its advmss before
        # tcp_input.c took the timestamp option (12 octets) off it
        assert v["SndUna"] == v["SndNxt"] == peer["RcvNxt"]
        assert v["MSSRcvd"] == peer["MSSSent"] + 12 * v["TimeStamps"]
        assert v["MaxRwinRcvd"] >= v["CurRwinRcvd"]
        # the workload's bytes: a client's acknowledged octets count its SYN and FIN, a
        # server's its FIN (its SYN was acknowledged before the socket existed); the octets
        # received count the peer's FIN
        out, back, syn = (send, reply, 1) if info["role"] == "client" else (reply, send, 0)
        assert v["DataOctetsOut"] == out + v["OctetsRetrans"]
        assert (v["ThruOctetsAcked"], v["ThruOctetsReceived"]) == (out + 1 + syn, back + 1)


def _runner() -> bpftrace.Runner:
    plan = build_plan(["--backend", "bpftrace", "--rfc4898"])
    available, _ = bpftrace.counters(plan.groups)
    return bpftrace.Runner(["bpftrace"], available, plan.max_sockets, print)


def _joined(lines: list[str]) -> tuple[list, list[str]]:
    """The records a Runner makes of bpftrace's output ``lines``, and its warnings."""
    runner = _runner()
    runner.stream = lambda: iter(lines)       # (the recorded output, not a process)
    text = "".join(runner.lines())
    return parse_text(text, RECORDED.name), runner.outcome.warnings


def _estats(records) -> dict[tuple[int, int], dict]:
    return {(r.tuple.lport, r.tuple.rport): r.values for r in records
            if isinstance(r, EstatsRecord)}


# ---- tier 1: a recorded run ----
def test_recorded_run_makes_the_e_records_tcp_info_shows():
    records, warnings = _joined(RECORDED.read_text().splitlines(keepends=True))
    infos = [json.loads(x) for x in TCP_INFO.read_text().splitlines()]
    assert not warnings and len(infos) == 6
    check_connections(_estats(records), infos, RECORDED_HZ, SEND, REPLY)
    families = sorted(r.tuple.family for r in records if isinstance(r, EstatsRecord))
    assert families == [2, 2, 2, 2, 10, 10]


def test_pieces_are_joined_whatever_comes_between():
    """bpftrace reads each CPU's output apart: another CPU's lines, pieces of another
    socket's record among them, can come between two pieces of one record."""
    lines = RECORDED.read_text().splitlines(keepends=True)
    pieces = [x for x in lines if x.startswith("e\t")]
    others = [x for x in lines if not x.startswith("e\t")]
    head, rest = others[0], others[1:]
    by_socket: dict[str, list[str]] = {}
    for p in pieces:
        by_socket.setdefault(p.split("\t")[1], []).append(p)
    mixed, rng = [], random.Random(4898)
    queues = list(by_socket.values())
    while any(queues):
        q = rng.choice([q for q in queues if q])
        mixed.append(q.pop(0))
    records, _ = _joined([head, *mixed, *rest])
    assert _estats(records) == _estats(_joined(lines)[0])


def test_a_record_that_lost_a_piece_is_left_out_and_told():
    lines = RECORDED.read_text().splitlines(keepends=True)
    lost = next(i for i, x in enumerate(lines) if x.startswith("e\t") and "\t2/" in x)
    records, warnings = _joined(lines[:lost] + lines[lost + 1:])
    assert len(_estats(records)) == 5
    assert warnings == ["1 RFC 4898 records lost a piece (left out)"]


def test_every_variable_is_read_where_the_btf_has_its_members():
    members = bpftrace.btf_members(STRUCTS.read_text())
    assert {"tcp_sock.total_rto", "tcp_options_received.sack_ok", "minmax_sample.v",
            "inet_connection_sock.icsk_rto"} <= members
    est = bpftrace.estats_read(members, RECORDED_HZ)
    assert est.names == tuple(v.name for v in EVARS) and not est.left_out
    assert list(bpftrace.BT_EVARS) == [v.name for v in EVARS]


def test_a_member_the_kernel_lacks_leaves_its_variable_out():
    """Linux before 6.7 has no tp->total_rto: Timeouts is left out of the program and
    written -1 (n/a); unknown HZ leaves out what the kernel keeps in jiffies."""
    members = bpftrace.btf_members(STRUCTS.read_text()) - {"tcp_sock.total_rto"}
    est = bpftrace.estats_read(members, RECORDED_HZ)
    assert est.left_out == {"Timeouts": "not in this kernel's BTF: tcp_sock.total_rto"}
    program = bpftrace.render_program(build_plan(["--backend", "bpftrace", "--rfc4898"]),
                                      estats=est)
    assert "total_rto" not in program and "Timeouts=" not in program
    assert "rtt_min.s[0].v" in program and "/ 250" in program
    no_hz = bpftrace.estats_read(members | {"tcp_sock.total_rto"}, 0)
    assert set(no_hz.left_out) == {"CurRTO", "SndLimTimeRwin", "SndLimTimeSnd"}
    assert no_hz.left_out["CurRTO"] == "HZ unknown (no kernel config)"
    last = -(-len(no_hz.names) // bpftrace.ESTATS_PIECE)        # (pieces after the head)
    join = bpftrace.EstatsJoin()
    line = join.add(f"e\tffff1\t0/{last}\tE\t2\t0\t7f000001\t80\t0\t7f000001\t4000\t99\n")
    for i in range(1, last + 1):
        chunk = no_hz.names[(i - 1) * bpftrace.ESTATS_PIECE:i * bpftrace.ESTATS_PIECE]
        line = join.add(f"e\tffff1\t{i}/{last}\t" + "\t".join(f"{n}=7" for n in chunk) + "\n")
    head = "H\ttcpipstat\t2\t0.1.0\t0\t0\t8192\tSendBytes\n"
    (rec,) = [r for r in parse_text(head + line) if isinstance(r, EstatsRecord)]
    assert rec.values["CurRTO"] is None and rec.values["SndLimTimeSnd"] is None
    assert rec.values["SegsOut"] == 7 and len(rec.values) == len(EVARS)


def test_kernel_hz_comes_from_the_kernel_config(tmp_path):
    gz, boot = tmp_path / "config.gz", tmp_path / "config-6.1.0-test"
    boot.write_text("# CONFIG_HZ_100 is not set\nCONFIG_HZ=300\n")
    assert bpftrace.kernel_hz((gz, boot)) == 300           # (no config.gz)
    with gzip.open(gz, "wt") as f:
        f.write("CONFIG_HZ_1000=y\nCONFIG_HZ=1000\n")
    assert bpftrace.kernel_hz((gz, boot)) == 1000
    assert bpftrace.kernel_hz((tmp_path / "none.gz", tmp_path / "none")) == 0


def test_rfc4898_program_holds_no_user_text():
    a = build_plan(["--backend", "bpftrace", "--rfc4898", "10.1.2.0/24:8000..8080-*:*"])
    b = build_plan(["--backend", "bpftrace", "--rfc4898", "[2001:db8::/32]:*-*:4433"])
    est = bpftrace.estats_read(None, RECORDED_HZ)
    text = bpftrace.render_program(a, estats=est)
    assert text == bpftrace.render_program(b, estats=est) and 'printf("e\\t%lx\\t0/4\\tE\\t' in text
    for word in ("8000", "8080", "10.1.2", "2001", "4433"):
        assert word not in text
    assert "printf(\"e" not in bpftrace.render_program(
        build_plan(["--backend", "bpftrace"]))


# ---- tier 3n: a live run on this kernel ----
@pytest.mark.native
def test_this_kernel_lets_bpftrace_read_every_variable():
    _native()
    est = bpftrace.host_estats(["bpftrace"])
    assert est.left_out == {} and est.hz == bpftrace.kernel_hz() > 0


@pytest.mark.native
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_variables_at_close_are_those_tcp_info_shows(host, tmp_path):
    _native()
    if ":" in host and not _ipv6():
        pytest.skip("no IPv6 loopback here")
    port, out = _free_port(host), tmp_path / "tcp_info.ndjson"
    conns, send, reply = 3, 200000, 3000
    rows = _run(["--rfc4898", f"*:*-*:{port}", f"*:{port}-*:*", "-c",
                 f"{sys.executable} {WORKLOAD} {host} {port} {conns} {send} {reply} {out}"])
    infos = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(infos) == 2 * conns and len(rows) == 2 * conns
    got = {(r["lport"], r["rport"]): r["rfc4898"] for r in rows}
    check_connections(got, infos, bpftrace.kernel_hz(), send, reply)
    for r in rows:     # (the collector's own counters agree with the workload too)
        c = r["counters"]
        mine = (send, reply) if r["rport"] == port else (reply, send)
        assert (c["SendBytes"], c["RecvBytes"]) == mine
