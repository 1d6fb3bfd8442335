"""The collector's output lines -> typed records.

The script (stp_templates/tcpipstat.stp.j2) writes tab-separated lines, one kind of
record each, whose fields are laid down once below (``RecordSpec``: the template's
printf formats are made from them, the parser finds each field by its name):

``H  MAGIC  FORMAT  VERSION  START_MS  NFILTERS  MAX_SOCKETS  COUNTERS``
    once, from the begin probe. MAGIC is ``tcpipstat``; COUNTERS: ``NAME,NAME,...``.
``R  REASON FAMILY LADDR_HI LADDR_LO LPORT RADDR_HI RADDR_LO RPORT PID COMM FLAGS CGROUP NETNS``
    then ``NAME=VALUE`` fields: one socket tuple's counts since it was last written
    out. REASON is ``close`` (the socket closed), ``spill`` (the table was emptied to
    make room), ``interval`` (an interval ended) or ``end``. Addresses are hex: IPv4
    in the low word, IPv6 as two 64-bit halves. PID/COMM: the process that last used
    the socket in process context (0 and "" if none did); COMM is escaped by stap's
    text_str(). FLAGS: bit 0 = that process was the -c command or one of its
    descendants when it used the socket (format 1 has no FLAGS field). CGROUP: the
    socket's cgroup v2 id (its kernfs node id: the inode of its cgroup directory);
    NETNS: the inode of its network namespace; both read through the socket, 0 if
    unknown (formats 1 and 2 have neither: read as 0). Several records for one tuple
    add up.
``I  SEQ  MS``
    interval mode: interval SEQ ended at MS (gettimeofday_ms); the records of its
    sockets came just before.
``E  FAMILY  LADDR_HI  LADDR_LO  LPORT  RADDR_HI  RADDR_LO  RPORT  MS``
    then ``NAME=VALUE`` fields: --rfc4898: a socket the filters accept closed at MS;
    its RFC 4898 variables (tcpipstat/estats.py), -1 for one this kernel does not keep.
``S  EVENT  US  FAMILY  LADDR_HI  LADDR_LO  LPORT  RADDR_HI  RADDR_LO  RPORT``
    then ``NAME=VALUE`` fields: --sample: a connection's state US microseconds after
    collection began, after an ACK (EVENT ack) or as it closed (EVENT end); names in
    tcpipstat/series.py.
``T  END_MS  IDS  SPILLS  DROPPED  FAULTS  PFULL  ENDED``
    once, when the run finishes. IDS: socket records (R) written (in a trailer without
    PFULL: socket ids handed out). SPILLS: times the tables were emptied to make room.
    DROPPED: events lost because a table was full (more sockets busy between two checks
    than half of MAX_SOCKETS). FAULTS: events a probe could not read. PFULL: times the
    process table was found full, so some records may lack their process. ENDED: what
    ended the run (``ENDED_BY``). Older recordings lack ENDED, or PFULL and ENDED: read
    as 0.
``N  VERSION  WHEN  SOURCE``
    then ``MIB.NAME=VALUE`` fields: the host's own MIB counters (``Tcp.ActiveOpens``,
    ``Ip6.Ip6InReceives``, ...) as collection began (WHEN ``start``) or ended (``end``),
    read by tcpipstat on this host (SOURCE ``local``) or by the collector's stand-in where
    it runs (``collector``); tcpipstat/reconcile.py takes them and says when. tcpipstat
    writes them into the stream itself (no collector does), so only recordings made with
    --save-records since they exist hold them: one without them has no reconciliation.
    VERSION (``SNAPSHOT_VERSIONS``) is the record's own layout, independent of the header's
    FORMAT.

Lines starting with ``#`` are comments; tcpipstat --save-records writes one first
(``SaveHeader``). Anything else on stdout is an error: it names the source, the line
number and the text.
"""
from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

from .counters import CA_STATES
from .errors import RecordParseError
from .estats import EVAR_BY_NAME as _EVAR_NAMES
from .series import FIELD_NAMES as _SAMPLE_FIELDS, SAMPLE_KINDS, Sample

FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)   # format 1 (tcpipstat 0.1): no FLAGS field, no intervals;
                               # formats 1 and 2: no CGROUP and NETNS fields
MAGIC = "tcpipstat"         # the header's second field
REASONS = ("close", "spill", "interval", "end")
SNAPSHOT_VERSION = 1
SNAPSHOT_VERSIONS = (1,)       # N record layouts this parser reads
SNAPSHOT_WHEN = ("start", "end")
SNAPSHOT_SOURCES = ("local", "collector")
AF_INET, AF_INET6 = 2, 10


@dataclass(frozen=True)
class Field:
    """One tab-separated field of a record, and the printf conversion that writes it."""
    name: str
    conv: str = "%d"
    optional: bool = False   # absent in older recordings (read as 0); only last fields


@dataclass(frozen=True)
class RecordSpec:
    """One kind of record: its letter (the line's first field), then its fields in order,
    then (``pairs``) any number of NAME=VALUE fields."""
    kind: str
    fields: tuple[Field, ...]
    pairs: bool = False

    def at(self, name: str) -> int:
        """The field's index in the line split at tabs (the letter is index 0)."""
        return 1 + [f.name for f in self.fields].index(name)

    @property
    def width(self) -> int:
        """Fields before the NAME=VALUE pairs, the letter included."""
        return 1 + len(self.fields)

    @property
    def min_width(self) -> int:
        """The width of the oldest recordings (without the optional fields)."""
        return 1 + sum(not f.optional for f in self.fields)

    def without(self, name: str) -> RecordSpec:
        return RecordSpec(self.kind, tuple(f for f in self.fields if f.name != name), self.pairs)

    def printf(self, **consts: object) -> str:
        """The printf format that writes the record: tab-separated conversions, a field of
        ``consts`` written as that text instead (known when the script is made). A newline
        ends it, unless NAME=VALUE pairs follow (the writer appends them, then the newline)."""
        text = "\t".join([self.kind] + [str(consts.pop(f.name, f.conv)) for f in self.fields])
        if consts:
            raise KeyError(f"{self.kind} record has no field {', '.join(consts)}")
        return text if self.pairs else text + "\n"


_TUPLE = (Field("FAMILY"), Field("LADDR_HI", "%x"), Field("LADDR_LO", "%x"), Field("LPORT"),
          Field("RADDR_HI", "%x"), Field("RADDR_LO", "%x"), Field("RPORT"))
HEADER = RecordSpec("H", (Field("MAGIC", "%s"), Field("FORMAT"), Field("VERSION", "%s"),
                          Field("START_MS"), Field("NFILTERS"), Field("MAX_SOCKETS"),
                          Field("COUNTERS", "%s")))
SOCKET = RecordSpec("R", (Field("REASON", "%s"), *_TUPLE, Field("PID"), Field("COMM", "%s"),
                          Field("FLAGS"), Field("CGROUP"), Field("NETNS")), pairs=True)
SOCKET_FORMAT2 = SOCKET.without("CGROUP").without("NETNS")
SOCKET_FORMAT1 = SOCKET_FORMAT2.without("FLAGS")
_SOCKET_OF_FORMAT = {1: SOCKET_FORMAT1, 2: SOCKET_FORMAT2, 3: SOCKET}
INTERVAL = RecordSpec("I", (Field("SEQ"), Field("MS")))
ESTATS = RecordSpec("E", (*_TUPLE, Field("MS")), pairs=True)
SAMPLE = RecordSpec("S", (Field("EVENT", "%s"), Field("US"), *_TUPLE), pairs=True)
TRAILER = RecordSpec("T", (Field("END_MS"), Field("IDS"), Field("SPILLS"), Field("DROPPED"),
                           Field("FAULTS"), Field("PFULL", optional=True),
                           Field("ENDED", optional=True)))
SNAPSHOT = RecordSpec("N", (Field("VERSION"), Field("WHEN", "%s"), Field("SOURCE", "%s")),
                      pairs=True)
SPECS = (HEADER, SOCKET, INTERVAL, ESTATS, SAMPLE, TRAILER)   # what collectors write (not N)

# The parser's field indices, taken from the specs once (plain ints: socket records are
# nearly every line, and their fields are read with constant-cost lookups)
_H = {f.name: HEADER.at(f.name) for f in HEADER.fields}
_R_REASON, _R_TUPLE, _R_PID, _R_COMM, _R_FLAGS, _R_CGROUP, _R_NETNS = (
    SOCKET.at(n) for n in ("REASON", "FAMILY", "PID", "COMM", "FLAGS", "CGROUP", "NETNS"))
_E_TUPLE, _E_MS = ESTATS.at("FAMILY"), ESTATS.at("MS")
_S_EVENT, _S_US, _S_TUPLE = SAMPLE.at("EVENT"), SAMPLE.at("US"), SAMPLE.at("FAMILY")


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
    cgroup: int = 0           # the socket's cgroup v2 id (0: unknown)
    netns: int = 0            # its network namespace's inode (0: unknown)


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
class SnapshotRecord:
    """The host's MIB counters as collection began or ended (``Tcp.ActiveOpens``: value)."""
    when: str
    source: str
    values: dict[str, int] = field(hash=False)


@dataclass(frozen=True)
class IntervalMark:
    seq: int
    ms: int


@dataclass(frozen=True)
class Trailer:
    """TRAILER's fields, in its order."""
    end_ms: int
    ids: int
    spills: int
    dropped: int          # events lost because a collector table was full
    faults: int           # events a probe could not read
    pfull: int = 0        # times the process table was full (attribution may be missing)
    ended: int = 0        # what ended the run: a key of ENDED_BY (0: not recorded)
    # (not a field of the line: what its width says) IDS counts the socket records written
    # since the trailer has PFULL (the collector of one print per record); before, it
    # counted socket ids handed out, fewer than the records
    counts_records: bool = field(default=False, kw_only=True)

    def lost_records(self, arrived: int) -> int:
        """Socket records the collector wrote that were not among the ``arrived``."""
        return max(0, self.ids - arrived) if self.counts_records else 0


# The trailer's last field (tcpipstat.stp.j2, tis_finish): what ended the run. Only "stap"
# leaves the last records at risk on stap < 5.1 (they are written as the module exits).
ENDED_BY = {1: "timeout", 2: "count", 3: "request", 4: "stap"}


@dataclass(frozen=True)
class SaveHeader:
    """The comment line --save-records writes first: what a replay (--from-records) needs
    to know of the run that its records do not say."""
    kernel: str = ""
    unavailable: tuple[str, ...] = ()   # counters the kernel could not provide
    tree: bool = False                  # a -c run: its command's process tree is reported
    cong: str = ""                      # how congestion states were seen ("": no --cong)
    dist: bool = False                  # --dist: congestion-state histograms are reported
    rfc4898: bool = False
    why_unavailable: str = ""           # the collector's reason for them ("": stap's)

    def line(self) -> str:
        items = [f"kernel={self.kernel}", f"unavailable={','.join(self.unavailable)}",
                 f"tree={int(self.tree)}"]
        if self.cong:
            items += [f"cong={self.cong}", f"dist={int(self.dist)}"]
        if self.rfc4898:
            items.append("rfc4898=1")
        if self.why_unavailable:
            items.append(f"why_unavailable={self.why_unavailable}")
        return "; ".join(["# tcpipstat records", *items]) + "\n"

    @classmethod
    def read(cls, line: str) -> SaveHeader | None:
        """The header ``line`` holds; None when it is not a comment (no header: a record)."""
        if not line.startswith("#"):
            return None
        items = {k.strip(): v.strip() for k, _, v in (i.partition("=") for i in line.split(";"))}
        unavailable = re.match(r"[A-Za-z0-9,]*", items.get("unavailable", "")).group()
        cong = items.get("cong", "")
        # (recordings older than dist= show the histograms they hold)
        dist = items["dist"] == "1" if "dist" in items else bool(cong)
        return cls(items.get("kernel", ""), tuple(x for x in unavailable.split(",") if x),
                   items.get("tree") == "1", cong, dist, items.get("rfc4898") == "1",
                   items.get("why_unavailable", ""))


_tuple_new = tuple.__new__     # (a Tuple made without NamedTuple's Python-level __new__)

Record = (Header | SocketRecord | Trailer | IntervalMark | EstatsRecord | SampleRecord
          | SnapshotRecord)


# --dist: "h.STATE.BUCKET": stays in congestion state STATE (its index in CA_STATES) that
# lasted 2^BUCKET to 2^(BUCKET+1) - 1 microseconds. Kept with the counters (they add up alike).
_MIB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*\.[A-Za-z][A-Za-z0-9]*\Z")
_HIST_NAME = re.compile(rf"h\.[0-{len(CA_STATES) - 1}]\.(?:[0-9]|[1-5][0-9]|6[0-3])\Z")


def hist_key(name: str) -> tuple[int, int] | None:
    """(state, bucket) of a histogram field name, else None."""
    if not name.startswith("h."):
        return None
    _, s, b = name.split(".")
    return int(s), int(b)


def _id64(tok: str) -> int:
    """A cgroup id or namespace inode: an unsigned 64-bit number."""
    v = int(tok)
    if v < 0 or v >= 1 << 64:
        raise ValueError(tok)
    return v


def _hex64(tok: str) -> int:
    v = int(tok, 16)
    if v < 0 or v >= 1 << 64:
        raise ValueError(tok)
    return v


_SIMPLE_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "\\": 92,
                   '"': 34, "'": 39, "?": 63}


def unescape_comm(text: str) -> str:
    """Undo stap's text_str() C-style escapes (\\n, \\t, \\\\, \\", \\ooo)."""
    if "\\" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode("latin-1", "replace")
    while i < len(raw):
        c = raw[i]
        if c == 92 and i + 1 < len(raw):
            n = chr(raw[i + 1])
            if n in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[n])
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


def _load_compiled():
    """The compiled reader of socket records (tcpipstat/csrc_records, which pip install
    builds) and "", or None and why it is not used. It reads the plain well-formed R lines,
    nearly every line of a run, to the same records as Parser does and leaves any other
    line to it (tests/test_records_fast.py compares the two). Where it was not built (no C
    compiler or Python headers at install time) or does not load, Parser reads every line."""
    try:
        mod = importlib.import_module("._records", __package__)
    except ModuleNotFoundError:
        return None, ("it was not built (no C compiler or no Python headers when tcpipstat "
                      "was installed)")
    except ImportError as e:    # built for another Python, or broken
        return None, str(e)
    if mod.FIELDS != tuple(f.name for f in dataclasses.fields(SocketRecord)):
        return None, "it was built from other sources than this tcpipstat's"
    return mod, ""


_compiled, UNAVAILABLE = _load_compiled()


class Parser:
    """Parses one stream of collector output; keeps the header's counter names.
    ``compiled``: socket records are read by the compiled reader where it loads (the
    attribute says whether it does); False: by Python alone (the reference)."""

    def __init__(self, source: str = "<stap>", compiled: bool = True):
        self.source = source
        self.compiled = compiled and _compiled is not None
        self._fast = None     # the compiled reader's parse() for this header's socket records
        self.header: Header | None = None
        self.trailer: Trailer | None = None
        self._known: frozenset[str] = frozenset()
        self._valid: set[str] = set()     # counter names seen valid: the header's, histogram fields
        self._rwidth = SOCKET.width       # fields before a socket record's counters
        self._other = {"H": self._header, "I": self._interval, "S": self._sample,
                       "E": self._estats, "T": self._trailer, "N": self._snapshot}

    def _err(self, lineno: int, line: str, why: str) -> RecordParseError:
        return RecordParseError(self.source, lineno, line, why)

    def parse_line(self, line: str, lineno: int) -> Record | None:
        fast = self._fast
        if fast is not None:
            rec = fast(line)
            if rec is not None:
                return rec
        line = line.rstrip("\n")
        if not line or line.startswith("#"):   # '#' lines: comments in saved record files
            return None
        f = line.split("\t")
        kind = f[0]
        try:
            if kind == "R":       # nearly every line: read here, without a further call
                if self.header is None:
                    raise self._err(lineno, line, "socket record before the header")
                width = self._rwidth
                if len(f) < width:
                    raise self._err(lineno, line, "socket record has too few fields")
                reason = f[_R_REASON]
                if reason not in REASONS:
                    raise self._err(lineno, line, f"unknown reason {reason!r}")
                t = self._tuple(f, _R_TUPLE, lineno, line)
                flags = int(f[_R_FLAGS]) if width > _R_FLAGS else 0
                counters = self._counters(f, width, lineno, line)
                if width > _R_NETNS:
                    return SocketRecord(reason, t, int(f[_R_PID]), unescape_comm(f[_R_COMM]),
                                        counters, bool(flags & 1), _id64(f[_R_CGROUP]),
                                        _id64(f[_R_NETNS]))
                return SocketRecord(reason, t, int(f[_R_PID]), unescape_comm(f[_R_COMM]),
                                    counters, bool(flags & 1))
            other = self._other.get(kind)
            if other is not None:
                return other(f, lineno, line)
        except RecordParseError:
            raise
        except ValueError as e:
            raise self._err(lineno, line, f"bad number ({e})") from None
        raise self._err(lineno, line, "not a tcpipstat record")

    def _header(self, f: list[str], lineno: int, line: str) -> Header:
        if len(f) != HEADER.width or f[_H["MAGIC"]] != MAGIC:
            raise self._err(lineno, line, "malformed header")
        fmt = int(f[_H["FORMAT"]])
        if fmt not in READABLE_FORMATS:
            raise self._err(lineno, line, f"record format {fmt} is not one of "
                                          f"{', '.join(map(str, READABLE_FORMATS))} (script "
                                          "and parser from different tcpipstat versions)")
        counters = tuple(c for c in f[_H["COUNTERS"]].split(",") if c)
        self.header = Header(fmt, f[_H["VERSION"]], int(f[_H["START_MS"]]),
                             int(f[_H["NFILTERS"]]), int(f[_H["MAX_SOCKETS"]]), counters)
        self._known = frozenset(counters)
        self._valid = set(counters)     # (a new set: the compiled reader trusts the names it
                                        # found in one, which only grows, for its header)
        self._rwidth = _SOCKET_OF_FORMAT[fmt].width
        if self.compiled:
            self._fast = _compiled.SocketLines(
                SocketRecord, Tuple, REASONS, self._valid, self._rwidth,
                (_R_REASON, _R_TUPLE, _R_PID, _R_COMM, _R_FLAGS, _R_CGROUP, _R_NETNS)).parse
        return self.header

    def _interval(self, f: list[str], lineno: int, line: str) -> IntervalMark:
        if self.header is None or len(f) != INTERVAL.width:
            raise self._err(lineno, line, "malformed interval mark")
        return IntervalMark(int(f[INTERVAL.at("SEQ")]), int(f[INTERVAL.at("MS")]))

    def _sample(self, f: list[str], lineno: int, line: str) -> SampleRecord:
        if self.header is None or len(f) < SAMPLE.width or f[_S_EVENT] not in SAMPLE_KINDS:
            raise self._err(lineno, line, "malformed sample record")
        t = self._tuple(f, _S_TUPLE, lineno, line)
        got = self._values(f[SAMPLE.width:], _SAMPLE_FIELDS, "sample field", lineno, line)
        values = tuple(got.get(n) for n in _SAMPLE_FIELDS)
        return SampleRecord(t, Sample(int(f[_S_US]), f[_S_EVENT], values))

    def _estats(self, f: list[str], lineno: int, line: str) -> EstatsRecord:
        if self.header is None or len(f) < ESTATS.width:
            raise self._err(lineno, line, "malformed RFC 4898 record")
        t = self._tuple(f, _E_TUPLE, lineno, line)
        values = self._values(f[ESTATS.width:], _EVAR_NAMES, "RFC 4898 variable", lineno, line)
        return EstatsRecord(t, int(f[_E_MS]), values)

    def _trailer(self, f: list[str], lineno: int, line: str) -> Trailer:
        if not TRAILER.min_width <= len(f) <= TRAILER.width:
            raise self._err(lineno, line, "malformed trailer")
        # (Trailer's fields are TRAILER's, in its order)
        trailer = Trailer(*(int(x) for x in f[1:]),
                          counts_records=len(f) > TRAILER.at("PFULL"))
        if trailer.ended and trailer.ended not in ENDED_BY:
            raise self._err(lineno, line, f"trailer: unknown end {trailer.ended}")
        self.trailer = trailer
        return trailer

    def _snapshot(self, f: list[str], lineno: int, line: str) -> SnapshotRecord:
        if len(f) < SNAPSHOT.width:
            raise self._err(lineno, line, "malformed snapshot record")
        version = int(f[SNAPSHOT.at("VERSION")])
        if version not in SNAPSHOT_VERSIONS:
            raise self._err(lineno, line, f"snapshot record version {version} is not one of "
                                          f"{', '.join(map(str, SNAPSHOT_VERSIONS))}")
        when, source = f[SNAPSHOT.at("WHEN")], f[SNAPSHOT.at("SOURCE")]
        if when not in SNAPSHOT_WHEN or source not in SNAPSHOT_SOURCES:
            raise self._err(lineno, line, "malformed snapshot record")
        values: dict[str, int] = {}
        for item in f[SNAPSHOT.width:]:
            name, sep, value = item.partition("=")
            if not sep or not _MIB_NAME.match(name):
                raise self._err(lineno, line, f"unknown MIB counter {name!r}")
            values[name] = int(value)
        return SnapshotRecord(when, source, values)

    def _tuple(self, f: list[str], i: int, lineno: int, line: str) -> Tuple:
        """FAMILY LADDR_HI LADDR_LO LPORT RADDR_HI RADDR_LO RPORT from field i on (R, S, E)."""
        fam = int(f[i])
        if fam != AF_INET and fam != AF_INET6:
            raise self._err(lineno, line, f"unknown address family {fam}")
        lport, rport = int(f[i + 3]), int(f[i + 6])
        if not (0 <= lport <= 65535 and 0 <= rport <= 65535):
            raise self._err(lineno, line, "port out of range")
        try:
            lhi, llo = int(f[i + 1], 16), int(f[i + 2], 16)
            rhi, rlo = int(f[i + 4], 16), int(f[i + 5], 16)
            ok = not (lhi | llo | rhi | rlo) >> 64      # none negative or 64 bits wide or more
        except ValueError:
            ok = False
        if not ok:     # one by one, to say which is wrong
            lhi, llo = _hex64(f[i + 1]), _hex64(f[i + 2])
            rhi, rlo = _hex64(f[i + 4]), _hex64(f[i + 5])
        return _tuple_new(Tuple, (fam, (lhi << 64) | llo, lport, (rhi << 64) | rlo, rport))

    def _values(self, items: list[str], names, what: str, lineno: int,
                line: str) -> dict[str, int | None]:
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
