"""TCP segments -> per-connection state -> per-connection counters.

Each connection has two :class:`Half` objects, one per direction: what that side
sent, and what the capture knows of its sequence space. The definitions follow
tcptrace's where they can (tests/test_capture.py and test_capture_tier.py compare the two on
the same captures):

* a segment *retransmits* when it carries sequence space (payload, SYN or FIN)
  the capture had already seen that side send, or the other side acknowledge;
* a segment is *out of order* when all it carries is new yet it starts below the
  highest sequence already seen (it filled a hole);
* a segment sent while the other side's last advertised window was 0 is a window
  probe: neither new nor retransmitted (as tcptrace);
* an RTT sample is the time from a segment to the first ACK that acknowledges
  exactly its end, when the segment was sent once and nothing below it was
  resent after it, acknowledged already or not (Karn's rule, tcptrace's "RTT
  samples");
* a packet the network duplicated (IPv4: the same IP ID, sequence and
  acknowledgment numbers, flags, window and length as one of the last
  RECENT_PACKETS of its direction) is a network duplicate, counted apart
  (tcptrace's "hardware duplicates"): it was sent once, so it is neither a
  segment nor a retransmission nor a duplicate ACK;
* a duplicate ACK repeats its sender's previous ACK (RFC 5681) while the other
  side had data outstanding: sequence space seen above it, or a resend since
  that previous ACK other than a keep-alive (the receiver answers a resend with
  a D-SACK; in a capture taken at the receiver, the data still in flight is not
  in the capture yet).

Memory: a direction keeps only what is not yet acknowledged (the holes above the
cumulative ACK and the segments waiting for an RTT sample, both capped), so it
does not grow with the length of a connection or of the capture; a closed
connection keeps only its counters.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from operator import attrgetter
from typing import Iterator

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
MASK = 0xFFFFFFFF
NO_FLOOR = -(1 << 62)
MAX_PENDING = 16384      # segments awaiting an RTT sample, per direction (oldest dropped beyond)
MAX_HOLES = 1024         # separate seen ranges above the cumulative ACK, per direction
RECENT_PACKETS = 8       # packets per direction a network duplicate may repeat (tcptrace's)


def _unwrap(ref: int, seq: int) -> int:
    """A 32-bit sequence number as a 64-bit one, the nearest to ``ref``."""
    d = (seq - ref) & MASK
    return ref + d - ((d >> 31) << 32)


class Half:
    """One direction of a connection: what its sender sent and what was acknowledged."""
    __slots__ = ("segs", "new_bytes", "retrans_segs", "retrans_bytes", "ooo", "dupacks",
                 "netdups", "zero_wins", "rsts", "syns", "fins", "isn", "high", "floor", "seen",
                 "pending", "acked_ts", "last_ack", "last_win", "resent", "recent", "rtt_n",
                 "rtt_sum", "rtt_min", "rtt_max", "first_data", "last_data", "syn_ts")

    def __init__(self) -> None:
        self.segs = self.new_bytes = self.retrans_segs = self.retrans_bytes = 0
        self.ooo = self.dupacks = self.netdups = 0
        self.zero_wins = self.rsts = self.syns = self.fins = 0
        self.isn: int | None = None          # the SYN's sequence number, when seen
        self.high: int | None = None         # highest sequence end seen (64-bit)
        self.floor = NO_FLOOR                # everything below was acknowledged by the other side
        self.seen: list[list[int]] = []      # [lo, hi) ranges seen above the floor, sorted
        self.pending: list[list] = []        # [lo, hi, time, retransmitted] not yet acknowledged
        self.acked_ts = 0.0                  # latest (re)transmission time of acknowledged segments
        self.last_ack: int | None = None     # this side's previous ACK (32-bit) and window
        self.last_win = -1
        self.resent = False                  # resent sequence space since the other side's last ACK
        self.recent: list[int] = []          # its last RECENT_PACKETS IPv4 packets, packed
        self.rtt_n = 0
        self.rtt_sum = 0.0
        self.rtt_min = self.rtt_max = 0.0
        self.first_data: float | None = None
        self.last_data: float | None = None
        self.syn_ts: float | None = None


class Conn:
    __slots__ = ("family", "laddr", "lport", "raddr", "rport", "halves", "first_ts", "last_ts",
                 "opened", "closed", "synack_n", "synack_ts", "hs_ack_ts", "packets")

    def __init__(self, family: int, laddr: bytes, lport: int, raddr: bytes, rport: int,
                 ts: float):
        self.family, self.laddr, self.lport = family, laddr, lport
        self.raddr, self.rport = raddr, rport
        self.halves = (Half(), Half())       # [0]: local (initiator) -> remote, [1]: the reverse
        self.first_ts = self.last_ts = ts
        self.opened = False                  # the initiator's SYN is in the capture
        self.closed = False                  # both FINs, or a reset
        self.synack_n = 0
        self.synack_ts: float | None = None
        self.hs_ack_ts: float | None = None  # the initiator's ACK of the SYN-ACK
        self.packets = 0

    def counters(self) -> dict[str, int | float]:
        return counters(self)


def counters(conn) -> dict[str, int | float]:
    """The per-connection view the report shows, of a Conn, or of the compiled path's
    ConnState (tcpipstat/capture/fast.py): the same fields, by the same names."""
    out, inn = conn.halves
    c: dict[str, int | float] = {}
    for h, names, p in ((out, _OUT, ""), (inn, _IN, "In")):
        for name, v in zip(names, _COUNTS(h)):
            if v:
                c[name] = v
        if h.rtt_n:
            c[p + "RttMin"] = _ms(h.rtt_min)
            c[p + "RttAvg"] = _ms(h.rtt_sum / h.rtt_n)
            c[p + "RttMax"] = _ms(h.rtt_max)
    if conn.opened:
        c["ActiveOpens"] = 1
    if conn.synack_n:
        c["PassiveOpens"] = 1
    if conn.opened and not conn.synack_n and inn.segs == inn.rsts:
        c["AttemptFails"] = 1
    if (out.syns == 1 and conn.synack_n == 1 and conn.hs_ack_ts is not None
            and out.syn_ts is not None):
        c["HandshakeRtt"] = _ms(conn.hs_ack_ts - out.syn_ts)
    if out.first_data is not None and inn.first_data is not None:
        # the first response byte after the first request byte
        if inn.first_data >= out.first_data:
            c["FirstByte"] = _ms(inn.first_data - out.first_data)
    firsts = [t for t in (out.first_data, inn.first_data) if t is not None]
    lasts = [t for t in (out.last_data, inn.last_data) if t is not None]
    if firsts:
        c["TransferTime"] = _ms(max(lasts) - min(firsts))
    c["Duration"] = _ms(conn.last_ts - conn.first_ts)
    return c


# a direction's counts, in the order the report lists them: as sent (Out) and as received (In)
_COUNTS = attrgetter("segs", "new_bytes", "retrans_segs", "retrans_bytes", "ooo", "dupacks",
                     "netdups", "zero_wins", "rsts", "rtt_n")
_OUT = ("OutSegs", "SendBytes", "RetransSegs", "RetransBytes", "OutOfOrder", "DupAcks",
        "NetDups", "ZeroWindows", "OutRsts", "RttSamples")
_IN = ("InSegs", "RecvBytes", "InRetransSegs", "InRetransBytes", "InOutOfOrder", "InDupAcks",
       "InNetDups", "InZeroWindows", "InRsts", "InRttSamples")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _insert(h: Half, s: int, e: int) -> tuple[int, list[tuple[int, int]]]:
    """Add [s, e) to what ``h`` has seen; returns (how many of its bytes were seen
    already, the new pieces)."""
    floor = h.floor
    overlap = 0
    if s < floor:
        overlap = min(e, floor) - s
        s = floor
        if e <= s:
            return overlap, []
    pieces: list[tuple[int, int]] = []
    out: list[list[int]] = []
    pos, lo_m, hi_m, placed = s, s, e, False
    for lo, hi in h.seen:
        if hi < s:
            out.append([lo, hi])
        elif lo > e:
            if not placed:
                out.append([lo_m, hi_m])
                placed = True
            out.append([lo, hi])
        else:                                # overlapping or touching: merge
            a, b = max(lo, s), min(hi, e)
            if b > a:
                overlap += b - a
                if a > pos:
                    pieces.append((pos, a))
                pos = max(pos, b)
            lo_m, hi_m = min(lo_m, lo), max(hi_m, hi)
    if pos < e:
        pieces.append((pos, e))
    if not placed:
        out.append([lo_m, hi_m])
    if len(out) > MAX_HOLES:                 # too many holes: forget the lowest one
        out[0:2] = [[out[0][0], out[1][1]]]
    h.seen = out
    return overlap, pieces


def _seen_bytes(h: Half, s: int, e: int) -> int:
    """How many bytes of [s, e) ``h`` has seen already."""
    n = 0
    if s < h.floor:
        n = min(e, h.floor) - s
        s = h.floor
    for lo, hi in h.seen:
        a, b = max(lo, s), min(hi, e)
        if b > a:
            n += b - a
    return n


def _mark_retransmitted(h: Half, s: int, e: int, ts: float) -> None:
    pend = h.pending
    i = max(0, bisect_left(pend, [s]) - 1)
    n = len(pend)
    while i < n:
        ent = pend[i]
        if ent[0] >= e:
            break
        if ent[1] > s:
            ent[2] = ts
            ent[3] = True
        i += 1


def _count_syn(conn: Conn, x: Half, d: int, seq: int, flags: int, ts: float) -> None:
    """A SYN (or SYN-ACK) sent by ``x``, direction ``d`` of ``conn``."""
    x.syns += 1
    if x.isn is None:
        x.isn = seq
    if not flags & ACK:
        if d == 0:
            conn.opened = True
            x.syn_ts = ts
    else:
        conn.synack_n += 1
        if conn.synack_ts is None:
            conn.synack_ts = ts


def _sent(x: Half, y: Half, seq: int, syn: int, fin: int, plen: int, ts: float) -> None:
    """Sequence space (``plen`` bytes of payload, a SYN, a FIN) that ``x`` sent: new,
    retransmitted, out of order or a window probe; ``y`` is the other direction."""
    if plen:
        if x.first_data is None:
            x.first_data = ts
        x.last_data = ts
    high = x.high
    if high is None:
        s = seq
        x.high = high = s
        if syn:
            x.floor = s
    else:
        s = _unwrap(high, seq)
    e = s + plen + syn + fin
    if fin:
        x.fins += 1
    if y.last_win == 0 and y.segs and not syn:
        pass                                  # a window probe (as tcptrace): neither new nor resent
    elif s >= high and s >= x.floor:          # the usual case: at or past everything seen
        seen = x.seen
        if seen and seen[-1][1] == s:
            seen[-1][1] = e
        else:
            seen.append([s, e])
            if len(seen) > MAX_HOLES:
                seen[0:2] = [[seen[0][0], seen[1][1]]]
        x.new_bytes += plen
        pend = x.pending
        pend.append([s, e, ts, False])
        if len(pend) > MAX_PENDING:
            del pend[:MAX_PENDING // 2]
    else:
        _resent_or_filled(x, s, e, syn, plen, ts)
    if e > high:
        x.high = e


def _resent_or_filled(x: Half, s: int, e: int, syn: int, plen: int, ts: float) -> None:
    """[s, e) starts below the highest sequence ``x`` sent, or below its floor: a
    retransmission when the capture saw any of it already, else an out-of-order segment
    that fills a hole."""
    resent = _seen_bytes(x, s + syn, s + syn + plen) if plen else 0
    if s < x.floor and ts > x.acked_ts:      # acknowledged data sent again: the segments sent
        x.acked_ts = ts                      # before it give no RTT sample (Karn's rule)
    overlap, pieces = _insert(x, s, e)
    if overlap:
        x.retrans_segs += 1
        x.retrans_bytes += resent
        x.new_bytes += plen - resent
        _mark_retransmitted(x, s, e, ts)
        if not (plen == 1 == e - s and e == x.high):     # (not a keep-alive's one old byte)
            x.resent = True
    else:
        x.new_bytes += plen
        x.ooo += 1
    for a, b in pieces:
        insort(x.pending, [a, b, ts, False])


def _acknowledged(y: Half, a: int, ts: float) -> None:
    """The other side acknowledged ``y`` up to ``a`` (64-bit), above the floor: RTT samples
    (Karn's rule) from the segments it acknowledges, then the floor rises to ``a``. Every
    pending segment starts at or above the floor, so an ACK at or below it acknowledges none."""
    pend = y.pending
    if pend and pend[0][0] < a:
        acked_ts = y.acked_ts
        i = 0
        n = len(pend)
        while i < n:
            ent = pend[i]
            if ent[0] >= a:
                break
            t0 = ent[2]
            if ent[1] == a and not ent[3] and acked_ts <= t0:
                rtt = ts - t0
                if y.rtt_n == 0 or rtt < y.rtt_min:
                    y.rtt_min = rtt
                if rtt > y.rtt_max:
                    y.rtt_max = rtt
                y.rtt_sum += rtt
                y.rtt_n += 1
            if t0 > acked_ts:
                acked_ts = t0
            i += 1
        del pend[:i]
        y.acked_ts = acked_ts
    y.floor = a
    seen = y.seen
    while seen and seen[0][1] <= a:
        del seen[0]
    if seen and seen[0][0] < a:
        seen[0][0] = a


def _network_duplicate(x: Half, key: int) -> bool:
    """Is the packet ``key`` (IP ID, sequence and acknowledgment numbers, flags, window and
    length, packed in one int) one of the last RECENT_PACKETS ``x`` sent? Else remember it."""
    recent = x.recent
    if key in recent:
        return True
    recent.append(key)
    if len(recent) > RECENT_PACKETS:
        del recent[0]
    return False


def _ack(x: Half, y: Half, ack: int, win: int, busy: int, rst: int, ts: float) -> None:
    """``x`` acknowledged ``y`` up to ``ack`` (32-bit) with window ``win``; ``busy``: the
    segment also carries data, SYN or FIN (then it is no duplicate ACK)."""
    if y.high is None:
        y.high = ack
    a = _unwrap(y.high, ack)
    if a > y.floor:
        _acknowledged(y, a, ts)
    if rst:
        return
    if win == 0:
        x.zero_wins += 1
    if not busy and ack == x.last_ack and win == x.last_win and (y.high > a or y.resent):
        x.dupacks += 1
    x.last_ack = ack
    x.last_win = win
    y.resent = False


class FlowTable:
    """Feed segments in capture order with :meth:`add`; :meth:`connections` gives
    every connection seen. ``accept(conn)`` decides, once per connection, whether
    it is analysed at all (the filters)."""

    counters = staticmethod(counters)        # (how the report reads its connections)

    def __init__(self, accept=None):
        self.table: dict[tuple, tuple[Conn | None, int]] = {}
        self.accept = accept
        self.done: list[Conn] = []           # connections replaced by a new one on the same tuple
        self.rejected = 0

    def _new(self, family, src, sport, dst, dport, flags, ts):
        """A connection, oriented: local is the client, the sender of a SYN or the receiver
        of a SYN-ACK. Without either (the capture began after the handshake) the server is
        the side with the lower port (a port below 1024, well known, always is); with equal
        ports the client is the first packet's sender."""
        if flags & SYN:
            client_sent = not flags & ACK
        else:
            client_sent = dport <= sport
        if client_sent:
            conn = Conn(family, src, sport, dst, dport, ts)
            d = 0
        else:
            conn = Conn(family, dst, dport, src, sport, ts)
            d = 1
        if self.accept is not None and not self.accept(conn):
            self.rejected += 1
            conn = None
        self.table[(src, sport, dst, dport)] = (conn, d)
        self.table[(dst, dport, src, sport)] = (conn, 1 - d)
        return conn, d

    def _opening(self, ent, seg: tuple, ts: float):
        """The connection and direction of a segment on a new tuple, or of a SYN on a known
        one: a new connection, unless the tuple's is still open and this SYN repeats its
        sender's (or is the first seen from it)."""
        family, src, sport, dst, dport, seq, _, flags = seg[:8]
        if ent is not None:
            conn, d = ent
            if conn is not None:
                x = conn.halves[d]
                if not conn.closed and (x.isn is None or x.isn == seq):
                    return ent
                self.done.append(conn)
        return self._new(family, src, sport, dst, dport, flags, ts)

    def add(self, ts: float, seg: tuple) -> None:
        family, src, sport, dst, dport, seq, ack, flags, win, plen, ipid = seg
        ent = self.table.get((src, sport, dst, dport))
        if ent is None or (flags & SYN and not flags & ACK):   # perhaps a new connection
            conn, d = self._opening(ent, seg, ts)
        else:
            conn, d = ent
        if conn is None:
            return
        conn.last_ts = ts
        conn.packets += 1
        x, y = conn.halves[d], conn.halves[1 - d]
        if ipid and _network_duplicate(x, ((((ipid << 32 | seq) << 32 | ack) << 16 | flags)
                                           << 16 | win) << 32 | plen):
            x.netdups += 1
            return
        x.segs += 1
        rst = flags & RST
        if rst:                               # (its ACK still acknowledges, as tcptrace has it;
            x.rsts += 1                       # it advertises no window and is no duplicate ACK)
            conn.closed = True
        syn = flags & SYN and 1
        if syn:
            _count_syn(conn, x, d, seq, flags, ts)
        fin = flags & FIN and 1
        if plen or syn or fin:
            _sent(x, y, seq, syn, fin, plen, ts)
        if flags & ACK:
            _ack(x, y, ack, win, plen or syn or fin, rst, ts)
            if d == 0 and conn.hs_ack_ts is None and conn.synack_ts is not None and not syn \
                    and not rst and y.isn is not None and ack == (y.isn + 1) & MASK:
                conn.hs_ack_ts = ts
        elif not rst:
            x.last_win = win if syn else 0    # (tcptrace's "effective window" of such a segment)
        if fin and y.fins:
            conn.closed = True

    def connections(self) -> Iterator[Conn]:
        yield from self.done
        seen: set[int] = set()
        for conn, _ in self.table.values():
            if conn is not None and id(conn) not in seen:
                seen.add(id(conn))
                yield conn

