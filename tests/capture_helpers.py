"""Helpers of the capture tests: tcptrace's CSV, the comparison of tcpipstat --read
with it, and a pcapng writer (tcpdump writes pcap only).

How tcpipstat's counters map onto tcptrace's (``tcptrace -l -r -n --csv``), and the
tolerance where the definitions differ:

==================  ==========================  =========================================
tcpipstat           tcptrace (a2b: a = local)   tolerance
==================  ==========================  =========================================
OutSegs/InSegs      total_packets               exact, with NetDups added: tcptrace counts
                                                a network duplicate as a packet
NetDups/InNetDups   hardware_dups               exact where the fixture has the column
                                                (tcptrace matches IP ID and sequence only)
SendBytes/Recv...   unique_bytes_sent           exact
RetransSegs         rexmt_data_pkts             exact, or up to NetDups fewer: tcptrace
                                                counts a duplicated segment as resent
RetransBytes        rexmt_data_bytes            tcptrace counts a resent SYN or FIN as one
                                                byte: up to (SYNs - 1) + (FINs - 1) more
                                                (and, with NetDups, the duplicates' bytes)
OutOfOrder          outoforder_pkts             exact
ZeroWindows         zero_win_adv                exact
OutRsts             resets_sent                 exact
RttSamples          RTT_samples                 exact; with NetDups, at least tcptrace's
                                                (for tcptrace a duplicated segment was
                                                resent: no sample) and min/avg/max unchecked
RttMin/Avg/Max      RTT_min/avg/max             0.051 ms: tcptrace prints 0.1 ms steps (0.05),
                                                tcpipstat microseconds (0.0005); for the
                                                mean also avg/n * 0.0001, as tcptrace's
                                                mean divides by n + 0.0001
HandshakeRtt        RTT_from_3WHS a2b + b2a     0.102 ms (two numbers in 0.1 ms steps)
Duration            last_packet - first_packet  0.002 ms
==================  ==========================  =========================================

DupAcks/InDupAcks are not compared with tcptrace's duplicate_acks, whose definition
differs (it counts ACKs carrying a FIN and ACKs with nothing outstanding: see the man
page): :func:`dupacks_problems` checks them against the man page's definition, counted
straight from the packets by :func:`dup_acks_by_definition`.
"""
from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import dpkt

from .conftest import run_cli

RTT_TOL_MS = 0.051
HS_TOL_MS = 0.102


def tcptrace_rows(text: str) -> list[dict[str, str]]:
    """``tcptrace -l -r -n --csv`` output -> one dict per connection."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    head = [h.strip() for h in lines[0].split(",")]
    rows = []
    for line in lines[1:]:
        vals = [v.strip() for v in line.split(",")]
        rows.append(dict(zip(head, vals)))
    return rows


def ours(path: Path | str, *extra: str) -> list[dict]:
    status, out, err = run_cli("--read", str(path), "--json", *extra)
    assert status == 0, err
    return [json.loads(ln) for ln in out.splitlines()]


def _num(v: str) -> float:
    return float(v)


def _epoch(v: str) -> float:
    """tcptrace's first_packet/last_packet: SECONDS.MICROSECONDS, the microseconds not
    zero-padded (".70086" is .070086)."""
    sec, _, usec = v.strip().partition(".")
    return int(sec) + int(usec or 0) / 1e6


def pair(our_rows: list[dict], tt_rows: list[dict]) -> list[tuple[dict, dict, bool]]:
    """(our row, tcptrace row, tcptrace's a is our local) for every connection."""
    by_ports = {}
    for t in tt_rows:
        by_ports[(int(t["port_a"]), int(t["port_b"]))] = t
    pairs = []
    for o in our_rows:
        t = by_ports.get((o["lport"], o["rport"]))
        if t is not None:
            pairs.append((o, t, True))
            continue
        t = by_ports.get((o["rport"], o["lport"]))
        assert t is not None, f"tcptrace has no connection {o['lport']}<->{o['rport']}"
        pairs.append((o, t, False))
    assert len(pairs) == len(tt_rows), (len(pairs), len(tt_rows))
    return pairs


def compare(o: dict, t: dict, a_is_local: bool) -> list[str]:
    """Where tcpipstat's row ``o`` and tcptrace's ``t`` disagree beyond the tolerances."""
    c = o["counters"]
    out, inn = ("a2b", "b2a") if a_is_local else ("b2a", "a2b")
    bad: list[str] = []
    conn = f"{o['lport']}->{o['rport']}"

    def exact(ours_name: str, tt: str, d: str) -> None:
        if c[ours_name] != int(_num(t[f"{tt}_{d}"])):
            bad.append(f"{conn} {ours_name}={c[ours_name]} tcptrace {tt}_{d}={t[f'{tt}_{d}']}")

    for d, p in ((out, ""), (inn, "In")):
        segs, dups = (f"{p}Segs" if p else "OutSegs"), c[f"{p}NetDups"]
        if c[segs] + dups != int(t[f"total_packets_{d}"]):
            bad.append(f"{conn} {segs}={c[segs]} + {p}NetDups={dups} "
                       f"tcptrace total_packets_{d}={t[f'total_packets_{d}']}")
        if f"hardware_dups_{d}" in t:
            exact(f"{p}NetDups", "hardware_dups", d)
        exact("RecvBytes" if p else "SendBytes", "unique_bytes_sent", d)
        rexmt = int(t[f"rexmt_data_pkts_{d}"])
        if not c[f"{p}RetransSegs"] <= rexmt <= c[f"{p}RetransSegs"] + dups:
            bad.append(f"{conn} {p}RetransSegs={c[f'{p}RetransSegs']} tcptrace "
                       f"rexmt_data_pkts_{d}={rexmt} ({p}NetDups={dups})")
        exact(f"{p}OutOfOrder", "outoforder_pkts", d)
        exact(f"{p}ZeroWindows", "zero_win_adv", d)
        exact(f"{p}Rsts" if p else "OutRsts", "resets_sent", d)
        syns, fins = (int(x) for x in t[f"SYN/FIN_pkts_sent_{d}"].split("/"))
        extra = int(t[f"rexmt_data_bytes_{d}"]) - c[f"{p}RetransBytes"]
        if extra < 0 or (not dups and extra > max(0, syns - 1) + max(0, fins - 1)):
            bad.append(f"{conn} {p}RetransBytes={c[f'{p}RetransBytes']} "
                       f"tcptrace rexmt_data_bytes_{d}={t[f'rexmt_data_bytes_{d}']} "
                       f"(SYN/FIN {syns}/{fins})")
        bad += _rtt_problems(c, t, p, d, dups, conn)
    if c["HandshakeRtt"] is not None:
        hs = _num(t["RTT_from_3WHS_a2b"]) + _num(t["RTT_from_3WHS_b2a"])
        if abs(c["HandshakeRtt"] - hs) > HS_TOL_MS:
            bad.append(f"{conn} HandshakeRtt={c['HandshakeRtt']} tcptrace 3WHS a2b+b2a={hs}")
    dur = (_epoch(t["last_packet"]) - _epoch(t["first_packet"])) * 1000
    if abs(c["Duration"] - dur) > 0.002:
        bad.append(f"{conn} Duration={c['Duration']} tcptrace last-first={dur:.3f}")
    return bad


def _rtt_problems(c: dict, t: dict, p: str, d: str, dups: int, conn: str) -> list[str]:
    """RTT samples and their min/avg/max against tcptrace's, for direction ``d`` (prefix
    ``p``); with network duplicates, only that tcptrace has no more samples."""
    n, tn = c[f"{p}RttSamples"], int(t[f"RTT_samples_{d}"])
    if dups:
        return [] if tn <= n else [f"{conn} {p}RttSamples={n} < tcptrace RTT_samples_{d}={tn}"]
    if n != tn:
        return [f"{conn} {p}RttSamples={n} tcptrace RTT_samples_{d}={tn}"]
    bad = []
    for ours_name, tt in (("RttMin", "RTT_min"), ("RttAvg", "RTT_avg"), ("RttMax", "RTT_max")):
        if not n:
            break
        v, w = c[p + ours_name], _num(t[f"{tt}_{d}"])
        tol = RTT_TOL_MS + (v * 0.0001 / n if ours_name == "RttAvg" else 0)
        if abs(v - w) > tol:
            bad.append(f"{conn} {p}{ours_name}={v} tcptrace {tt}_{d}={w}")
    return bad


class _Side:
    """One direction, as dup_acks_by_definition follows it."""

    def __init__(self) -> None:
        self.base: int | None = None          # its first sequence number: numbers are relative
        self.high = 0                         # the highest sequence end it sent
        self.acked: int | None = None         # the highest acknowledgment of it
        self.seen: list[tuple[int, int]] = []  # the ranges it sent
        self.resent = False                   # resent sequence space since the other's last ACK
        self.last_ack: int | None = None      # its last ACK (raw) and window
        self.last_win = -1
        self.recent: list[tuple] = []         # its last 8 IPv4 packets (network duplicates)

    def rel(self, seq: int) -> int:
        return ((seq - self.base + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)

    def send(self, seq: int, length: int, keepalive: bool) -> None:
        """Sequence space [seq, seq + length): was any of it sent or acknowledged before?"""
        if self.base is None:
            self.base = seq
        s = self.rel(seq)
        e = s + length
        old = any(a < e and s < b for a, b in self.seen) or (
            self.acked is not None and s < self.acked)
        if old and not (keepalive and e == self.high):
            self.resent = True
        self.seen.append((s, e))
        self.high = max(self.high, e)


_LINKS = {1: dpkt.ethernet.Ethernet, 113: dpkt.sll.SLL, 276: dpkt.sll2.SLL2}


def dup_acks_by_definition(path: Path | str) -> dict[tuple, int]:
    """The duplicate ACKs of a pcap (Ethernet, SLL or SLL2) as the man page defines DupAcks,
    counted straight from the packets with dpkt (no tcpipstat code): {(src, sport, dst,
    dport) of the ACKs' sender: count}. Slow and simple: the tests' oracle."""
    sides: dict[tuple, _Side] = {}
    counts: dict[tuple, int] = {}
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        link = _LINKS[reader.datalink()]
        for _, buf in reader:
            ip = link(buf).data
            if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) or not isinstance(ip.data,
                                                                             dpkt.tcp.TCP):
                continue
            tcp = ip.data
            key = (ip.src, tcp.sport, ip.dst, tcp.dport)
            x = sides.setdefault(key, _Side())
            y = sides.setdefault((ip.dst, tcp.dport, ip.src, tcp.sport), _Side())
            if _counts_as_dup_ack(ip, tcp, x, y):
                counts[key] = counts.get(key, 0) + 1
    return counts


def _counts_as_dup_ack(ip, tcp, x: _Side, y: _Side) -> bool:
    """Follow one packet of x to y; is it a duplicate ACK?"""
    ipv4 = isinstance(ip, dpkt.ip.IP)
    plen = (ip.len - ip.hl * 4 if ipv4 else ip.plen) - tcp.off * 4
    if ipv4 and ip.id:
        same = (ip.id, tcp.seq, tcp.ack, tcp.flags, tcp.win, plen)
        if same in x.recent:
            return False                      # a network duplicate: nothing else
        x.recent = (x.recent + [same])[-8:]
    syn, fin = tcp.flags & SYN_ and 1, tcp.flags & FIN_ and 1
    probe = y.last_win == 0 and not syn       # a window probe: neither new nor resent
    if (plen or syn or fin) and not probe:
        x.send(tcp.seq, plen + syn + fin, keepalive=plen == 1 and not syn and not fin)
    if tcp.flags & RST_:
        return False
    if not tcp.flags & ACK_:
        x.last_win = tcp.win if syn else 0
        return False
    if y.base is None:
        y.base = tcp.ack
    a = y.rel(tcp.ack)
    y.acked = a if y.acked is None else max(y.acked, a)
    dup = (not (plen or syn or fin) and tcp.ack == x.last_ack and tcp.win == x.last_win
           and (y.high > a or y.resent))
    x.last_ack, x.last_win, y.resent = tcp.ack, tcp.win, False
    return dup


def dupacks_problems(rows: list[dict], path: Path | str) -> list[str]:
    """Where tcpipstat's DupAcks/InDupAcks (rows of --json, index=tuple) differ from
    dup_acks_by_definition on the same capture."""
    want = dup_acks_by_definition(path)
    bad = []
    for r in rows:
        la, ra = (ipaddress.ip_address(r[k]).packed for k in ("laddr", "raddr"))
        for name, key in (("DupAcks", (la, r["lport"], ra, r["rport"])),
                          ("InDupAcks", (ra, r["rport"], la, r["lport"]))):
            if r["counters"][name] != want.get(key, 0):
                bad.append(f"{r['lport']}->{r['rport']} {name}={r['counters'][name]}, "
                           f"by the definition {want.get(key, 0)}")
    return bad


def to_pcapng(src: Path, dst: Path, tsresol_ns: bool = True, extra_iface: int | None = None) -> int:
    """Rewrite the pcap ``src`` as pcapng ``dst`` (little-endian; nanosecond time stamps
    unless told otherwise). ``extra_iface``: put an interface of that link type first,
    with one packet of its own. Returns the number of packets written."""
    def block(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        n = len(body) + 12
        return struct.pack("<II", btype, n) + body + struct.pack("<I", n)

    def idb(linktype: int, snaplen: int) -> bytes:
        opts = b""
        if tsresol_ns:
            opts = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)
        return block(1, struct.pack("<HHI", linktype, 0, snaplen) + opts)

    def epb(iface: int, ts_ticks: int, data: bytes, wirelen: int) -> bytes:
        return block(6, struct.pack("<IIIII", iface, ts_ticks >> 32, ts_ticks & 0xFFFFFFFF,
                                    len(data), wirelen) + data)

    n = 0
    with open(src, "rb") as f:
        r = dpkt.pcap.Reader(f)
        linktype, snaplen = r.datalink(), r.snaplen
    raw = src.read_bytes()
    le = raw[:4] == b"\xd4\xc3\xb2\xa1"
    nano_src = raw[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    fmt = "<IIII" if le else ">IIII"
    out = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))]
    first_iface = 0
    if extra_iface is not None:
        out.append(idb(extra_iface, 65535))
        out.append(epb(0, 0, b"\x01\x02\x03\x04", 4))
        first_iface = 1
    out.append(idb(linktype, snaplen))
    pos = 24
    while pos + 16 <= len(raw):
        sec, sub, caplen, wirelen = struct.unpack_from(fmt, raw, pos)
        data = raw[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        sub_ns = sub if nano_src else sub * 1000
        ticks = sec * 10 ** 9 + sub_ns if tsresol_ns else sec * 10 ** 6 + sub_ns // 1000
        out.append(epb(first_iface, ticks, data, wirelen))
        n += 1
    dst.write_bytes(b"".join(out))
    return n


def check_workload(rows: list[dict], manifest: dict) -> None:
    """What tests/capture_workload.py did (its manifest.json), found in tcpipstat's
    --json rows (index=tuple) of its capture."""
    ports = manifest["ports"]
    by_port: dict[int, list[dict]] = {}
    for r in rows:
        by_port.setdefault(r["rport"], []).append(r)
    assert sorted(by_port) == sorted(int(p) for p in ports), sorted(by_port)
    for p, m in ports.items():
        conns = by_port[int(p)]
        assert len(conns) == m["conns"], (p, len(conns))
        for r in conns:
            c = r["counters"]
            assert r["family"] == ("ipv6" if m["family"] == 6 else "ipv4"), (p, r["family"])
            assert r["laddr"] == ("::1" if m["family"] == 6 else "127.0.0.1")
            # every byte of the stream, once, whatever was lost and resent
            assert (c["SendBytes"], c["RecvBytes"]) == (m["up"], m["down"]), (p, c)
            assert c["ActiveOpens"] == 1 and r["opened_during_collection"], (p, c)
            assert r["closed"] == 1, p
        total = {k: sum(r["counters"][k] for r in conns) for k in conns[0]["counters"]
                 if isinstance(conns[0]["counters"][k], int)}
        if m.get("loss") == "input":           # seen, then dropped: resent
            assert total["RetransSegs"] > 0 and total["RetransBytes"] > 0, (p, total)
            assert total["InDupAcks"] + total["RetransSegs"] > 0
        elif m.get("loss") == "before-capture":  # never seen: the resent copy fills a hole
            # The sender may also resend a segment the capture did see (a tail-loss probe
            # resends the last one sent when its ACK is late; seen once in CI: 1 of 137):
            # at most one per hole, never more than the holes filled.
            assert total["OutOfOrder"] > 0, (p, total)
            assert total["RetransSegs"] <= total["OutOfOrder"], (p, total)
        else:
            assert total["RetransSegs"] == total["OutOfOrder"] == 0, (p, total)
        if m.get("think_ms"):                  # the server thinks before each response
            for r in conns:
                c = r["counters"]
                assert c["FirstByte"] >= m["think_ms"], (p, c["FirstByte"])
                assert c["RttMax"] >= m["think_ms"] * 0.9, (p, c["RttMax"])
                assert c["HandshakeRtt"] is not None and c["HandshakeRtt"] < m["think_ms"]
        if m.get("zero_window"):
            assert total["InZeroWindows"] > 0, (p, total)
        if m.get("reset") == "remote":
            assert total["InRsts"] == 1 and total["OutRsts"] == 0, (p, total)
        if m.get("refused"):
            (r,) = conns
            c = r["counters"]
            got = (c["OutSegs"], c["InSegs"], c["InRsts"], c["AttemptFails"], c["PassiveOpens"])
            assert got == (1, 1, 1, 1, 0), c
            assert c["HandshakeRtt"] is None and c["FirstByte"] is None


TCPTRACE_KEPT = ("conn_#", "host_a", "host_b", "port_a", "port_b", "first_packet", "last_packet",
                 "total_packets", "unique_bytes_sent", "rexmt_data_pkts", "rexmt_data_bytes",
                 "outoforder_pkts", "zero_win_adv", "resets_sent", "RTT_samples", "RTT_min",
                 "RTT_max", "RTT_avg", "RTT_from_3WHS", "SYN/FIN_pkts_sent", "duplicate_acks",
                 "hardware_dups")


def trim_tcptrace_csv(text: str) -> str:
    """tcptrace's CSV with only the columns the comparison reads (fixtures stay small)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    head = [h.strip() for h in lines[0].split(",")]
    keep = [i for i, h in enumerate(head)
            if h in TCPTRACE_KEPT or h.rsplit("_", 1)[0] in TCPTRACE_KEPT]
    out = []
    for line in lines:
        vals = line.split(",")
        out.append(",".join(vals[i].strip() for i in keep))
    return "\n".join(out) + "\n"


def synthetic_capture(path: Path, packets: int = 5000) -> int:
    """bench/capture_bench.py's generator (seeded: the same file every time)."""
    import importlib.util
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("capture_bench",
                                                  root / "bench" / "capture_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.generate(path, packets, 20, "many")[0]


# -- small scripted captures (tests/test_capture_accuracy.py), written with dpkt -------------

FIN_, SYN_, RST_, PSH_, ACK_ = 0x01, 0x02, 0x04, 0x08, 0x10
CLIENT, SERVER = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"


class Dialogue:
    """One TCP connection, scripted packet by packet: who sends it ("c" the client or "s" the
    server), when it leaves its sender, and its sequence and acknowledgment numbers relative
    to the sender's and the receiver's initial sequence numbers. Each side numbers its IP IDs
    as Linux does (one more per packet), so that a packet sent twice is told apart from one
    the network duplicated (``twice``: the same bytes seen again 10 us later)."""

    def __init__(self, cport: int, sport: int, saddr: bytes = SERVER, isn=(1_000_000, 7_000_000)):
        self.ends = {"c": (CLIENT, cport), "s": (saddr, sport)}
        self.isn = {"c": isn[0], "s": isn[1]}
        self.ipid = {"c": 100, "s": 900}
        self.packets: list[tuple[float, str, bytes, bool]] = []

    def send(self, t: float, side: str, seq: int, ack: int, flags: int, n: int = 0,
             twice: bool = False) -> None:
        other = "s" if side == "c" else "c"
        (src, sport), (dst, dport) = self.ends[side], self.ends[other]
        self.ipid[side] += 1
        tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=(self.isn[side] + seq) & 0xFFFFFFFF,
                           ack=(self.isn[other] + ack) & 0xFFFFFFFF if flags & ACK_ else 0,
                           flags=flags, win=502, data=b"\x00" * n)
        ip = dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64, df=1, id=self.ipid[side],
                        data=tcp)
        eth = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, data=ip)
        self.packets.append((t, side, bytes(eth), twice))

    def handshake(self, t: float, delay: float) -> None:
        """SYN at t, SYN-ACK when it arrives, the ACK when that arrives (times at each sender)."""
        self.send(t, "c", 0, 0, SYN_)
        self.send(t + delay, "s", 0, 1, SYN_ | ACK_)
        self.send(t + 2 * delay, "c", 1, 1, ACK_)

    def frames(self, at: str | None = None, delay: float = 0.0) -> list[tuple[float, bytes]]:
        """The packets as a capture at end ``at`` sees them (what the other end sends arrives
        ``delay`` later); with ``at`` None, at the times scripted."""
        out = []
        for t, side, frame, twice in self.packets:
            seen = t + (delay if at is not None and side != at else 0.0)
            out += [(seen, frame)] + ([(seen + 1e-5, frame)] if twice else [])
        return sorted(out, key=lambda f: f[0])


def write_pcap(path: Path, frames: list[tuple[float, bytes]]) -> Path:
    """Ethernet frames (time, bytes) as a pcap, in the order given."""
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535, linktype=dpkt.pcap.DLT_EN10MB)
        for ts, frame in frames:
            w.writepkt(frame, ts=ts)
    return path


T0 = 1_700_000_000.0


def karn_dialogue() -> Dialogue:
    """The client resends a request segment that was already acknowledged; the ACK of the
    segment it had sent before that resend must give no RTT sample (Karn's rule)."""
    d = Dialogue(40001, 80)
    d.handshake(T0, 0.010)
    d.send(T0 + 0.030, "c", 1, 1, PSH_ | ACK_, 1000)      # A
    d.send(T0 + 0.050, "s", 1, 1001, ACK_)                # acknowledges A: 20 ms
    d.send(T0 + 0.060, "c", 1001, 1, PSH_ | ACK_, 1000)   # B
    d.send(T0 + 0.065, "c", 1, 1, PSH_ | ACK_, 1000)      # A again, already acknowledged
    d.send(T0 + 0.090, "s", 1, 2001, ACK_)                # acknowledges B: no sample (30 ms)
    d.send(T0 + 0.100, "c", 2001, 1, PSH_ | ACK_, 1000)   # C, sent after the resend
    d.send(T0 + 0.120, "s", 1, 3001, ACK_)                # acknowledges C: 20 ms
    _close(d, T0 + 0.130, 3001, 1, 0.010)
    return d


def netdup_dialogue() -> Dialogue:
    """A data segment and a duplicate ACK that the network delivered twice (the same IP ID:
    the same packet), beside a real retransmission and a real duplicate ACK."""
    d = Dialogue(40002, 80)
    d.handshake(T0, 0.010)
    d.send(T0 + 0.030, "c", 1, 1, PSH_ | ACK_, 1000, twice=True)   # A, seen twice
    d.send(T0 + 0.050, "s", 1, 1001, ACK_)                         # acknowledges A: 20 ms
    d.send(T0 + 0.060, "c", 1001, 1, PSH_ | ACK_, 1000)            # B (lost after the capture)
    d.send(T0 + 0.061, "c", 2001, 1, PSH_ | ACK_, 1000)            # C
    d.send(T0 + 0.081, "s", 1, 1001, ACK_, twice=True)             # duplicate ACK, seen twice
    d.send(T0 + 0.085, "c", 1001, 1, PSH_ | ACK_, 1000)            # B resent: a new IP ID
    d.send(T0 + 0.105, "s", 1, 3001, ACK_)
    _close(d, T0 + 0.110, 3001, 1, 0.010)
    return d


def dsack_dialogue() -> Dialogue:
    """An upload in which the client resends its first segment spuriously while three more are
    on their way (one-way delay 10 ms: capture it at either end with ``frames(at, 0.010)``).
    The server answers the resent copy with a duplicate ACK: at the client's end the three
    segments are outstanding when it arrives; at the server's end they are not in the capture
    yet."""
    d = Dialogue(40003, 5201)
    d.handshake(T0, 0.010)
    for i in range(3):
        d.send(T0 + 0.030 + i * 1e-4, "c", 1 + i * 1000, 1, ACK_, 1000)
    d.send(T0 + 0.035, "c", 1, 1, ACK_, 1000)                      # spurious resend
    for i in range(3, 6):
        d.send(T0 + 0.036 + (i - 3) * 1e-4, "c", 1 + i * 1000, 1, ACK_, 1000)
    d.send(T0 + 0.0403, "s", 1, 3001, ACK_)                        # the first three arrived
    d.send(T0 + 0.0451, "s", 1, 3001, ACK_)                        # the resend arrived
    d.send(T0 + 0.0463, "s", 1, 6001, ACK_)                        # the last three arrived
    _close(d, T0 + 0.050, 6001, 1, 0.010)
    return d


def _close(d: Dialogue, t: float, cseq: int, sseq: int, delay: float) -> None:
    """The client closes at t; the server's FIN answers when it arrives; the last ACK."""
    d.send(t, "c", cseq, sseq, FIN_ | ACK_)
    d.send(t + delay, "s", sseq, cseq + 1, FIN_ | ACK_)
    d.send(t + 2 * delay, "c", cseq + 1, sseq + 1, ACK_)


def midstream_frames() -> list[tuple[float, bytes]]:
    """A capture that starts in the middle of four connections (no SYN of any): to port 80
    and to port 443 (the first packet seen from the server, then from the client), to port
    8080 (from the server: both ports above 1023) and between ports 514 and 1023 (both below
    1024), and one connection to port 80 whose handshake the capture has."""
    out: list[tuple[float, bytes]] = []
    for k, (cport, sport, first) in enumerate(((40010, 80, "s"), (40011, 443, "c"),
                                               (40012, 8080, "s"), (1023, 514, "s"))):
        d = Dialogue(cport, sport)
        t = T0 + k * 0.001
        if first == "s":
            d.send(t, "s", 5001, 301, PSH_ | ACK_, 1000)
            d.send(t + 0.0201, "c", 301, 6001, ACK_)
        else:
            d.send(t, "c", 301, 5001, PSH_ | ACK_, 300)
            d.send(t + 0.020, "s", 5001, 601, PSH_ | ACK_, 1000)
            d.send(t + 0.0401, "c", 601, 6001, ACK_)
        out += d.frames()
    d = Dialogue(40013, 80)
    d.handshake(T0 + 0.005, 0.010)
    d.send(T0 + 0.030, "c", 1, 1, PSH_ | ACK_, 300)
    d.send(T0 + 0.050, "s", 1, 301, PSH_ | ACK_, 1000)
    out += d.frames()
    return sorted(out, key=lambda f: f[0])


def accuracy_captures(where: Path) -> dict[str, Path]:
    """The scripted captures of tests/test_capture_accuracy.py, written into ``where``."""
    dsack = dsack_dialogue()
    return {
        "karn": write_pcap(where / "karn.pcap", karn_dialogue().frames()),
        "netdup": write_pcap(where / "netdup.pcap", netdup_dialogue().frames()),
        "dsack-sender": write_pcap(where / "dsack-sender.pcap", dsack.frames("c", 0.010)),
        "dsack-receiver": write_pcap(where / "dsack-receiver.pcap", dsack.frames("s", 0.010)),
        "midstream": write_pcap(where / "midstream.pcap", midstream_frames()),
    }
