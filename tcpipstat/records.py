"""The collector's output lines -> typed records.

The script (stp_templates/tcpipstat.stp.j2) writes tab-separated lines:

``H  tcpipstat  FORMAT  VERSION  START_MS  NFILTERS  MAX_SOCKETS  COUNTER,COUNTER,...``
    once, from the begin probe.
``R  REASON  FAMILY  LADDR_HI  LADDR_LO  LPORT  RADDR_HI  RADDR_LO  RPORT  PID  COMM  FLAGS  NAME=VALUE...``
    one socket tuple's counts since it was last written out. REASON is ``close``
    (the socket closed), ``spill`` (the table was emptied to make room),
    ``interval`` (an interval ended) or ``end``. Addresses are hex: IPv4 in the
    low word, IPv6 as two 64-bit halves. PID/COMM: the process that last used the
    socket in process context (0 and "" if none did); COMM is escaped by stap's
    text_str(). FLAGS: bit 0 = that process was the -c command or one of its
    descendants when it used the socket (format 1 has no FLAGS field). Several
    records for one tuple add up.
``I  SEQ  MS``
    interval mode: interval SEQ ended at MS (gettimeofday_ms); the records of its
    sockets came just before.
``E  FAMILY  LADDR_HI  LADDR_LO  LPORT  RADDR_HI  RADDR_LO  RPORT  MS  NAME=VALUE...``
    --rfc4898: a socket the filters accept closed at MS; its RFC 4898 variables
    (tcpipstat/estats.py), -1 for one this kernel does not keep.
``S  EVENT  US  FAMILY  LADDR_HI  LADDR_LO  LPORT  RADDR_HI  RADDR_LO  RPORT  NAME=VALUE...``
    --sample: a connection's state US microseconds after collection began, after an
    ACK (EVENT ack) or as it closed (EVENT end); names in tcpipstat/series.py.
``T  END_MS  IDS  SPILLS  DROPPED  FAULTS  [PFULL]``
    once, from the end probe. IDS: records written (tcpipstat 0.1: socket ids
    handed out). SPILLS: times the tables were emptied to make room. DROPPED:
    events lost because a table was full (more sockets busy between two checks
    than half of MAX_SOCKETS). FAULTS: events a probe could not read. PFULL
    (absent in older recordings: read as 0): times the
    process table was found full, so some records may lack their process.

Lines starting with ``#`` are comments (tcpipstat --save-records writes one).
Anything else on stdout is an error: it names the source, the line number and
the text.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

from .errors import RecordParseError
from .estats import EVAR_BY_NAME as _EVAR_NAMES
from .series import FIELD_NAMES as _SAMPLE_FIELDS, SAMPLE_KINDS, Sample

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)   # format 1 (tcpipstat 0.1): no FLAGS field, no intervals
REASONS = ("close", "spill", "interval", "end")
AF_INET, AF_INET6 = 2, 10


class Tuple(NamedTuple):
    """A socket's address tuple (a NamedTuple: hashed and compared in C, it keys every
    per-socket table of the model)."""
    family: int
    laddr: int
    lport: int
    raddr: int
    rport: int

    def addr_str(self, which: str) -> str:
        value = self.laddr if which == "l" else self.raddr
        if self.family == AF_INET6:
            return str(ipaddress.IPv6Address(value))
        return str(ipaddress.IPv4Address(value & 0xFFFFFFFF))


@dataclass(frozen=True)
class Header:
    format: int
    version: str
    start_ms: int
    nfilters: int
    max_sockets: int
    counters: tuple[str, ...]


@dataclass(frozen=True)
class SocketRecord:
    reason: str
    tuple: Tuple
    pid: int
    comm: str
    counters: dict[str, int] = field(hash=False)
    in_tree: bool = False


@dataclass(frozen=True)
class EstatsRecord:
    """--rfc4898: a socket's RFC 4898 variables as it closed (None: not on this kernel)."""
    tuple: Tuple
    ms: int
    values: dict[str, int | None] = field(hash=False)


@dataclass(frozen=True)
class SampleRecord:
    """--sample: one connection's state after an ACK (or ``end`` as it closed)."""
    tuple: Tuple
    sample: Sample


@dataclass(frozen=True)
class IntervalMark:
    seq: int
    ms: int


@dataclass(frozen=True)
class Trailer:
    end_ms: int
    ids: int
    spills: int
    dropped: int          # events lost because a collector table was full
    faults: int           # events a probe could not read
    pfull: int = 0        # times the process table was full (attribution may be missing)
    ended: int = 0        # what ended the run: a key of ENDED_BY (0: not recorded)


# The trailer's last field (tcpipstat.stp.j2, tis_finish): what ended the run. Only "stap"
# leaves the last records at risk on stap < 5.1 (they are written as the module exits).
ENDED_BY = {1: "timeout", 2: "count", 3: "request", 4: "stap"}


_tuple_new = tuple.__new__     # (a Tuple made without NamedTuple's Python-level __new__)

Record = Header | SocketRecord | Trailer | IntervalMark | EstatsRecord | SampleRecord


# --dist: "h.STATE.BUCKET": stays in congestion state STATE (0-4, enum tcp_ca_state) that
# lasted 2^BUCKET to 2^(BUCKET+1) - 1 microseconds. Kept with the counters (they add up alike).
_HIST_NAME = re.compile(r"h\.[0-4]\.(?:[0-9]|[1-5][0-9]|6[0-3])\Z")


def hist_key(name: str) -> tuple[int, int] | None:
    """(state, bucket) of a histogram field name, else None."""
    if not name.startswith("h."):
        return None
    _, s, b = name.split(".")
    return int(s), int(b)


def _hex64(tok: str) -> int:
    v = int(tok, 16)
    if v < 0 or v >= 1 << 64:
        raise ValueError(tok)
    return v


def unescape_comm(text: str) -> str:
    """Undo stap's text_str() C-style escapes (\\n, \\t, \\\\, \\", \\ooo)."""
    if "\\" not in text:
        return text
    out = bytearray()
    i = 0
    simple = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "\\": 92, '"': 34, "'": 39, "?": 63}
    raw = text.encode("latin-1", "replace")
    while i < len(raw):
        c = raw[i]
        if c == 92 and i + 1 < len(raw):
            n = chr(raw[i + 1])
            if n in simple:
                out.append(simple[n])
                i += 2
                continue
            j = i + 1
            while j < len(raw) and j < i + 4 and 48 <= raw[j] <= 55:
                j += 1
            if j > i + 1:
                out.append(int(raw[i + 1:j], 8) & 0xFF)
                i = j
                continue
        out.append(c)
        i += 1
    return out.decode("utf-8", "replace")


class Parser:
    """Parses one stream of collector output; keeps the header's counter names."""

    def __init__(self, source: str = "<stap>"):
        self.source = source
        self.header: Header | None = None
        self.trailer: Trailer | None = None
        self._known: frozenset[str] = frozenset()
        self._valid: set[str] = set()     # counter names seen valid: the header's, histogram fields
        self._fixed = 12

    def _err(self, lineno: int, line: str, why: str) -> RecordParseError:
        return RecordParseError(self.source, lineno, line, why)

    def parse_line(self, line: str, lineno: int) -> Record | None:
        line = line.rstrip("\n")
        if not line or line.startswith("#"):   # '#' lines: comments in saved record files
            return None
        f = line.split("\t")
        kind = f[0]
        try:
            if kind == "R":       # nearly every line
                if self.header is None:
                    raise self._err(lineno, line, "socket record before the header")
                fixed = self._fixed
                if len(f) < fixed:
                    raise self._err(lineno, line, "socket record has too few fields")
                reason = f[1]
                if reason not in REASONS:
                    raise self._err(lineno, line, f"unknown reason {reason!r}")
                t = self._tuple(f, 2, lineno, line)
                flags = int(f[11]) if fixed == 12 else 0
                counters = self._counters(f, fixed, lineno, line)
                return SocketRecord(reason, t, int(f[9]), unescape_comm(f[10]), counters, bool(flags & 1))
            if kind == "H":
                if len(f) != 8 or f[1] != "tcpipstat":
                    raise self._err(lineno, line, "malformed header")
                if int(f[2]) not in READABLE_FORMATS:
                    raise self._err(lineno, line, f"record format {f[2]} is not one of "
                                                  f"{', '.join(map(str, READABLE_FORMATS))} "
                                                  "(script and parser from different tcpipstat versions)")
                counters = tuple(c for c in f[7].split(",") if c)
                self.header = Header(int(f[2]), f[3], int(f[4]), int(f[5]), int(f[6]), counters)
                self._known = frozenset(counters)
                self._valid = set(counters)
                self._fixed = 11 if self.header.format == 1 else 12    # fields before the counters
                return self.header
            if kind == "I":
                if self.header is None or len(f) != 3:
                    raise self._err(lineno, line, "malformed interval mark")
                return IntervalMark(int(f[1]), int(f[2]))
            if kind == "S":
                if self.header is None or len(f) < 10 or f[1] not in SAMPLE_KINDS:
                    raise self._err(lineno, line, "malformed sample record")
                t = self._tuple(f, 3, lineno, line)
                got = self._values(f[10:], _SAMPLE_FIELDS, "sample field", lineno, line)
                return SampleRecord(t, Sample(int(f[2]), f[1], tuple(got.get(n) for n in _SAMPLE_FIELDS)))
            if kind == "E":
                if self.header is None or len(f) < 9:
                    raise self._err(lineno, line, "malformed RFC 4898 record")
                t = self._tuple(f, 1, lineno, line)
                return EstatsRecord(t, int(f[8]), self._values(f[9:], _EVAR_NAMES, "RFC 4898 variable", lineno, line))
            if kind == "T":
                if len(f) not in (6, 7, 8):   # 6: written before pfull existed, 7: before ended
                    raise self._err(lineno, line, "malformed trailer")
                trailer = Trailer(*(int(x) for x in f[1:]))
                if trailer.ended and trailer.ended not in ENDED_BY:
                    raise self._err(lineno, line, f"trailer: unknown end {trailer.ended}")
                self.trailer = trailer
                return self.trailer
        except RecordParseError:
            raise
        except ValueError as e:
            raise self._err(lineno, line, f"bad number ({e})") from None
        raise self._err(lineno, line, "not a tcpipstat record")

    def _tuple(self, f: list[str], i: int, lineno: int, line: str) -> Tuple:
        """FAMILY LADDR_HI LADDR_LO LPORT RADDR_HI RADDR_LO RPORT from field i on (R, S, E)."""
        fam = int(f[i])
        if fam != AF_INET and fam != AF_INET6:
            raise self._err(lineno, line, f"unknown address family {fam}")
        lport, rport = int(f[i + 3]), int(f[i + 6])
        if not (0 <= lport <= 65535 and 0 <= rport <= 65535):
            raise self._err(lineno, line, "port out of range")
        try:
            lhi, llo, rhi, rlo = int(f[i + 1], 16), int(f[i + 2], 16), int(f[i + 4], 16), int(f[i + 5], 16)
            ok = not (lhi | llo | rhi | rlo) >> 64      # none negative or 64 bits wide or more
        except ValueError:
            ok = False
        if not ok:     # one by one, to say which is wrong
            lhi, llo, rhi, rlo = _hex64(f[i + 1]), _hex64(f[i + 2]), _hex64(f[i + 4]), _hex64(f[i + 5])
        return _tuple_new(Tuple, (fam, (lhi << 64) | llo, lport, (rhi << 64) | rlo, rport))

    def _values(self, items: list[str], names, what: str, lineno: int, line: str) -> dict[str, int | None]:
        """NAME=VALUE fields of S and E records, every name one of ``names``; -1 is None
        (not known / not on this kernel)."""
        out: dict[str, int | None] = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or name not in names:
                raise self._err(lineno, line, f"unknown {what} {name!r}")
            v = int(value)
            out[name] = None if v < 0 else v
        return out

    def _counters(self, f: list[str], fixed: int, lineno: int, line: str) -> dict[str, int]:
        """NAME=VALUE fields, every name one the header announced (or a histogram field)."""
        counters: dict[str, int] = {}
        valid = self._valid
        for item in f[fixed:]:
            name, sep, value = item.partition("=")
            if name not in valid:
                if not sep or (name not in self._known and not _HIST_NAME.match(name)):
                    raise self._err(lineno, line, f"unknown counter {name!r}")
                valid.add(name)
            elif not sep:
                raise self._err(lineno, line, f"unknown counter {name!r}")
            counters[name] = int(value)
        return counters

    def parse(self, lines: Iterable[str]) -> Iterator[Record]:
        for lineno, line in enumerate(lines, 1):
            rec = self.parse_line(line, lineno)
            if rec is not None:
                yield rec


def parse_text(text: str, source: str = "<text>") -> list[Record]:
    return list(Parser(source).parse(text.splitlines()))
