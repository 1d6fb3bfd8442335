"""tcpipstat --read on small scripted captures (tests/capture_helpers.py writes them with
dpkt), each made to show one way a capture can mislead the analysis: an ACK that follows a
resend of acknowledged data (Karn's rule), packets the network delivered twice, a duplicate
ACK whose sender's data in flight the capture has not seen yet (a capture at the receiver),
and connections the capture joined after their handshake. Exact values, worked out by hand
from each script, and tcptrace's output on the same files (recorded by
tests/fixtures/capture/refresh.sh; compared again here when tcptrace is installed)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tcpipstat.capture.flows import FlowTable

from .capture_helpers import (ACK_, PSH_, Dialogue, accuracy_captures, compare, dupacks_problems,
                              ours, pair, synthetic_capture, tcptrace_rows, trim_tcptrace_csv,
                              write_pcap)
from .conftest import FIXTURES, run_cli

CAP = FIXTURES / "capture"


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    return accuracy_captures(tmp_path_factory.mktemp("scripted"))


def _one(path, *extra) -> dict:
    (row,) = ours(path, *extra)
    return row["counters"]


def _tcptrace(name: str) -> dict:
    (row,) = tcptrace_rows((CAP / f"scripted-{name}.tcptrace.csv").read_text())
    return row


def test_no_rtt_sample_from_an_ack_after_acknowledged_data_was_resent(caps):
    """A (acknowledged after 20 ms), B, A again, B acknowledged 30 ms after it was sent, C
    (20 ms): the ACK of B may answer the resent A, so B gives no sample. Samples: the SYN
    (10 ms), A, C and the FIN (10 ms)."""
    c = _one(caps["karn"])
    assert (c["RttSamples"], c["RttMin"], c["RttAvg"], c["RttMax"]) == (4, 10.0, 15.0, 20.0)
    assert (c["RetransSegs"], c["RetransBytes"], c["SendBytes"]) == (1, 1000, 3000)
    t = _tcptrace("karn")
    assert (t["RTT_samples_a2b"], t["RTT_max_a2b"], t["RTT_avg_a2b"]) == ("4", "20.0", "15.0")


def test_network_duplicates_are_counted_apart(caps):
    """A data segment and a duplicate ACK each seen twice (the same IP ID): one NetDups each
    way; the real resend of B and the real duplicate ACK are counted once each; A, sent once,
    keeps its 20 ms sample (with the SYN's and the FIN's: 3)."""
    c = _one(caps["netdup"])
    assert (c["NetDups"], c["InNetDups"]) == (1, 1)
    assert (c["OutSegs"], c["InSegs"]) == (8, 5)
    assert (c["RetransSegs"], c["RetransBytes"], c["SendBytes"]) == (1, 1000, 3000)
    assert (c["InDupAcks"], c["DupAcks"]) == (1, 0)
    assert (c["RttSamples"], c["RttMax"]) == (3, 20.0)
    # tcptrace counts the duplicates as hardware duplicates and also as packets, resends
    # (and then no RTT sample for A) and duplicate ACKs
    t = _tcptrace("netdup")
    assert (t["hardware_dups_a2b"], t["hardware_dups_b2a"]) == ("1", "1")
    assert (t["total_packets_a2b"], t["rexmt_data_pkts_a2b"], t["RTT_samples_a2b"]) == \
        ("9", "2", "2")
    status, out, _ = run_cli("--read", str(caps["netdup"]))
    assert status == 0 and "2 packets were seen twice" in " ".join(out.split())


def test_ip_id_zero_tells_no_duplicate(tmp_path):
    """Packets with IP ID 0 (or IPv6: no ID) are never network duplicates: the same segment
    twice is a retransmission."""
    t = FlowTable()
    src, dst = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    t.add(0.0, (2, src, 1000, dst, 80, 100, 0, 0x02, 500, 0, 0))
    for ts in (0.1, 0.2):
        t.add(ts, (2, src, 1000, dst, 80, 101, 1, ACK_, 500, 1000, 0))
    (conn,) = t.connections()
    c = conn.counters()
    assert (c["OutSegs"], c["RetransSegs"], c.get("NetDups", 0)) == (3, 1, 0)


@pytest.mark.parametrize("end", ["sender", "receiver"])
def test_duplicate_acks_count_alike_at_either_end(caps, end):
    """The server answers a spurious resend with a duplicate ACK. At the client's end the
    three later segments are outstanding when it arrives; at the server's end they have not
    arrived yet, and the resend is what shows the client held data unacknowledged."""
    path = caps[f"dsack-{end}"]
    c = _one(path)
    assert (c["InDupAcks"], c["DupAcks"], c["RetransSegs"], c["SendBytes"]) == (1, 0, 1, 6000)
    assert not dupacks_problems(ours(path), path)
    # tcptrace counts it at both ends too (its b2a count is the client's FIN, which it takes
    # for a duplicate ACK)
    t = _tcptrace(f"dsack-{end}")
    assert t["duplicate_acks_a2b"] == "1"


def test_a_keepalive_answer_is_no_duplicate_ack(tmp_path):
    """A keep-alive that carries the last acknowledged byte again, and its answer repeating
    the previous ACK: nothing was outstanding, so no duplicate ACK (the byte is resent)."""
    d = Dialogue(40020, 22)
    d.handshake(1.0, 0.010)
    d.send(1.03, "c", 1, 1, PSH_ | ACK_, 100)
    d.send(1.05, "s", 1, 101, ACK_)
    d.send(9.05, "c", 100, 1, ACK_, 1)                 # the keep-alive
    d.send(9.07, "s", 1, 101, ACK_)                    # its answer
    path = write_pcap(tmp_path / "keepalive.pcap", d.frames())
    c = _one(path)
    assert (c["InDupAcks"], c["RetransSegs"], c["RetransBytes"]) == (0, 1, 1)
    assert not dupacks_problems(ours(path), path)


def test_dupacks_follow_the_documented_definition(tmp_path):
    """DupAcks and InDupAcks of every connection of the recorded and the synthetic captures
    are what the man page's definition gives, counted straight from the packets."""
    syn = tmp_path / "synthetic.pcap"
    synthetic_capture(syn)
    for path in (CAP / "lo.pcap", syn):
        rows = ours(path)
        assert not dupacks_problems(rows, path), path
    assert sum(r["counters"]["DupAcks"] for r in ours(syn)) == 10


def test_a_capture_begun_mid_stream_orients_connections_by_port(caps):
    """Four connections without their handshake: the lower port is the server's whichever
    side sent first (80 and 8080 from the server, 443 from the client, 514 and 1023 both
    below 1024); the fifth has its handshake."""
    rows = ours(caps["midstream"])
    got = sorted((r["lport"], r["rport"], r["opened_during_collection"]) for r in rows)
    assert got == [(1023, 514, False), (40010, 80, False), (40011, 443, False),
                   (40012, 8080, False), (40013, 80, True)]
    assert sorted(r["lport"] for r in ours(caps["midstream"], "*:*-*:80")) == [40010, 40013]
    status, out, _ = run_cli("--read", str(caps["midstream"]), "index=rport")
    flat = " ".join(out.split())
    assert status == 0 and "4 connections began before the capture (no SYN or SYN-ACK seen)" in flat
    assert "the lower port taken as the server's (remote)" in flat
    c = {r["lport"]: r["counters"] for r in rows}
    # what the server sent is In whichever packet came first
    assert c[40010]["RecvBytes"] == c[40012]["RecvBytes"] == c[40011]["RecvBytes"] == 1000
    assert c[40011]["SendBytes"] == 300 and c[40010]["SendBytes"] == 0


def test_equal_ports_keep_the_first_sender_as_local():
    t = FlowTable()
    a, b = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    t.add(0.0, (2, b, 7000, a, 7000, 5, 9, ACK_, 500, 100, 7))
    (conn,) = t.connections()
    assert (conn.laddr, conn.raddr) == (b, a)


@pytest.mark.parametrize("name", ["karn", "netdup", "dsack-sender", "dsack-receiver",
                                  "midstream"])
def test_scripted_captures_agree_with_tcptrace(caps, name):
    """Every count and time within tests/capture_helpers.py's tolerances of tcptrace's
    recorded output, whichever side tcptrace took for a (it takes the first packet's
    sender)."""
    pairs = pair(ours(caps[name]), tcptrace_rows((CAP / f"scripted-{name}.tcptrace.csv")
                                                 .read_text()))
    problems = [p for o, t, local in pairs for p in compare(o, t, local)]
    assert not problems, "\n".join(problems)
    assert len(pairs) == (5 if name == "midstream" else 1)


@pytest.mark.skipif(not shutil.which("tcptrace"), reason="tcptrace is not installed")
@pytest.mark.parametrize("name", ["karn", "netdup", "dsack-sender", "dsack-receiver",
                                  "midstream"])
def test_recorded_tcptrace_output_is_tcptraces(caps, name):
    """The recorded tcptrace output is what the installed tcptrace says of the captures the
    helpers write now (so the comparison above is with tcptrace, not with a stale file)."""
    res = subprocess.run(["tcptrace", "-l", "-r", "-n", "--csv", caps[name].name],
                         cwd=caps[name].parent, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    recorded = (CAP / f"scripted-{name}.tcptrace.csv").read_text()
    assert trim_tcptrace_csv(res.stdout) == recorded
