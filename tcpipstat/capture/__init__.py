"""Offline: the per-connection report from a packet capture (``tcpipstat --read FILE``).

Data flows one way, one module per step:

=============  =====================================================================
reader.py      capture file (pcap, pcapng) -> link-layer frames, streamed
packets.py     frames -> TCP segments (dpkt: Ethernet, SLL, SLL2, raw IP; IPv4, IPv6)
flows.py       segments -> per-connection state -> per-connection counters
rows.py        connections -> the model's report rows, grouped by the index
fields.py      the counters a capture can show: the report's catalogue
fast.py        the compiled path (csrc/: reading, decoding, flows in C), and the choice
=============  =====================================================================

and then the live tool's report layer (tcpipstat/report.py) prints the rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..filters import Filter
from . import fast
from .flows import Conn, FlowTable
from .reader import LINKTYPES, DecodeStats, ReadStats, _unsupported, frames
from .rows import build_rows


@dataclass
class Capture:
    """What one capture file held, analysed."""
    path: str
    read: ReadStats = field(default_factory=ReadStats)
    decoded: DecodeStats = field(default_factory=DecodeStats)
    flows: FlowTable | fast.Connections = field(default_factory=FlowTable)
    malformed: int = 0
    interrupted: bool = False      # Ctrl-C while reading: the report holds what was read
    interrupted_at: int = 0        # packets read by then
    first_ts: float | None = None
    last_ts: float | None = None
    reader_note: str = ""          # which path read it, when TCPIPSTAT_READER asks (fast.py)

    @property
    def duration_s(self) -> float | None:
        if self.first_ts is None or self.last_ts is None:
            return None
        return max(0.0, self.last_ts - self.first_ts)

    def connections(self) -> list[Conn]:
        return [c for c in self.flows.connections() if c.packets]

    def rows(self, index: str):
        return build_rows(self.connections(), index, self.flows.counters)

    def notes(self) -> list[str]:
        """Warnings, with counts, about what could not be used."""
        r, d, notes = self.read, self.decoded, []
        if r.cut:
            notes.append(f"{r.cut:,} of {r.frames:,} packets were cut by the snapshot length: "
                         "their payload is counted from the IP header's length")
        if d.cut_headers:
            notes.append(f"{d.cut_headers:,} packets were cut inside their IP or TCP header and "
                         "could not be used (record with a snapshot length of at least 96 bytes: "
                         "tcpdump -s 96)")
        if r.unknown_link:
            kinds = ", ".join(f"{n:,} of link type {lt}"
                              for lt, n in sorted(r.unknown_link.items()))
            notes.append(f"packets of unsupported link types were skipped: {kinds}")
        if d.fragments:
            notes.append(f"{d.fragments:,} IPv4 fragments after the first were skipped "
                         "(no TCP header)")
        if self.malformed:
            notes.append(f"{self.malformed:,} packets could not be decoded and were skipped")
        notes += self._flow_notes()
        if self.interrupted:
            notes.append(f"interrupted (Ctrl-C) after {self.interrupted_at:,} packets: the "
                         "report holds what was read")
        if r.frames == 0 and not r.stopped and not self.interrupted:
            notes.append(f"the capture '{self.path}' holds no packets")
        return notes

    def _flow_notes(self) -> list[str]:
        """What the connections' orientation and counts rest on, where it is not the usual."""
        conns = self.connections()
        notes = []
        unopened = sum(1 for c in conns if not c.opened and not c.synack_n)
        if unopened:
            notes.append(f"{unopened:,} connections began before the capture (no SYN or "
                         "SYN-ACK seen): oriented by their ports, the lower port taken as the "
                         "server's (remote)")
        dups = sum(h.netdups for c in conns for h in c.halves)
        if dups:
            notes.append(f"{dups:,} packets were seen twice (the same IPv4 packet, IP ID "
                         "included: duplicated by the network or the capture setup): counted "
                         "as NetDups only")
        return notes


def accept_filters(filters: tuple[Filter, ...] | list[Filter]):
    """The live tool's filters, applied to a connection (local = its client, the side that
    opened it or, without its handshake, the side of the higher port: FlowTable._new)."""
    match = match_filters(filters)
    if match is None:
        return None
    return lambda conn: match(conn.family, conn.laddr, conn.lport, conn.raddr, conn.rport)


def match_filters(filters: tuple[Filter, ...] | list[Filter]):
    """The same, on the tuple a connection is oriented as (what the compiled path has)."""
    if not filters:
        return None

    def accept(family: int, laddr: bytes, lport: int, raddr: bytes, rport: int) -> bool:
        la, ra = int.from_bytes(laddr, "big"), int.from_bytes(raddr, "big")
        return any(f.matches(family, la, lport, ra, rport) for f in filters)
    return accept


PROGRESS_EVERY = 1 << 16        # packets between two calls of analyse()'s progress


def analyse(path: str, filters=(), progress=None) -> Capture:
    """Read and analyse one capture file. Raises UsageError when it cannot be read at
    all; a file that ends early is analysed up to there (``read.stopped`` says why).
    ``progress(packets)``, if given, is called every PROGRESS_EVERY packets. The compiled
    path reads it when it is there, else the pure-Python one (fast.py)."""
    reader = fast.choose()
    cap = Capture(path, reader_note=reader.note)
    if reader.compiled:
        fast.read_capture(cap, match_filters(filters), progress, PROGRESS_EVERY)
    else:
        cap.flows = FlowTable(accept_filters(filters))
        _read_python(cap, progress)
    r = cap.read
    if r.frames and sum(r.unknown_link.values()) == r.frames:
        raise _unsupported(path, min(r.unknown_link))
    return cap


def _read_python(cap: Capture, progress) -> None:
    """The reference path: reader.py's frames, packets.py's decoders, flows.py's table."""
    from .packets import decoder        # (dpkt: imported only by what needs it)
    decoders: dict[int, object] = {}
    add = cap.flows.add
    first = last = None
    malformed = seen = 0
    try:
        for ts, linktype, data in frames(cap.path, cap.read):
            seen += 1
            if progress is not None and not seen % PROGRESS_EVERY:
                progress(seen)
            dec = decoders.get(linktype)
            if dec is None:
                dec = decoders[linktype] = decoder(linktype, cap.decoded)
            if first is None:
                first = ts
            last = ts
            try:
                seg = dec(data)
            except Exception:      # noqa: BLE001 - arbitrary bytes: count them, never a traceback
                malformed += 1
                continue
            if seg is not None:
                add(ts, seg)
    except KeyboardInterrupt:
        cap.interrupted, cap.interrupted_at = True, seen
    cap.first_ts, cap.last_ts, cap.malformed = first, last, malformed


__all__ = ["Capture", "analyse", "accept_filters", "match_filters", "LINKTYPES"]
