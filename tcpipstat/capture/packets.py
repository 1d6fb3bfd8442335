"""Link-layer frames -> TCP segments (dpkt decodes Ethernet (with VLAN tags), Linux
cooked SLL and SLL2, raw IP, BSD loopback; IPv4 and IPv6 with extension headers).

A segment is a plain tuple (fast to build, fast to unpack in the flow loop):

    (family, src, sport, dst, dport, seq, ack, flags, window, payload_len, ip_id)

``src``/``dst`` are the raw address bytes (4 or 16); ``ip_id`` is IPv4's identification
field (0 for IPv6, which has none). ``payload_len`` comes from the
IP header's length, not from what was captured, so a packet cut by the snapshot
length (``tcpdump -s 96``) still counts its bytes; only a packet cut inside its IP
or TCP header cannot be used (counted in :attr:`DecodeStats.cut_headers`).
"""
from __future__ import annotations

from typing import Callable

import dpkt
from dpkt import ethernet, ip, ip6, sll, sll2, tcp

from .reader import LINKTYPES, DecodeStats

AF_INET, AF_INET6 = 2, 10
_IP, _IP6, _TCP = ip.IP, ip6.IP6, tcp.TCP
_DECODE_ERRORS = (dpkt.UnpackError, IndexError, ValueError, KeyError)


def _from_ip(pkt, stats: DecodeStats):
    """An IPv4 or IPv6 packet object -> a segment, or None."""
    if type(pkt) is _IP:
        seg = pkt.data
        if type(seg) is not _TCP:
            if pkt.p != 6:
                stats.other += 1
            elif pkt.offset:
                stats.fragments += 1
            else:
                stats.cut_headers += 1
            return None
        hl = pkt.hl * 4
        seglen = pkt.len - hl
        if pkt.len == 0:                 # segmentation offload: the length field is left 0
            seglen = len(seg)
        stats.tcp += 1
        return (AF_INET, pkt.src, seg.sport, pkt.dst, seg.dport, seg.seq, seg.ack, seg.flags,
                seg.win, max(0, seglen - seg.off * 4), pkt.id)
    if type(pkt) is _IP6:
        seg = pkt.data
        if type(seg) is not _TCP:
            if pkt.p != 6:
                stats.other += 1
            else:
                stats.cut_headers += 1
            return None
        ext = pkt.all_extension_headers
        seglen = pkt.plen - (sum(h.length for h in ext) if ext else 0)
        if pkt.plen == 0:                # a jumbogram: the length is in a hop-by-hop option
            seglen = len(seg)
        stats.tcp += 1
        return (AF_INET6, pkt.src, seg.sport, pkt.dst, seg.dport, seg.seq, seg.ack, seg.flags,
                seg.win, max(0, seglen - seg.off * 4), 0)
    if isinstance(pkt, bytes) and pkt and ((pkt[0] >> 4 == 4 and len(pkt) < 40)
                                           or (pkt[0] >> 4 == 6 and len(pkt) < 60)):
        stats.cut_headers += 1          # an IP header (or the TCP header after it) cut short
    else:
        stats.other += 1
    return None


def _raw(buf: bytes):
    v = buf[0] >> 4 if buf else 0
    if v == 4:
        return _IP(buf)
    if v == 6:
        return _IP6(buf)
    return None


def _null(order: str):
    def decode(buf: bytes):
        if len(buf) < 5:
            return None
        af = int.from_bytes(buf[:4], order)
        if af == 2:
            return _IP(buf[4:])
        if af in (10, 24, 28, 30):       # AF_INET6 on Linux, NetBSD/OpenBSD, FreeBSD, macOS
            return _IP6(buf[4:])
        return None
    return decode


_LINK: dict[int, Callable] = {
    1: lambda b: ethernet.Ethernet(b).data,
    113: lambda b: sll.SLL(b).data,
    276: lambda b: sll2.SLL2(b).data,
    101: _raw, 12: _raw, 14: _raw,
    228: lambda b: _IP(b),
    229: lambda b: _IP6(b),
    0: _null("little"),      # DLT_NULL: the address family in the writer's byte order (little,
                             # nearly always)
    108: _null("big"),       # DLT_LOOP: in network order
}
assert set(_LINK) == set(LINKTYPES)


def decoder(linktype: int, stats: DecodeStats) -> Callable[[bytes], tuple | None]:
    """A function frame bytes -> segment tuple or None (not TCP, or unusable)."""
    link = _LINK[linktype]

    def decode(buf: bytes):
        try:
            pkt = link(buf)
        except _DECODE_ERRORS:
            stats.cut_headers += 1      # shorter than the link header itself
            return None
        return _from_ip(pkt, stats)
    return decode
