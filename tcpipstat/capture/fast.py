"""The compiled --read path, and the choice between it and the pure-Python one.

tcpipstat.capture._fast (C, tcpipstat/capture/csrc/, built by ``pip install .``) reads
the capture's records in large blocks, decodes the usual Ethernet, Linux cooked, raw
and loopback frames of IPv4 and IPv6 TCP itself, and keeps flows.py's per-connection
state in plain structs: no Python object per packet. Python still does what is rare or
long in rules: pcapng section headers and interface descriptions (reader.py's own
functions), frames of any other kind (packets.py, with dpkt: ``_fallback``), the filters
(once per connection), and at the end the report: the engine gives each connection's
final state (a ConnState: the field names of flows.py's Conn) and flows.counters() of it
(the report's view of a connection, ported to C too: in Python it was a sixth of the time
of a capture of many short connections), so that rows.py and fields.py serve both paths.

The pure-Python path (reader.py, packets.py, flows.py) is the reference: the two give
byte-identical output (tests/test_capture_fast.py runs both on every capture fixture).
It also runs where the extension was not built (no C compiler or Python headers at
install time) or does not import. TCPIPSTAT_READER chooses: unset or ``auto``, the
compiled path when it imports; ``compiled``, that one or an error; ``python``, the
reference. When it is set, tcpipstat says on stderr which path ran.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from ..errors import EnvironmentNotReady, UsageError
from .flows import MAX_HOLES, MAX_PENDING, RECENT_PACKETS
from .reader import (LINKTYPES, MAX_RECORD, STOPPED, DecodeStats, _add_interface,
                     _not_capture, _section_header, capture_format, open_capture, pcap_header)

ENV = "TCPIPSTAT_READER"
CHOICES = ("auto", "compiled", "python")

try:
    _fast = importlib.import_module("._fast", __package__)
    UNAVAILABLE = ""
except ModuleNotFoundError:
    _fast, UNAVAILABLE = None, ("it was not built (no C compiler or no Python headers when "
                                "tcpipstat was installed)")
except ImportError as e:        # built for another Python, or broken: the reference runs
    _fast, UNAVAILABLE = None, str(e)
if _fast is not None and _fast.RECENT_PACKETS != RECENT_PACKETS:
    _fast, UNAVAILABLE = None, "it was built from other sources than this tcpipstat's"


@dataclass(frozen=True)
class Reader:
    compiled: bool
    note: str           # which path runs and why, for stderr ("" when TCPIPSTAT_READER is unset)


def choose() -> Reader:
    """The path --read takes, from TCPIPSTAT_READER (checked before anything is read)."""
    want = os.environ.get(ENV)
    if want is None:
        return Reader(_fast is not None, "")
    if want not in CHOICES:
        raise UsageError(f"bad {ENV} '{want}': expected one of {', '.join(CHOICES)}")
    if want == "python":
        return Reader(False, f"--read: the pure-Python reader ({ENV}=python)")
    if _fast is not None:
        return Reader(True, "--read: the compiled reader (tcpipstat.capture._fast)")
    if want == "compiled":
        raise EnvironmentNotReady(
            f"{ENV}=compiled, but the compiled reader is not available: {UNAVAILABLE}",
            "reinstall tcpipstat where a C compiler and Python's headers are installed "
            "(apt-get install gcc python3-dev; pip install .)")
    return Reader(False, f"--read: the pure-Python reader (the compiled one is not "
                         f"available: {UNAVAILABLE})")


class Connections:
    """What Capture reads of a FlowTable, from the compiled path: every connection (a
    ConnState: the fields of a Conn and its Halves that the report reads, by the same
    names), in FlowTable.connections()'s order, and how many the filters refused."""

    def __init__(self, conns: list, rejected: int):
        self.conns, self.rejected = conns, rejected
        self.counters = _fast.counters      # flows.counters(), in C (csrc/counters.c)

    def connections(self):
        return iter(self.conns)


def read_capture(cap, accept, progress, every: int) -> None:
    """analyse()'s work on the compiled path: fills ``cap`` (a Capture) as the Python
    path does. ``accept(family, laddr, lport, raddr, rport)``: the filters, or None."""
    stats = cap.read
    with open_capture(cap.path) as f:
        pcap = None
        if capture_format(cap.path, f, stats) == "pcap":
            h = pcap_header(cap.path, f, stats)
            pcap = (h.record_len, h.little, h.ticks, h.linktype, h.snaplen)
        eng = _fast.Engine(f.read1, _fallback(cap.decoded), accept, progress, every,
                           tuple(LINKTYPES), MAX_PENDING, MAX_HOLES, MAX_RECORD, pcap)
        try:
            if pcap is None:
                _pcapng_blocks(eng, cap.path, stats)
            else:
                eng.run()
        except KeyboardInterrupt:
            cap.interrupted, cap.interrupted_at = True, eng.seen
        finally:
            _collect(eng, cap)


def _pcapng_blocks(eng, path: str, stats) -> None:
    """Run the engine through a pcapng file, reading the blocks it hands back as
    reader._pcapng does (a section header through the engine's own buffer)."""
    fmt, section = "<", 0
    while (block := eng.run()) is not None:
        kind, raw = block
        if kind == "not-capture":
            raise _not_capture(path, raw)
        if kind == "section":
            fmt = _section_header(path, eng.read, raw, section == 0, stats)
            if not fmt:
                return
            eng.new_section(fmt == "<")
            section += 1
            continue
        added: list[tuple[int, float, int, int]] = []
        if not _add_interface(fmt, raw, added, eng.frames, stats):
            return
        eng.add_interface(*added[0])


def _fallback(stats: DecodeStats):
    """packets.py's decoding of one frame, for the frames the engine leaves to dpkt; its
    exceptions are the engine's to count (as malformed, like analyse() in Python). (dpkt,
    which packets.py imports, is imported at the first such frame: most captures have
    none.)"""
    decoders: dict[int, object] = {}

    def decode(linktype: int, data: bytes):
        dec = decoders.get(linktype)
        if dec is None:
            from .packets import decoder
            dec = decoders[linktype] = decoder(linktype, stats)
        return dec(data)
    return decode


def _collect(eng, cap) -> None:
    """The engine's counts and connections into ``cap``, added to what Python counted."""
    r, d = cap.read, cap.decoded
    r.frames += eng.frames
    r.cut += eng.cut
    for linktype, n in eng.unknown_link.items():
        r.unknown_link[linktype] = r.unknown_link.get(linktype, 0) + n
    if eng.stopped is not None:
        code, args = eng.stopped
        r.stopped = STOPPED[code].format(*args)
    d.tcp += eng.tcp
    d.other += eng.other
    cap.malformed = eng.malformed
    cap.first_ts, cap.last_ts = eng.times
    cap.flows = Connections(eng.connections(), eng.rejected)
