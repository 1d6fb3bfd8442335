"""Records -> per-socket totals -> report rows grouped by the index.

A socket tuple may arrive in several records (the collector empties its table
when it fills, and writes closed sockets out as they close); they add up here.
Grouping by ``index`` (tuple, laddr, raddr, lport, rport) happens here too, so
the index never changes the compiled module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from .records import Header, Record, SocketRecord, Trailer, Tuple

INDEXES = ("tuple", "laddr", "raddr", "lport", "rport")


@dataclass
class SocketTotals:
    tuple: Tuple
    counters: dict[str, int] = field(default_factory=dict)
    pid: int = 0
    comm: str = ""
    closed: bool = False
    records: int = 0

    def add(self, rec: SocketRecord) -> None:
        for k, v in rec.counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        if rec.pid and not self.pid:
            self.pid, self.comm = rec.pid, rec.comm
        self.records += 1
        if rec.reason == "close":
            self.closed = True

    @property
    def opened_during_collection(self) -> bool:
        return bool(self.counters.get("ActiveOpens") or self.counters.get("PassiveOpens"))

    @property
    def has_activity(self) -> bool:
        return any(self.counters.values())


@dataclass(frozen=True)
class GroupKey:
    index: str
    family: int | None = None
    laddr: int | None = None
    lport: int | None = None
    raddr: int | None = None
    rport: int | None = None

    @classmethod
    def of(cls, index: str, t: Tuple) -> "GroupKey":
        if index == "tuple":
            return cls(index, t.family, t.laddr, t.lport, t.raddr, t.rport)
        if index == "laddr":
            return cls(index, t.family, laddr=t.laddr)
        if index == "raddr":
            return cls(index, t.family, raddr=t.raddr)
        if index == "lport":
            return cls(index, lport=t.lport)
        if index == "rport":
            return cls(index, rport=t.rport)
        raise ValueError(index)

    def sort_key(self) -> tuple:
        return tuple(-1 if v is None else v for v in
                     (self.family, self.laddr, self.lport, self.raddr, self.rport))


@dataclass
class Row:
    key: GroupKey
    counters: dict[str, int] = field(default_factory=dict)
    sockets: int = 0
    closed: int = 0
    processes: dict[int, str] = field(default_factory=dict)
    opened_during_collection: bool = True


@dataclass
class Collection:
    """Everything one run produced. Feed records with :meth:`add`."""
    header: Header | None = None
    trailer: Trailer | None = None
    sockets: dict[Tuple, SocketTotals] = field(default_factory=dict)
    on_close: Callable[[SocketTotals], None] | None = None

    def add(self, rec: Record) -> None:
        if isinstance(rec, Header):
            self.header = rec
        elif isinstance(rec, Trailer):
            self.trailer = rec
        elif isinstance(rec, SocketRecord):
            st = self.sockets.get(rec.tuple)
            if st is None or st.closed:
                # a closed tuple seen again is a new socket (or late segments after
                # close); for the summary it adds to the same tuple
                if st is None:
                    st = self.sockets[rec.tuple] = SocketTotals(rec.tuple)
            st.add(rec)
            if rec.reason == "close" and self.on_close and st.has_activity:
                self.on_close(st)

    def extend(self, recs: Iterable[Record]) -> "Collection":
        for r in recs:
            self.add(r)
        return self

    @property
    def counter_names(self) -> tuple[str, ...]:
        return self.header.counters if self.header else ()

    @property
    def duration_s(self) -> float | None:
        if self.header and self.trailer:
            return max(0.0, (self.trailer.end_ms - self.header.start_ms) / 1000.0)
        return None

    def rows(self, index: str = "tuple") -> list[Row]:
        if index not in INDEXES:
            raise ValueError(index)
        rows: dict[GroupKey, Row] = {}
        for st in self.sockets.values():
            if not st.has_activity:
                continue
            key = GroupKey.of(index, st.tuple)
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(key)
            for k, v in st.counters.items():
                row.counters[k] = row.counters.get(k, 0) + v
            row.sockets += 1
            row.closed += st.closed
            if st.pid:
                row.processes.setdefault(st.pid, st.comm)
            row.opened_during_collection &= st.opened_during_collection
        return sorted(rows.values(), key=lambda r: r.key.sort_key())

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self.sockets.values():
            for k, v in st.counters.items():
                out[k] = out.get(k, 0) + v
        return out
