"""Records -> per-socket totals -> report rows grouped by the index.

A socket tuple may arrive in several records (the collector empties its table
when it fills, and writes closed sockets out as they close); they add up here.
Grouping by ``index`` (the registry in tcpipstat/indexes.py) happens here too, so
the index never changes the compiled module. With ``interval``, the
records received since the last interval mark form a window of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Iterable

from .estats import EVAR_BY_NAME
from .indexes import BY_NAME as INDEX_BY_NAME, NAMES as INDEXES, GroupKey
from .records import (EstatsRecord, Header, IntervalMark, Record, SampleRecord,
                      SnapshotRecord, SocketRecord, Trailer, Tuple)

__all__ = ["INDEXES", "GroupKey", "Collection", "Row", "SocketTotals", "Window"]


@dataclass
class SocketTotals:
    tuple: Tuple
    counters: dict[str, int] = field(default_factory=dict)
    pid: int = 0
    comm: str = ""
    closed: bool = False
    in_tree: bool = False     # used by a process of the -c command's tree
    estats: dict | None = None  # --rfc4898: its RFC 4898 variables as it closed
    cgroup: int = 0           # its cgroup v2 id, netns: its network namespace (0: unknown)
    netns: int = 0

    @classmethod
    def first(cls, rec: SocketRecord) -> "SocketTotals":
        """A tuple's totals made from its first record (what ``SocketTotals(t).add(rec)``
        makes, without the merge)."""
        pid = rec.pid
        return cls(rec.tuple, dict(rec.counters), pid, rec.comm if pid else "",
                   rec.reason == "close", False | rec.in_tree, None, rec.cgroup, rec.netns)

    def add(self, rec: SocketRecord) -> None:
        if not self.counters:
            self.counters = dict(rec.counters)
        else:
            c = self.counters
            for k, v in rec.counters.items():
                c[k] = c.get(k, 0) + v
        if rec.pid:  # the process that last used the socket in process context
            self.pid, self.comm = rec.pid, rec.comm
        self.in_tree |= rec.in_tree
        # (a record written without its socket at hand, e.g. from packets only, has 0)
        if rec.cgroup:
            self.cgroup = rec.cgroup
        if rec.netns:
            self.netns = rec.netns
        if rec.reason == "close":
            self.closed = True

    @property
    def opened_during_collection(self) -> bool:
        return bool(self.counters.get("ActiveOpens") or self.counters.get("PassiveOpens"))

    @property
    def has_activity(self) -> bool:
        return any(self.counters.values()) or self.estats is not None


def in_key_order(rows: Iterable["Row"]) -> list["Row"]:
    """Report rows sorted by their keys. All keys of one index have None in the same
    fields, so the NamedTuples themselves compare (no per-row sort tuple to build)."""
    return sorted(rows, key=attrgetter("key"))


@dataclass
class Row:
    key: GroupKey
    counters: dict[str, int] = field(default_factory=dict)
    sockets: int = 0
    closed: int = 0
    processes: dict[int, str] = field(default_factory=dict)
    opened_during_collection: bool = True
    closing: list = field(default_factory=list)     # --rfc4898: each closed socket's variables
    samples: list = field(default_factory=list)     # --sample: its connections' samples

    @property
    def estats(self) -> dict[str, float | int | None] | None:
        """The row's RFC 4898 variables: its socket's, or over several sockets, each
        variable's sum, mean, min or max (tcpipstat/estats.py); None if none closed."""
        if not self.closing:
            return None
        if len(self.closing) == 1:
            return dict(self.closing[0])
        out: dict[str, float | int | None] = {}
        for name, var in EVAR_BY_NAME.items():
            vals = [e[name] for e in self.closing if e.get(name) is not None]
            if not vals:
                out[name] = None
            elif var.agg == "sum":
                out[name] = sum(vals)
            elif var.agg == "min":
                out[name] = min(vals)
            elif var.agg == "max":
                out[name] = max(vals)
            else:
                out[name] = round(sum(vals) / len(vals), 3)
        return out


_TUPLE_KEY = INDEX_BY_NAME["tuple"].of_socket


def _totals(table: dict[Tuple, SocketTotals], t: Tuple) -> SocketTotals:
    """The tuple's totals in ``table`` (the run's or an interval window's), made if new."""
    st = table.get(t)
    if st is None:
        st = table[t] = SocketTotals(t)
    return st


@dataclass
class Collection:
    """Everything one run produced. Feed records with :meth:`add`."""
    header: Header | None = None
    trailer: Trailer | None = None
    sockets: dict[Tuple, SocketTotals] = field(default_factory=dict)
    on_close: Callable[[SocketTotals], None] | None = None
    # interval mode: what arrived since the previous mark, handed to on_interval
    window: dict[Tuple, SocketTotals] = field(default_factory=dict)
    on_interval: Callable[["Window"], None] | None = None
    marks: list[IntervalMark] = field(default_factory=list)
    keep: Callable[[SocketTotals], bool] | None = None   # process selection (-x / -c tree)
    series: dict[Tuple, list] = field(default_factory=dict)  # --sample: each connection's samples
    selection: str = ""                                   # "pid", "tree" or "" (all)
    snapshots: dict[str, SnapshotRecord] = field(default_factory=dict)  # the host's, by WHEN
    # onclose=1 and --interval report a closed socket once (as it closes; in the window it
    # closed in): where no record of it follows its close record, it is needed no more and
    # is dropped then, so that memory does not grow with every socket that came and went.
    # What the end still counts of the dropped is kept: how many were used outside the -c
    # tree. (A socket with samples stays: --series and --plot write them at the end.)
    forget_closed: bool = False
    outside_tree_dropped: int = 0
    socket_records: int = 0         # added (to set against the trailer's count of those written)

    def add(self, rec: Record) -> None:
        if isinstance(rec, SocketRecord):       # nearly every record: first
            self.socket_records += 1
            # a closed tuple seen again is a new socket (or late segments after
            # close); for the summary it adds to the same tuple
            st = self.sockets.get(rec.tuple)
            if st is None:
                st = self.sockets[rec.tuple] = SocketTotals.first(rec)
            else:
                st.add(rec)
            if self.on_interval is not None:
                w = _totals(self.window, rec.tuple)
                w.add(rec)
                # the window's sockets take the process and place the whole run knows
                w.pid, w.comm, w.in_tree = st.pid, st.comm, st.in_tree
                w.cgroup, w.netns = st.cgroup, st.netns
            if rec.reason == "close":
                if self.on_close and st.has_activity and self.kept(st):
                    self.on_close(st)
                if self.forget_closed and self.on_interval is None:
                    self._drop(rec.tuple)
        elif isinstance(rec, Header):
            self.header = rec
        elif isinstance(rec, Trailer):
            self.trailer = rec
        elif isinstance(rec, IntervalMark):
            self._close_window(rec)
        elif isinstance(rec, SampleRecord):
            self.series.setdefault(rec.tuple, []).append(rec.sample)
            _totals(self.sockets, rec.tuple)      # (its process decides whether it is kept)
        elif isinstance(rec, EstatsRecord):
            # written as the socket closes, before its last counters (the next tick)
            _totals(self.sockets, rec.tuple).estats = rec.values
            if self.on_interval is not None:
                _totals(self.window, rec.tuple).estats = rec.values
        elif isinstance(rec, SnapshotRecord):
            self.snapshots[rec.when] = rec

    def _drop(self, t: Tuple) -> None:
        """A closed socket reported (forget_closed): forgotten, unless it has samples."""
        if t in self.series:
            return
        st = self.sockets.pop(t)
        self.outside_tree_dropped += st.has_activity and not st.in_tree

    def outside_tree(self) -> int:
        """Sockets with activity not used by the -c tree (0 without that selection)."""
        if self.selection != "tree":
            return 0
        return self.outside_tree_dropped + sum(1 for s in self.sockets.values()
                                               if s.has_activity and not s.in_tree)

    def lost_records(self, unreadable: int) -> int:
        """Socket records the trailer counts that did not arrive (0 before it): of the
        ``unreadable`` lines, each one is told as such, not again as lost."""
        tr = self.trailer
        return tr.lost_records(self.socket_records + unreadable) if tr else 0

    def kept(self, st: SocketTotals) -> bool:
        """Is this socket in the report (-x PID, -c tree)?"""
        return self.keep is None or self.keep(st)

    def kept_series(self) -> dict[Tuple, list]:
        """The samples of the connections the report keeps (filters, -x, -c tree)."""
        return {t: ss for t, ss in self.series.items() if self.kept(self.sockets[t])}

    def _close_window(self, mark: IntervalMark | None) -> None:
        start = self.marks[-1].ms if self.marks else (self.header.start_ms if self.header else None)
        if mark is not None:
            self.marks.append(mark)
        end = mark.ms if mark else (self.trailer.end_ms if self.trailer else None)
        win = Window(len(self.marks) if mark else len(self.marks) + 1, start, end, mark is None,
                     dict(self.window), self)
        self.window = {}
        if self.on_interval and (mark is not None
                                 or any(s.has_activity for s in win.sockets.values())):
            self.on_interval(win)
        if self.forget_closed:
            for t in [t for t in win.sockets if self.sockets[t].closed]:
                self._drop(t)

    def finish(self) -> None:
        """The run ended: in interval mode, what came after the last mark is a last
        (partial) window, so that the windows always add up to the whole run."""
        if self.on_interval:
            self._close_window(None)

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

    def _kept_in_window(self, st: SocketTotals) -> bool:
        """A window's socket, judged on what the whole run knows of it now. With the -c
        process tree, a socket whose process is not known yet (a handshake before its
        accept() lands in the next interval) is kept: it will be the command's when its
        process shows up, and a snapshot must not lose what the next one attributes."""
        whole = self.sockets.get(st.tuple, st)
        if self.selection == "tree" and not whole.pid:
            return True
        return self.kept(whole)

    def rows(self, index: str = "tuple",
             sockets: Iterable[SocketTotals] | None = None) -> list[Row]:
        ix = INDEX_BY_NAME.get(index)
        if ix is None:
            raise ValueError(index)
        key_of = ix.of_socket
        whole = sockets is None
        if whole and index == "tuple":
            return in_key_order(map(self._tuple_row, filter(self._in_report,
                                                              self.sockets.values())))
        rows: dict[GroupKey, Row] = {}
        kept = self.kept if whole else self._kept_in_window
        series = self.series if whole else {}
        for st in (self.sockets.values() if whole else sockets):
            if not st.has_activity or not kept(st):
                continue
            key = key_of(st)
            # (a window's socket: judged on what the whole run has seen of it)
            opened = (st if whole else self.sockets.get(st.tuple, st)).opened_during_collection
            row = rows.get(key)
            samples = series.get(st.tuple)
            if row is None:      # the common case with index=tuple: one socket, one row
                rows[key] = Row(key, dict(st.counters), 1, int(st.closed),
                                {st.pid: st.comm} if st.pid else {}, opened,
                                [st.estats] if st.estats is not None else [], list(samples or ()))
                continue
            if samples:
                row.samples.extend(samples)
            if st.estats is not None:
                row.closing.append(st.estats)
            c = row.counters
            for k, v in st.counters.items():
                c[k] = c.get(k, 0) + v
            row.sockets += 1
            row.closed += st.closed
            if st.pid:
                row.processes.setdefault(st.pid, st.comm)
            row.opened_during_collection &= opened
        return in_key_order(rows.values())

    def _in_report(self, st: SocketTotals) -> bool:
        return st.has_activity and self.kept(st)

    def _tuple_row(self, st: SocketTotals) -> Row:
        """The row of a socket tuple over the whole run (index=tuple: one socket, one row,
        no merging: no row table to look keys up in)."""
        samples = self.series.get(st.tuple)
        return Row(_TUPLE_KEY(st), dict(st.counters), 1,
                   int(st.closed), {st.pid: st.comm} if st.pid else {},
                   st.opened_during_collection,
                   [st.estats] if st.estats is not None else [], list(samples or ()))

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self.sockets.values():
            if not self.kept(st):
                continue
            for k, v in st.counters.items():
                out[k] = out.get(k, 0) + v
        return out


@dataclass
class Window:
    """One interval's records (deltas since the previous mark)."""
    seq: int
    start_ms: int | None
    end_ms: int | None
    final: bool                      # after the last mark: a partial interval
    sockets: dict[Tuple, SocketTotals]
    collection: Collection

    def rows(self, index: str = "tuple") -> list[Row]:
        return self.collection.rows(index, self.sockets.values())


# --sort keys besides counter names: sums that answer "who is busiest?"
SORT_SUMS = {"bytes": ("SendBytes", "RecvBytes"), "segs": ("InSegs", "OutSegs")}


def sort_value(row: Row, key: str) -> int:
    return sum(row.counters.get(k, 0) for k in SORT_SUMS.get(key, (key,)))


def sort_rows(rows: list[Row], key: str | None, top: int | None) -> tuple[list[Row], int]:
    """Rows ordered by ``key`` (descending; ties keep the key order), the first ``top``
    of them; returns (rows, how many were left out)."""
    if key:
        rows = sorted(rows, key=lambda r: -sort_value(r, key))
    if top is not None and len(rows) > top:
        return rows[:top], len(rows) - top
    return rows, 0
