"""Capture file -> link-layer frames, one at a time (pcap and pcapng).

pcapng's blocks are dpkt's (its block definitions, imported when a pcapng file is
read); pcap's two headers are simple enough to read with struct (PCAP_MAGICS), so that
the compiled path (fast.py) reads a pcap file without importing dpkt, a fifth of
tcpipstat's start-up. The record loop is ours, because dpkt's readers drop what a
report must say: a packet's original length (was it cut by the snapshot length?), a
record cut short by the end of the file (a truncated capture), the link type of each
pcapng interface (a pcapng file may mix them), and they give nanosecond pcap
timestamps as Decimal. Frames are yielded as they are read: memory does not grow with
the file.

Bad input never raises anything but the errors of tcpipstat/errors.py: a file
that cannot be opened or is not a capture -> UsageError naming the file; a file
that ends inside a record or holds a corrupt one -> reading stops there and
:attr:`ReadStats.stopped` says where and why (the caller reports what was read).
"""
from __future__ import annotations

import os
import stat
import sys
import struct
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator

from ..errors import UsageError

# link types (https://www.tcpdump.org/linktypes.html) tcpipstat decodes
LINKTYPES = {
    0: "BSD loopback",                 # LINKTYPE_NULL
    1: "Ethernet",                     # LINKTYPE_ETHERNET
    101: "raw IP",                     # LINKTYPE_RAW
    12: "raw IP",                      # DLT_RAW as most systems number it (some files carry it)
    14: "raw IP",                      # ... and OpenBSD
    108: "OpenBSD loopback",           # LINKTYPE_LOOP
    113: "Linux cooked (SLL)",         # LINKTYPE_LINUX_SLL (tcpdump -i any, older)
    228: "raw IPv4",                   # LINKTYPE_IPV4
    229: "raw IPv6",                   # LINKTYPE_IPV6
    276: "Linux cooked v2 (SLL2)",     # LINKTYPE_LINUX_SLL2 (tcpdump -i any)
}
# a pcap file's magic (read big-endian) -> what its records are: (record header length,
# little-endian, nanosecond time stamps); dpkt's pcap.MAGIC_TO_PKT_HDR, written out
PCAP_MAGICS = {
    0xA1B2C3D4: (16, False, False),            # tcpdump's
    0xA1B23C4D: (16, False, True),             # ... with nanoseconds
    0xA1B2CD34: (24, False, False),            # Kuznetzov's modified pcap
    0xD4C3B2A1: (16, True, False),             # the same three, written little-endian
    0x4D3CB2A1: (16, True, True),
    0x34CDB2A1: (24, True, False),
}
PCAP_FILE_HEADER = 24                          # magic, versions, zone, sigfigs, snaplen, link type
PCAPNG_MAGIC = 0x0A0D0D0A                      # a section header's type: the same both ways
MAX_RECORD = 256 * 1024 * 1024                 # larger: a corrupt header, not a packet
CHUNK = 1 << 20                                # larger reads go by chunks (see _read_up_to)


@dataclass
class DecodeStats:
    """What packets.py (and the compiled decoder) counted of the frames read. (Here, not in
    packets.py, because packets.py imports dpkt, which only some captures need.)"""
    tcp: int = 0              # TCP segments decoded
    other: int = 0            # not IP, or IP but not TCP (ARP, UDP, ICMP, ...)
    fragments: int = 0        # IPv4 fragments after the first (they carry no TCP header)
    cut_headers: int = 0      # cut by the snapshot length inside the IP or TCP header


@dataclass
class ReadStats:
    frames: int = 0
    cut: int = 0                                # frames shorter than on the wire (snapshot length)
    unknown_link: dict[int, int] = field(default_factory=dict)   # link type -> frames skipped
    stopped: str = ""                           # why reading stopped early ("": it did not)
    format: str = ""                            # "pcap" or "pcapng"
    linktypes: set[int] = field(default_factory=set)


def _not_capture(path: str, head: bytes) -> UsageError:
    hint = ""
    if head[:2] == b"\x1f\x8b":
        hint = " (it is gzip-compressed: gunzip it first)"
    elif not head:
        return UsageError(f"cannot read capture '{path}': the file is empty")
    return UsageError(f"cannot read capture '{path}': not a pcap or pcapng file{hint} "
                      f"(it starts with {head[:8].hex(' ')})")


def open_capture(path: str) -> IO[bytes]:
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):    # (open() waits for a writer: say so)
            print(f"tcpipstat: '{path}' is a FIFO: waiting for a writer (Ctrl-C to stop)",
                  file=sys.stderr, flush=True)
        return open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise UsageError(f"cannot read capture '{path}': {e.strerror}") from None


def frames(path: str, stats: ReadStats) -> Iterator[tuple[float, int, bytes]]:
    """(timestamp in seconds, link type, frame bytes) of every packet record."""
    with open_capture(path) as f:
        if capture_format(path, f, stats) == "pcapng":
            yield from _pcapng(path, f, stats)
        else:
            yield from _pcap(path, f, stats)


def capture_format(path: str, f: IO[bytes], stats: ReadStats) -> str:
    """"pcap" or "pcapng", from the file's first bytes (peeked, not read: a FIFO cannot
    seek); UsageError when it is neither."""
    try:
        head = f.peek(4)[:4]
    except OSError as e:
        raise UsageError(f"cannot read capture '{path}': {e.strerror}") from None
    magic_be = int.from_bytes(head, "big") if len(head) == 4 else None
    if magic_be == PCAPNG_MAGIC:
        stats.format = "pcapng"
    elif magic_be in PCAP_MAGICS:
        stats.format = "pcap"
    else:
        raise _not_capture(path, f.read(8))     # (the first bytes, once)
    return stats.format


def _unsupported(path: str, linktype: int) -> UsageError:
    return UsageError(f"cannot read capture '{path}': link type {linktype} is not supported "
                      "(tcpipstat reads Ethernet, Linux cooked SLL and SLL2, raw IP and BSD "
                      "loopback captures); convert it, e.g. with editcap -T ether")


@dataclass
class PcapHeader:
    """What a pcap file header says about the records that follow it."""
    record_len: int          # a record header's length
    little: bool             # its byte order
    ticks: float             # sub-second units per second (microseconds or nanoseconds)
    linktype: int
    snaplen: int             # no record holds more (0: the file does not say)


def pcap_header(path: str, f: IO[bytes], stats: ReadStats) -> PcapHeader:
    """Read the pcap file header; UsageError when it is cut or of an unsupported link type."""
    buf = f.read(PCAP_FILE_HEADER)
    if len(buf) < PCAP_FILE_HEADER:
        raise UsageError(f"cannot read capture '{path}': the file ends inside the pcap file header "
                         f"({len(buf)} of {PCAP_FILE_HEADER} bytes)")
    record_len, little, nano = PCAP_MAGICS[int.from_bytes(buf[:4], "big")]
    linktype = int.from_bytes(buf[20:24], "little" if little else "big")
    linktype &= 0xFFFF                     # the upper bits may carry FCS information
    stats.linktypes.add(linktype)
    if linktype not in LINKTYPES:
        raise _unsupported(path, linktype)
    snaplen = int.from_bytes(buf[16:20], "little" if little else "big")
    return PcapHeader(record_len, little, 1e9 if nano else 1e6, linktype, snaplen)


# Why reading stopped early, by the code the compiled reader (tcpipstat/capture/fast.py)
# returns too, so that both say it in the same words.
STOPPED = {
    "record-header-cut": "the file ends inside the header of packet {0} (a truncated capture)",
    "impossible-caplen": "packet {0} has an impossible captured length ({1} bytes): the file "
                         "is corrupt from there on",
    "over-snaplen": "packet {0} claims {1} captured bytes, more than its capture's snapshot "
                    "length ({2}): the file is corrupt from there on",
    "packet-cut": "the file ends inside packet {0} ({1} of its {2} bytes; a truncated capture)",
    "block-header-cut": "the file ends inside a block header (a truncated capture)",
    "impossible-block": "block after packet {0} has an impossible length ({1} bytes): the file "
                        "is corrupt from there on",
    "block-cut": "the file ends inside the block after packet {0} ({1} of its {2} bytes; a "
                 "truncated capture)",
    "corrupt-packet-block": "a corrupt packet block after packet {0}",
    "bad-interface": "packet {0} names interface {1} or a length that does not exist: the "
                     "file is corrupt from there on",
    "corrupt-simple-block": "a corrupt simple packet block after packet {0}",
}


def _read_up_to(read: Callable[[int], bytes], n: int) -> bytes:
    """read(n), but a corrupt length near MAX_RECORD costs only the bytes the file has:
    read(n) alone sets aside n bytes before it finds the file shorter."""
    if n <= CHUNK:
        return read(n)
    parts = []
    while n > 0 and (part := read(min(n, CHUNK))):
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _pcap(path: str, f: IO[bytes], stats: ReadStats) -> Iterator[tuple[float, int, bytes]]:
    head = pcap_header(path, f, stats)
    # a record header's fields: seconds, sub-seconds, captured length, original length (...)
    unpack = struct.Struct(("<" if head.little else ">") + "IIII").unpack_from
    hlen, div, linktype, snap = head.record_len, head.ticks, head.linktype, head.snaplen
    read = f.read
    n = 0
    cut = 0
    try:
        while True:
            h = read(hlen)
            if len(h) < hlen:
                if h:
                    stats.stopped = STOPPED["record-header-cut"].format(n + 1)
                break
            sec, sub, caplen, wirelen = unpack(h)
            if caplen > MAX_RECORD:
                stats.stopped = STOPPED["impossible-caplen"].format(n + 1, caplen)
                break
            if 0 < snap < caplen:
                stats.stopped = STOPPED["over-snaplen"].format(n + 1, caplen, snap)
                break
            data = _read_up_to(read, caplen)
            if len(data) < caplen:
                stats.stopped = STOPPED["packet-cut"].format(n + 1, len(data), caplen)
                break
            n += 1
            if caplen < wirelen:
                cut += 1
            yield sec + sub / div, linktype, data
    finally:
        stats.frames += n
        stats.cut += cut


def _pcapng(path: str, f: IO[bytes], stats: ReadStats) -> Iterator[tuple[float, int, bytes]]:
    from dpkt import pcapng as dpcapng
    read = f.read
    fmt = "<"
    ifaces: list[tuple[int, float, int, int]] = []     # _idb's, one an interface
    n = cut = section = 0
    try:
        while True:
            h = read(8)
            if len(h) < 8:
                if h:
                    stats.stopped = STOPPED["block-header-cut"]
                break
            btype = struct.unpack_from(fmt + "I", h)[0]
            if btype == dpcapng.PCAPNG_BT_SHB:      # a (new) section: byte order, interfaces anew
                fmt = _section_header(path, read, h, section == 0, stats)
                if not fmt:
                    break
                ifaces = []
                section += 1
                continue
            if section == 0:
                raise _not_capture(path, h)
            blen = struct.unpack_from(fmt + "I", h, 4)[0]
            sane = 12 <= blen <= MAX_RECORD and not blen % 4
            body = _read_up_to(read, blen - 8) if sane else None
            if body is None or len(body) < blen - 8:
                stats.stopped = _bad_block(n, blen, body)
                break
            if btype == dpcapng.PCAPNG_BT_EPB:     # (nearly every block: inline)
                if len(body) < 24:
                    stats.stopped = STOPPED["corrupt-packet-block"].format(n)
                    break
                iid, hi, lo, caplen, wirelen = struct.unpack_from(fmt + "IIIII", body)
                if iid >= len(ifaces) or caplen > len(body) - 24:
                    stats.stopped = STOPPED["bad-interface"].format(n + 1, iid)
                    break
                linktype, tps, off, snap = ifaces[iid]
                if 0 < snap < caplen:
                    stats.stopped = STOPPED["over-snaplen"].format(n + 1, caplen, snap)
                    break
                ts = off + ((hi << 32) | lo) / tps
                data = body[20:20 + caplen]
            elif btype == dpcapng.PCAPNG_BT_SPB:
                spb = _simple_packet(fmt, body, ifaces, n, stats)
                if spb is None:
                    break
                ts, linktype, data, wirelen = spb
            else:
                if btype == dpcapng.PCAPNG_BT_IDB and not _add_interface(fmt, h + body, ifaces,
                                                                          n, stats):
                    break
                continue        # other blocks (name resolution, statistics, ...): no packets
            n += 1
            if linktype not in LINKTYPES:
                stats.unknown_link[linktype] = stats.unknown_link.get(linktype, 0) + 1
                continue
            if len(data) < wirelen:
                cut += 1
            yield ts, linktype, data
    finally:
        stats.frames += n
        stats.cut += cut


def _add_interface(fmt: str, block: bytes, ifaces: list, n: int, stats: ReadStats) -> bool:
    """Add an interface description block's interface; False when it is corrupt (what was
    read before it is kept, like before a corrupt packet)."""
    iface = _idb(fmt, block, stats)
    if iface is None:
        stats.stopped = (f"a corrupt interface description block after packet {n}: the file "
                         "is corrupt from there on")
        return False
    ifaces.append(iface)
    return True


def _bad_block(n: int, blen: int, body: bytes | None) -> str:
    """Why reading stops at the block after packet ``n``, of length ``blen``: ``body`` is
    None when that length is impossible, else the part of the block the file holds."""
    if body is None:
        return STOPPED["impossible-block"].format(n, blen)
    return STOPPED["block-cut"].format(n, len(body) + 8, blen)


def _simple_packet(fmt: str, body: bytes, ifaces: list, n: int, stats: ReadStats):
    """A simple packet block's (time stamp, link type, frame, original length): interface
    0's, no time stamp; None when it is corrupt (``stats.stopped`` says so)."""
    if not ifaces or len(body) < 4:
        stats.stopped = STOPPED["corrupt-simple-block"].format(n)
        return None
    wirelen = struct.unpack_from(fmt + "I", body)[0]
    return 0.0, ifaces[0][0], body[4:4 + min(wirelen, len(body) - 4)], wirelen


def _section_header(path: str, read, h: bytes, first: bool, stats: ReadStats) -> str:
    """The rest of a section header block whose first 8 bytes are ``h``: the section's
    byte order as a struct prefix, or "" when the file stops there (``stats.stopped`` says
    why). A bad first section is no pcapng file at all: UsageError."""
    bom = read(4)
    if len(bom) < 4:
        stats.stopped = "the file ends inside a section header (a truncated capture)"
        return ""
    if bom == b"\x4d\x3c\x2b\x1a":
        fmt = "<"
    elif bom == b"\x1a\x2b\x3c\x4d":
        fmt = ">"
    else:
        if first:
            raise _not_capture(path, h + bom)
        stats.stopped = "a section header with an unknown byte order: the file is corrupt"
        return ""
    from dpkt import pcapng as dpcapng
    blen = struct.unpack_from(fmt + "I", h, 4)[0]
    if blen < dpcapng.SectionHeaderBlock.__hdr_len__ or blen % 4 or blen > MAX_RECORD:
        if first:
            raise UsageError(f"cannot read capture '{path}': a corrupt pcapng section header")
        stats.stopped = "a corrupt section header"
        return ""
    body = read(blen - 12)
    if len(body) < blen - 12:
        stats.stopped = "the file ends inside a section header (a truncated capture)"
        return ""
    return fmt


def _idb(fmt: str, buf: bytes, stats: ReadStats) -> tuple[int, float, int, int] | None:
    """An interface's (link type, ticks per second, offset, snapshot length: 0 for none);
    None when the block is corrupt (what was read before it is kept, like after a corrupt
    packet)."""
    import dpkt
    from dpkt import pcapng as dpcapng
    cls = dpcapng.InterfaceDescriptionBlockLE if fmt == "<" else dpcapng.InterfaceDescriptionBlock
    try:
        idb = cls(buf)
    except (dpkt.UnpackError, struct.error, ValueError):
        return None
    tps, off = 1e6, 0
    for opt in getattr(idb, "opts", ()):
        if opt.code == dpcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
            v = opt.data[0]
            tps = float(2 ** (v & 0x7F) if v & 0x80 else 10 ** (v & 0x7F))
        elif opt.code == dpcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) >= 8:
            off = struct.unpack_from(fmt + "q", opt.data)[0]
    linktype = idb.linktype
    stats.linktypes.add(linktype)
    return linktype, tps, off, idb.snaplen
