"""Tier 1: the compiled --read path (tcpipstat/capture/fast.py and csrc/) against the
pure-Python reference (reader.py, packets.py, flows.py).

* the same output, byte for byte, on every capture fixture with every option and format
  the goldens use (tests/golden_cases.py), and on damaged copies of them;
* the same per-connection state, every field the report reads, on captures made to
  reach every branch: the scripted accuracy captures, generated traffic, every link type
  and pcapng's blocks, frames only dpkt decodes, and random segment streams (with the
  per-direction caps lowered, so that they are reached);
* Ctrl-C, the choice of path (TCPIPSTAT_READER), and memory.

The compiled reader must be built for these to mean anything (``pip install -e .`` builds
it; run-tests does): without it they fail, saying so, rather than compare Python with
itself.
"""
from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tcpipstat.capture as capture
from tcpipstat.capture import analyse, fast, flows
from tcpipstat.errors import ExitStatus
from tcpipstat.filters import parse_filter

from .capture_helpers import accuracy_captures, synthetic_capture, to_pcapng
from .conftest import FIXTURES, ROOT, run_cli
from .golden_cases import cases
from .test_capture import _bench

CAP = FIXTURES / "capture"
READ_CASES = [(name, argv) for name, argv in cases() if argv[0] == "--read"]
NOTE = {"python": "tcpipstat: --read: the pure-Python reader (TCPIPSTAT_READER=python)",
        "compiled": "tcpipstat: --read: the compiled reader (tcpipstat.capture._fast)"}


@pytest.fixture(autouse=True)
def _compiled_reader_is_built():
    if fast._fast is None:
        pytest.fail(f"the compiled reader is not built ({fast.UNAVAILABLE}): `pip install -e .` "
                    "builds it")


def _cli(monkeypatch, reader: str, *argv: str) -> tuple[int, str, str]:
    """tcpipstat on one path: (status, stdout, stderr after the line naming the path; the
    line comes once the capture is read: not when it cannot be read at all)."""
    monkeypatch.setenv("TCPIPSTAT_READER", reader)
    status, out, err = run_cli(*argv)
    if status == ExitStatus.USAGE:
        assert "reader" not in err
        return status, out, err
    note, _, rest = err.partition("\n")
    assert note == NOTE[reader], err
    return status, out, rest


def test_fixtures_are_there():
    """Every capture fixture is in the golden cases: 4 files, 6 variants, 3 formats."""
    names = sorted(p.name for p in CAP.glob("*.pcap*"))
    assert names == ["any-sll.pcap", "any-sll2.pcap", "any-sll2.pcapng", "lo.pcap"]
    assert len(READ_CASES) == 4 * 6 * 3


@pytest.mark.parametrize("name,argv", READ_CASES, ids=[n for n, _ in READ_CASES])
def test_both_paths_print_the_same(monkeypatch, name, argv):
    compiled = _cli(monkeypatch, "compiled", *argv)
    assert compiled == _cli(monkeypatch, "python", *argv)
    assert compiled[0] == ExitStatus.OK


# -- the per-connection state --------------------------------------------------------------

# the fields the report reads, which the compiled path gives (the rest is working state)
CONN_FIELDS = [f for f in fast._fast.ConnState.__match_args__ if f != "halves"] if fast._fast \
    else []
HALF_FIELDS = fast._fast.HalfState.__match_args__ if fast._fast else []


def state(path, reader: str, monkeypatch, filters=(), progress=None) -> tuple:
    """Everything analyse() found: every Conn field the report reads, and the counters it
    shows of each connection (as repr(): 1 and 1.0, 0.0 and -0.0 differ), included."""
    monkeypatch.setenv("TCPIPSTAT_READER", reader)
    cap = analyse(str(path), filters, progress)
    assert cap.reader_note == NOTE[reader].removeprefix("tcpipstat: ")
    conns = [(tuple(getattr(c, f) for f in CONN_FIELDS),
              tuple(tuple(getattr(h, f) for f in HALF_FIELDS) for h in c.halves),
              repr(list(cap.flows.counters(c).items())))
             for c in cap.connections()]
    return (cap.read, cap.decoded, cap.malformed, cap.first_ts, cap.last_ts, cap.interrupted,
            cap.interrupted_at, cap.flows.rejected, cap.notes(), conns)


def same_state(path, monkeypatch, filters=()) -> tuple:
    """The state both paths find (asserted equal)."""
    compiled = state(path, "compiled", monkeypatch, filters)
    assert compiled == state(path, "python", monkeypatch, filters)
    return compiled


def test_fixture_state_is_the_same(monkeypatch):
    st_ = same_state(CAP / "lo.pcap", monkeypatch)
    read, decoded, conns = st_[0], st_[1], st_[-1]
    assert (read.frames, read.cut, decoded.tcp, len(conns)) == (242, 107, 242, 9)


def test_filters_refuse_the_same_connections(monkeypatch):
    filters = (parse_filter("*:*-*:7101"), parse_filter("[::1]:*-*:*"))
    st_ = same_state(CAP / "lo.pcap", monkeypatch, filters)
    assert st_[7] == 6 and len(st_[-1]) == 3


def test_scripted_and_generated_captures(tmp_path, monkeypatch):
    paths = list(accuracy_captures(tmp_path).values())
    paths.append(tmp_path / "synthetic.pcap")
    assert synthetic_capture(paths[-1], 20_000) == 20_000
    assert [len(same_state(p, monkeypatch)[-1]) for p in paths] == [1, 1, 1, 1, 5, 279]


# -- every link type and pcapng's blocks; frames only dpkt decodes ----------------------------

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
A6, B6 = bytes(15) + b"\x01", bytes(15) + b"\x02"
SYN, FIN, RST, ACK = 0x02, 0x01, 0x04, 0x10


def tcp(sport: int, dport: int, seq: int, ack: int, flags: int, n: int = 0, off: int = 5,
        win: int = 502) -> bytes:
    opts = b"\x01" * (4 * off - 20) if off > 5 else b""
    return struct.pack(">HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, win, 0,
                       0) + opts + b"\x00" * n


def ip4(payload: bytes, src=A4, dst=B4, p: int = 6, ipid: int = 7, frag: int = 0x4000,
        hl: int = 5, length: int | None = None, ver: int = 4) -> bytes:
    opts = b"\x01" * (4 * hl - 20) if hl > 5 else b""
    n = 20 + len(opts) + len(payload) if length is None else length
    return struct.pack(">BBHHHBBH4s4s", ver << 4 | hl, 0, n, ipid, frag, 64, p, 0, src,
                       dst) + opts + payload


def ip6(payload: bytes, src=A6, dst=B6, nxt: int = 6, plen: int | None = None) -> bytes:
    return struct.pack(">IHBB16s16s", 0x60000000, len(payload) if plen is None else plen, nxt,
                       64, src, dst) + payload


def v4_packets() -> list[bytes]:
    """A connection over IPv4 in every shape dpkt reads, then frames it does not read as
    TCP: fragments, cut or impossible headers, other protocols."""
    c, s = 40000, 80
    return [
        ip4(tcp(c, s, 1000, 0, SYN)),
        ip4(tcp(s, c, 5000, 1001, SYN | ACK), src=B4, dst=A4, hl=6),       # IP options
        ip4(tcp(c, s, 1001, 5001, ACK, off=8)),                             # TCP options
        ip4(tcp(c, s, 1001, 5001, ACK, 100), ipid=8, length=0),            # offload: no length
        ip4(tcp(s, c, 5001, 1101, ACK, 100), src=B4, dst=A4) + b"\0" * 6,  # padded
        ip4(tcp(s, c, 5101, 1101, ACK, 20), src=B4, dst=A4, length=1040),  # cut by snaplen
        ip4(tcp(c, s, 1101, 5101, ACK, 50), ipid=9, frag=0x2000),          # first fragment
        ip4(b"\0" * 40, ipid=9, frag=185),                                 # a later one
        ip4(tcp(c, s, 1151, 5101, ACK, 50))[:30],                           # cut in TCP
        ip4(tcp(c, s, 1151, 5101, ACK, off=4)),                             # bad TCP offset
        ip4(tcp(c, s, 1151, 5101, ACK, 30), length=30),                     # IP length too short
        ip4(struct.pack(">HHHH", 53, 53, 18, 0) + b"x" * 10, p=17),        # UDP
        ip4(b"\x08\x00\x00\x00\x00\x01\x00\x01", p=1),                     # ICMP
        ip4(b"\0" * 40, hl=4),                                              # bad IP header length
        ip4(tcp(c, s, 1151, 5101, FIN | ACK), ipid=10),
        ip4(tcp(c, s, 1151, 5101, FIN | ACK), ipid=10),                     # seen twice
        ip4(tcp(s, c, 5101, 1152, FIN | ACK), src=B4, dst=A4, ipid=0),
        ip4(tcp(c, s, 1152, 5102, ACK), ipid=11),
        ip4(tcp(c, 41000, 1, 0, RST)),                                      # a lone reset
    ]


def v6_packets() -> list[bytes]:
    c, s = 40001, 443
    hop_by_hop = b"\x06\x00" + b"\x01\x04\x00\x00\x00\x00"                # then TCP
    return [
        ip6(tcp(c, s, 7, 0, SYN)),
        ip6(tcp(s, c, 90, 8, SYN | ACK), src=B6, dst=A6),
        ip6(hop_by_hop + tcp(c, s, 8, 91, ACK, 200), nxt=0),               # extension header
        ip6(tcp(s, c, 91, 208, ACK, 300), src=B6, dst=A6, plen=0),         # jumbo / offload
        ip6(b"\x06\x00\x00\xb9\x00\x00\x00\x01" + b"\0" * 30, nxt=44),     # a later fragment
        ip6(struct.pack(">HHHH", 53, 53, 12, 0) + b"abcd", nxt=17),        # UDP
        ip6(tcp(c, s, 208, 391, ACK, 10))[:50],                             # cut
        ip6(tcp(c, s, 208, 391, FIN | ACK, 5)),
    ]


def garbage() -> list[bytes]:
    return [b"", b"\x45", b"\x4f" + bytes(range(63)), b"\x60" + b"\xff" * 39, b"\x51" * 30]


def eth(payload: bytes, etype: int) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack(">H", etype) + payload


def ethernet_frames() -> list[bytes]:
    v4, v6 = v4_packets(), v6_packets()
    vlan = struct.pack(">HH", 0x0064, 0x0800)
    return ([eth(p, 0x0800) for p in v4] + [eth(p, 0x86DD) for p in v6]
            + [eth(vlan + v4[0], 0x8100), eth(b"\0" * 28, 0x0806), eth(b"\0" * 20, 20),
               eth(v4[1], 0x86DD), eth(v6[0], 0x0800), b"\x02" * 10]
            + [eth(g, 0x0800) for g in garbage()])


def cooked_frames(v2: bool) -> list[bytes]:
    def sll(p: bytes, etype: int) -> bytes:
        if v2:
            return struct.pack(">HHiHBB8s", etype, 0, 1, 1, 0, 6, b"") + p
        return struct.pack(">HHH8sH", 0, 1, 6, b"", etype) + p
    return ([sll(p, 0x0800) for p in v4_packets()] + [sll(p, 0x86DD) for p in v6_packets()]
            + [sll(b"\0" * 28, 0x0806), b"\x00" * 12] + [sll(g, 0x0800) for g in garbage()])


def null_frames(big: bool) -> list[bytes]:
    def af(n: int) -> bytes:
        return struct.pack(">I" if big else "<I", n)
    v6 = v6_packets()
    return ([af(2) + p for p in v4_packets()] + [af(n) + p for n, p in zip((10, 24, 28, 30), v6)]
            + [af(30) + p for p in v6[4:]] + [af(7) + v4_packets()[0], af(2)])


FRAMES = {
    1: ethernet_frames,
    113: lambda: cooked_frames(False),
    276: lambda: cooked_frames(True),
    101: lambda: v4_packets() + v6_packets() + garbage(),
    12: lambda: v4_packets() + v6_packets(),
    14: lambda: v4_packets() + v6_packets(),
    228: v4_packets,
    229: v6_packets,
    0: lambda: null_frames(False),
    108: lambda: null_frames(True),
}


def write_pcap(path, linktype: int, frames: list[bytes], snaplen: int = 65535):
    """A little-endian microsecond pcap; a frame longer than snaplen is cut to it."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)]
    for i, f in enumerate(frames):
        out.append(struct.pack("<IIII", 1_700_000_000, i * 1000, min(len(f), snaplen), len(f)))
        out.append(f[:snaplen])
    path.write_bytes(b"".join(out))
    return path


def test_every_link_type_decodes_the_same(tmp_path, monkeypatch):
    """Each link type's frames through both paths. The Ethernet ones counted by hand: 38
    frames; 18 TCP segments (12 of the 19 IPv4 packets, 5 of the 8 IPv6 ones, the
    VLAN-tagged one), 1 IPv4 fragment after the first, 8 cut inside their headers (3
    IPv4, 2 IPv6, the 10-byte frame, 2 of the garbage), 11 others; the compiled decoder
    reads 16 of the TCP segments itself and leaves the 22 odd frames to dpkt."""
    assert set(FRAMES) == set(capture.LINKTYPES)
    calls = _count_fallbacks(monkeypatch)
    for linktype, make in FRAMES.items():
        calls.clear()
        st_ = same_state(write_pcap(tmp_path / f"{linktype}.pcap", linktype, make()),
                         monkeypatch)
        if linktype == 1:
            d = st_[1]
            assert (st_[0].frames, d.tcp, d.fragments, d.cut_headers, d.other) == \
                (38, 18, 1, 8, 11)
            assert len(calls) == 22


def _count_fallbacks(monkeypatch) -> list[int]:
    """The frames the compiled path hands to dpkt, by link type, from now on."""
    calls: list[int] = []
    real = fast._fallback

    def counting(stats):
        decode = real(stats)

        def wrapped(linktype, data):
            calls.append(linktype)
            return decode(linktype, data)
        return wrapped
    monkeypatch.setattr(fast, "_fallback", counting)
    return calls


def test_usual_frames_never_reach_dpkt(monkeypatch):
    calls = _count_fallbacks(monkeypatch)
    for name in ("lo.pcap", "any-sll.pcap", "any-sll2.pcap", "any-sll2.pcapng"):
        state(CAP / name, "compiled", monkeypatch)
    assert calls == []


def test_snapshot_length_cuts_decode_the_same(tmp_path, monkeypatch):
    """The same frames cut to 54, 60 and 96 bytes: inside and after the headers."""
    for snaplen in (54, 60, 96):
        same_state(write_pcap(tmp_path / f"{snaplen}.pcap", 1, ethernet_frames(), snaplen),
                   monkeypatch)
def ng_block(btype: int, body: bytes, order: str) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)


def ng_interface(linktype: int, order: str, tsresol: int | None = None,
                 tsoffset: int | None = None) -> bytes:
    opts = b""
    if tsresol is not None:
        opts += struct.pack(order + "HHB3x", 9, 1, tsresol)
    if tsoffset is not None:
        opts += struct.pack(order + "HHq", 14, 8, tsoffset)
    if opts:
        opts += struct.pack(order + "HH", 0, 0)
    return ng_block(1, struct.pack(order + "HHI", linktype, 0, 65535) + opts, order)


def ng_packets(iface: int, frames: list[bytes], order: str, cut: int = 0) -> list[bytes]:
    """Enhanced packet blocks, 1.5 ms apart in the interface's units; each frame ``cut``
    bytes shorter than on the wire."""
    out = []
    for i, f in enumerate(frames):
        t = 1_700_000_000_000_000 + 1500 * i
        out.append(ng_block(6, struct.pack(order + "IIIII", iface, t >> 32, t & 0xFFFFFFFF,
                                           len(f), len(f) + cut) + f, order))
    return out


def ng_section(order: str) -> bytes:
    return ng_block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def mixed_pcapng() -> bytes:
    """Two sections (little-endian, then big-endian), interfaces of three link types
    tcpipstat reads and one it does not, time stamp units and offsets, simple packet
    blocks, and blocks without packets (name resolution, statistics, a custom one)."""
    le, be = "<", ">"
    eth = ethernet_frames()
    return b"".join([
        ng_section(le), ng_interface(1, le, tsresol=9), ng_interface(147, le),
        ng_interface(101, le, tsresol=0x86, tsoffset=100),
        ng_block(4, b"\x01\x00\x08\x00\x0a\x00\x00\x01host\0\0\0\0", le),
        *ng_packets(0, eth[:20], le), *ng_packets(1, [b"\x01\x02\x03"], le),
        *ng_packets(2, v4_packets()[:6], le, cut=3),
        ng_block(3, struct.pack(le + "I", len(eth[20]) + 4) + eth[20], le),
        ng_block(5, b"\0" * 12, le), ng_block(0x00000BAD, b"\x00\x00\x00\x00ab", le),
        *ng_packets(0, eth[21:], le),
        ng_section(be), ng_interface(276, be, tsresol=6, tsoffset=-5),
        *ng_packets(0, cooked_frames(True), be, cut=1),
        ng_block(3, struct.pack(be + "I", 20) + cooked_frames(True)[0][:20], be),
    ])


def test_pcapng_blocks_read_the_same(tmp_path, monkeypatch):
    path = tmp_path / "mixed.pcapng"
    path.write_bytes(mixed_pcapng())
    st_ = same_state(path, monkeypatch)
    read = st_[0]
    assert read.unknown_link == {147: 1} and read.linktypes == {1, 101, 147, 276}
    assert read.frames == 38 + 1 + 6 + len(cooked_frames(True)) + 1 and not read.stopped
    lo = CAP / "lo.pcap"
    for i, kw in enumerate([{}, {"tsresol_ns": False}, {"extra_iface": 147}]):
        assert to_pcapng(lo, tmp_path / f"{i}.pcapng", **kw) == 242
        same_state(tmp_path / f"{i}.pcapng", monkeypatch)


DAMAGED = [CAP / "lo.pcap", CAP / "any-sll2.pcapng"]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_captures_print_the_same(tmp_path_factory, monkeypatch, data):
    """Bytes changed (anywhere, or in a record's lengths), the file cut anywhere, zeros
    appended: both paths stop at the same place with the same words."""
    which = data.draw(st.sampled_from(["lo.pcap", "any-sll2.pcapng", "mixed.pcapng"]))
    raw = bytearray(mixed_pcapng() if which == "mixed.pcapng" else (CAP / which).read_bytes())
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    raw += bytes(data.draw(st.sampled_from([0, 3, 16, 4096])))
    path = tmp_path_factory.mktemp("damaged") / which
    path.write_bytes(bytes(raw))
    argv = ("--read", str(path), "--json", "nozeros=0")
    assert _cli(monkeypatch, "compiled", *argv) == _cli(monkeypatch, "python", *argv)


# -- random segment streams: every branch of the per-connection state ------------------------

# A stream is a list of steps, each a packet of connection 0, 1 or 2 from its client or its
# server: what it carries is chosen as TCP would (the next bytes, an ACK of all that the
# other side sent, of part of it, or the same ACK again) or not (a resend, a gap, any
# numbers at all), so that ACKs end segments exactly as often as they miss them.
KINDS = ("next", "next", "next", "resend", "gap", "ack", "ack", "ack-part", "ack-again",
         "syn", "syn-ack", "fin", "rst", "any")
STEP = st.tuples(st.sampled_from([0, 1, 2]), st.booleans(), st.sampled_from(KINDS),
                 st.integers(0, 40), st.sampled_from([0, 1, 100, 100, 1000]),
                 st.sampled_from([0, 502, 502, 502]), st.sampled_from([0, 1, 2, 3]),
                 st.integers(0, 5000))
# connection 1 has equal ports (who is the client?), 2 is a socket talking to itself
ENDS = [((A4, 40000), (B4, 80)), ((A4, 5000), (B4, 5000)), ((A4, 7), (A4, 7))]


class Sides:
    """Each side's next sequence offset and last ACK, per connection, as the steps go."""

    def __init__(self):
        self.next: dict = {}
        self.acked: dict = {}

    def numbers(self, me, other, kind: str, k: int, n: int) -> tuple[int, int, int, int]:
        """(flags, sequence offset, acknowledgment offset, payload) of one step."""
        nxt, theirs = self.next.get(me, 0), self.next.get(other, 0)
        ack = self.acked.get(me, theirs)
        flags, seq = ACK | (0x08 if n else 0), nxt
        if kind == "ack":
            ack, n = theirs, 0
        elif kind == "ack-part":
            ack, n = max(0, theirs - 100 * k), 0
        elif kind == "ack-again":
            n = 0
        elif kind == "resend":
            seq = max(0, nxt - 100 * k)
        elif kind == "gap":
            seq = nxt + 100 * k
        elif kind in ("syn", "syn-ack", "fin", "rst"):
            flags = {"syn": SYN, "syn-ack": SYN | ACK, "fin": FIN | ACK, "rst": RST}[kind]
            seq, n = (0, 0) if kind.startswith("syn") else (nxt, n)
        elif kind == "any":
            seq, ack, flags = 100 * k - 1000, 100 * (k * 7 % 41) - 1000, k * 37 % 64
        self.next[me] = max(nxt, seq + n + (flags & (SYN | FIN) != 0))
        self.acked[me] = ack
        return flags, seq, ack, n


def stream_frames(steps, isn: int) -> list[bytes]:
    frames, sides = [], Sides()
    for conn, from_client, kind, k, n, win, ipid, _ in steps:
        (src, sport), (dst, dport) = ENDS[conn] if from_client else ENDS[conn][::-1]
        me, other = (conn, from_client), (conn, not from_client)
        flags, seq, ack, n = sides.numbers(me, other, kind, k, n)
        mine, theirs = (isn, isn + 77_777) if from_client else (isn + 77_777, isn)
        t = tcp(sport, dport, (mine + seq) & 0xFFFFFFFF, (theirs + ack) & 0xFFFFFFFF, flags,
                n, win=win)
        frames.append(eth(ip4(t, src=src, dst=dst, ipid=ipid), 0x0800))
    return frames


def write_stream(path, steps, isn: int):
    """The stream as a pcap, each packet its step's microseconds after the previous one."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    us = 0
    for step, frame in zip(steps, stream_frames(steps, isn)):
        us += step[-1]
        out.append(struct.pack("<IIII", 1_700_000_000 + us // 10**6, us % 10**6, len(frame),
                               len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, max_size=80),
       isn=st.sampled_from([1000, 0xFFFFF000, 0x7FFFFF00, 0xFFFFFFFF]))
def test_random_streams_give_the_same_state(tmp_path, monkeypatch, steps, isn):
    """With the per-direction caps lowered to a few entries, so that dropping the oldest
    pending segments and merging the lowest holes happen too."""
    for mod in (flows, fast):
        monkeypatch.setattr(mod, "MAX_PENDING", 6)
        monkeypatch.setattr(mod, "MAX_HOLES", 3)
    same_state(write_stream(tmp_path / "stream.pcap", steps, isn), monkeypatch)


def test_a_stream_reaches_the_real_caps(tmp_path, monkeypatch):
    """Data the capture never sees acknowledged, then every other segment missing: more
    pending segments than MAX_PENDING and holes than MAX_HOLES, at their real values."""
    n = flows.MAX_PENDING + 100
    steps = [(0, True, "syn", 0, 0, 502, 1, 10)] + [(0, True, "next", 0, 1000, 502, 0, 10)] * n
    steps += [(0, True, "gap", 10, 1000, 502, 0, 10)] * (flows.MAX_HOLES + 10)
    st_ = same_state(write_stream(tmp_path / "caps.pcap", steps, 1000), monkeypatch)
    (conn,) = st_[-1]
    assert conn[1][0][:3] == (len(steps), (len(steps) - 1) * 1000, 0)   # segs, bytes, resent


# -- a connection's counters: csrc/counters.c against flows.counters() ------------------------

# times: any, and the ones nearest to a tie of the rounding to microseconds of milliseconds
TIMES = st.one_of(st.floats(-1e3, 1e10, allow_nan=False),
                  st.integers(-10**9, 10**12).map(lambda n: (n + 0.5) / 1e6),
                  st.sampled_from([0.0, -0.0, 5e-7, -5e-7, 1.5e-6, 2.5e-6, 1e-10]))
OPTIONAL = st.one_of(st.none(), TIMES)
COUNT = st.one_of(st.integers(0, 3), st.integers(0, 2**62))


@st.composite
def half_states(draw):
    counts = [draw(COUNT) for _ in range(12)]          # segs ... fins, rtt_n
    data = draw(st.one_of(st.none(), st.tuples(TIMES, TIMES)))
    return fast._fast.HalfState((*counts, draw(TIMES), draw(TIMES), draw(TIMES),
                                 *(data or (None, None)), draw(OPTIONAL)))


@st.composite
def conn_states(draw):
    return fast._fast.ConnState((2, A4, 1, B4, 2, draw(TIMES), draw(TIMES), draw(st.booleans()),
                                 draw(st.booleans()), draw(st.integers(0, 2)), draw(OPTIONAL),
                                 draw(COUNT), (draw(half_states()), draw(half_states()))))


@settings(max_examples=2000, deadline=None)
@given(conn=conn_states())
def test_compiled_counters_are_flows_counters(conn):
    """Every key, in order, and every value, by repr (1 and 1.0, 0.0 and -0.0 differ)."""
    assert repr(list(fast._fast.counters(conn).items())) == \
        repr(list(flows.counters(conn).items()))


# -- Ctrl-C -----------------------------------------------------------------------------------

def test_ctrl_c_in_progress_stops_both_paths_at_the_same_packet(monkeypatch):
    monkeypatch.setattr(capture, "PROGRESS_EVERY", 10)

    def interrupted_at_100(reader: str):
        calls = []

        def progress(n: int) -> None:
            calls.append(n)
            if n == 100:
                raise KeyboardInterrupt
        return calls, state(CAP / "lo.pcap", reader, monkeypatch, progress=progress)
    calls, st_ = interrupted_at_100("compiled")
    assert (calls, st_) == interrupted_at_100("python")
    assert calls == list(range(10, 101, 10)) and st_[5:7] == (True, 100)
    assert st_[0].frames == 100 and "interrupted (Ctrl-C) after 100 packets" in st_[8][-1]


def _interrupted_while_waiting(tmp_path, reader: str) -> tuple[int, str]:
    """tcpipstat --read of a FIFO that gets lo.pcap whole but stays open, then SIGINT once
    tcpipstat has read it all and waits for more."""
    fifo = tmp_path / "cap.fifo"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-m", "tcpipstat", "--read", str(fifo)], cwd=ROOT,
                         env={**os.environ, "TCPIPSTAT_READER": reader}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_default_sigint)
    assert "is a FIFO: waiting for a writer" in p.stderr.readline()
    with open(fifo, "wb") as w:
        w.write((CAP / "lo.pcap").read_bytes())     # (26 KiB: the pipe holds it)
        w.flush()
        deadline = time.monotonic() + 60
        while _unread(w) or not _wchan(p.pid).endswith("pipe_read"):
            assert time.monotonic() < deadline, "tcpipstat did not read the FIFO"
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    fifo.unlink()
    return p.returncode, out


def _default_sigint() -> None:
    """(A shell without job control starts background commands with SIGINT ignored, and
    then Python never turns it into KeyboardInterrupt: the test's own run may be one.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _unread(w) -> int:
    n = struct.pack("i", 0)
    return struct.unpack("i", fcntl.ioctl(w.fileno(), termios.FIONREAD, n))[0]


def _wchan(pid: int) -> str:
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()


def test_ctrl_c_while_waiting_for_more_reports_every_packet_read(tmp_path):
    """A real SIGINT, while blocked reading: both paths report the 242 packets read."""
    status, out = _interrupted_while_waiting(tmp_path, "compiled")
    assert (status, out) == _interrupted_while_waiting(tmp_path, "python")
    assert status == ExitStatus.INTERRUPTED
    assert "interrupted (Ctrl-C) after 242 packets" in " ".join(out.split())


# -- which path runs ----------------------------------------------------------------------------

def test_unset_takes_the_compiled_path_and_says_nothing(monkeypatch):
    monkeypatch.delenv("TCPIPSTAT_READER", raising=False)
    cap = analyse(str(CAP / "lo.pcap"))
    assert isinstance(cap.flows, fast.Connections) and cap.reader_note == ""
    status, out, err = run_cli("--read", str(CAP / "lo.pcap"), "--json")
    assert status == 0 and "reader" not in err


def test_a_bad_reader_choice_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("TCPIPSTAT_READER", "c\x1b[31m")
    status, out, err = run_cli("--read", str(CAP / "lo.pcap"))
    assert (status, out) == (ExitStatus.USAGE, "")
    assert err == ("tcpipstat: bad TCPIPSTAT_READER 'c\\x1b[31m': expected one of auto, "
                   "compiled, python\n")


def test_without_the_extension_auto_falls_back_and_compiled_is_an_error(monkeypatch):
    monkeypatch.setattr(fast, "_fast", None)
    monkeypatch.setattr(fast, "UNAVAILABLE", "No module named 'tcpipstat.capture._fast'")
    lo = str(CAP / "lo.pcap")
    monkeypatch.delenv("TCPIPSTAT_READER", raising=False)
    assert isinstance(analyse(lo).flows, flows.FlowTable)
    monkeypatch.setenv("TCPIPSTAT_READER", "auto")
    status, out, err = run_cli("--read", lo, "--json")
    assert status == 0 and out.count("\n") == 9
    assert err.splitlines()[0] == ("tcpipstat: --read: the pure-Python reader (the compiled "
                                   "one is not available: No module named "
                                   "'tcpipstat.capture._fast')")
    monkeypatch.setenv("TCPIPSTAT_READER", "compiled")
    status, out, err = run_cli("--read", lo, "--json")
    assert (status, out) == (ExitStatus.ERROR, "")
    assert err.splitlines() == [
        "tcpipstat: TCPIPSTAT_READER=compiled, but the compiled reader is not available: "
        "No module named 'tcpipstat.capture._fast'",
        "tcpipstat: fix: reinstall tcpipstat where a C compiler and Python's headers are "
        "installed (apt-get install gcc python3-dev; pip install .)"]


# -- start-up: dpkt only when needed ---------------------------------------------------------

def test_pcap_magics_are_dpkts():
    """reader.PCAP_MAGICS writes out what dpkt's pcap module says of each magic."""
    from dpkt import pcap
    from tcpipstat.capture.reader import PCAP_MAGICS
    nano = {pcap.TCPDUMP_MAGIC_NANO, pcap.PMUDPCT_MAGIC_NANO}
    assert PCAP_MAGICS == {m: (h.__hdr_len__, h.__hdr_fmt__[0] == "<", m in nano)
                           for m, h in pcap.MAGIC_TO_PKT_HDR.items()}


def test_the_compiled_path_reads_a_pcap_file_without_dpkt():
    """Importing dpkt is a fifth of tcpipstat's start-up: a pcap file of usual frames does
    not need it; a pcapng file does (its interface blocks are read with dpkt)."""
    code = ("import sys; from tcpipstat.capture import analyse; "
            "print(len(analyse(sys.argv[1]).connections()), 'dpkt' in sys.modules)")
    for name, dpkt_loaded in (("lo.pcap", "False"), ("any-sll2.pcapng", "True")):
        out = subprocess.run([sys.executable, "-c", code, str(CAP / name)], cwd=ROOT,
                             env={**os.environ, "TCPIPSTAT_READER": "compiled"},
                             capture_output=True, text=True, check=True).stdout
        assert out.split() == ["9", dpkt_loaded]


# -- memory: flat in the capture's length; per connection, below tcptrace's -------------------

def _peak(path, monkeypatch) -> tuple[int, int]:
    """(traced peak bytes of analyse() on the compiled path, connections)."""
    monkeypatch.setenv("TCPIPSTAT_READER", "compiled")
    tracemalloc.start()
    try:
        cap = analyse(str(path))
        return tracemalloc.get_traced_memory()[1], len(cap.connections())
    finally:
        tracemalloc.stop()


def test_compiled_memory_does_not_grow_with_the_length_of_the_capture(tmp_path, monkeypatch):
    """The engine allocates through Python's raw allocator, so tracemalloc sees it: the same
    four connections, 30k and 120k packets long, take the same memory (the read buffer,
    1 MiB at a time, most of it)."""
    gen = _bench().generate
    peaks = []
    for n in (30_000, 120_000):
        path = tmp_path / f"long{n}.pcap"
        assert gen(path, n, 4, "long")[0] == n
        peak, conns = _peak(path, monkeypatch)
        assert conns == 4
        peaks.append(peak)
    assert peaks[0] > 1 << 20 and peaks[1] < peaks[0] * 1.2, peaks


def test_compiled_memory_per_connection_is_below_tcptraces(tmp_path, monkeypatch):
    """At most 4 KiB per connection (the engine's state and the Conn objects of the report),
    where tcptrace takes 8 KiB (bench/capture_results.md)."""
    gen = _bench().generate
    few, many = tmp_path / "few.pcap", tmp_path / "many.pcap"
    gen(few, 40_000, 4, "long")
    gen(many, 40_000, 200, "many")
    (p0, n0), (p1, n1) = _peak(few, monkeypatch), _peak(many, monkeypatch)
    assert n1 - n0 > 500
    assert (p1 - p0) / (n1 - n0) < 4096, (p1 - p0) / (n1 - n0)
