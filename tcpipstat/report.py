"""Model -> what the user reads: rich tables, NDJSON or CSV (one layer for all).

What a row shows comes from a :class:`Catalogue`: the counters (name, section,
IPv4 only, and a unit for measurements such as times) and the sections they are
laid out in. The live collector's catalogue (tcpipstat/counters.py) is the default;
reports from a capture file use tcpipstat/capture/fields.py's.
"""
from __future__ import annotations

import csv
import json
from json.encoder import encode_basestring_ascii
import time
from functools import lru_cache
from operator import itemgetter
from itertools import chain, zip_longest
from dataclasses import dataclass, field
from typing import IO, Iterable, NamedTuple

from rich.console import Console
from rich.control import strip_control_codes
from rich.markup import escape
from rich.text import Text

from .counters import CA_STATES, COUNTERS, SECTIONS
from .estats import EVARS, TABLES as ESTATS_TABLES
from .series import summary as series_summary, summary_line
from .indexes import GroupKey, csv_key_fields, key_fields, key_json, key_title
from .model import Row, SocketTotals, Window
from .reconcile import CSV_COLUMN, Reconciliation, csv_values, footer_lines
from .records import AF_INET6, hist_key


@dataclass(frozen=True)
class Catalogue:
    """The counters a report can show and the sections (table columns) they go in.

    ``counters``: objects with ``name``, ``section``, ``ipv4_only`` and, for a
    measurement rather than a count, ``unit`` (a value that may be absent: n/a in
    tables, null in JSON, empty in CSV; shown even when it is 0)."""
    counters: tuple
    sections: tuple[str, ...]
    noun: str = "socket"                        # what a row groups ("3 sockets")
    empty: str = "No socket activity was accepted by the filters."
    partial: str = "(open before collection started: partial totals)"
    by_name: dict = field(init=False, repr=False, compare=False)
    # ((section, ((name, v4, unit), ...)), ...)
    layout: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {c.name: c for c in self.counters})
        object.__setattr__(self, "layout", tuple(
            (sec, tuple((c.name, c.ipv4_only,
                         getattr(c, "unit", "") or ("us" if getattr(c, "time_us", False) else ""))
                        for c in self.counters if c.section == sec))
            for sec in self.sections))


LIVE = Catalogue(COUNTERS, SECTIONS)


@dataclass
class ReportContext:
    available: tuple[str, ...]                  # counters the collector had
    unavailable: tuple[str, ...] = ()           # in the selected groups, not on this kernel
    nozeros: bool = True
    notes: list[str] = field(default_factory=list)
    catalogue: Catalogue = LIVE
    us: bool = False                            # -u: congestion times in µs (default ms)
    estats: bool = False                        # --rfc4898: RFC 4898 columns in CSV
    dist: bool = False                          # --dist: congestion-state histograms
    why_unavailable: str = ""                   # the collector's reason ("": stap's, below)
    index: str = "tuple"                        # what rows group by (CSV's key columns)
    reconciling: bool = False                   # the host's counters are expected: CSV's
                                                # reconciliation column from its header on
    reconciliation: Reconciliation | None = None    # the host's counters and the rows'

    @property
    def layout(self) -> tuple:
        """The catalogue's sections that have a counter to show (available, or n/a here)."""
        key = (self.available, self.unavailable)
        cached = self.__dict__.get("_layout")
        if cached is None or cached[0] != key:
            shown = set(self.available) | set(self.unavailable)
            cached = self.__dict__["_layout"] = (key, tuple(
                (sec, items) for sec, items in self.catalogue.layout
                if any(n in shown for n, _, _ in items)))
        return cached[1]

    @property
    def available_set(self) -> frozenset[str]:
        """``available`` as a set (looked up for every counter of every row)."""
        cached = self.__dict__.get("_available_set")
        if cached is None or cached[0] is not self.available:
            cached = self.__dict__["_available_set"] = (self.available, frozenset(self.available))
        return cached[1]


def _procs(row: Row) -> str:
    if len(row.processes) == 1:     # (most rows)
        (pid, comm), = row.processes.items()
        return f"{comm or '?'}[{pid}]"
    items = [f"{comm or '?'}[{pid}]" for pid, comm in sorted(row.processes.items())]
    if len(items) > 4:
        items = items[:4] + [f"+{len(row.processes) - 4} more"]
    return ", ".join(items)


def _title_parts(row: Row, title_suffix: str, noun: str = "socket") -> list[tuple[str, str]]:
    """A row's title as (text, style) pieces: its key, its processes, how many sockets
    it groups and a note."""
    parts = [(key_title(row.key), "bold")]
    procs = _procs(row)
    if procs:
        parts.append((f"  {procs}", "cyan"))
    if row.key.index != "tuple":
        parts.append((f"  ({row.sockets} {noun}{'s' if row.sockets != 1 else ''})", "dim"))
    if title_suffix:
        parts.append((f"  {title_suffix}", "yellow"))
    return parts


def _title_text(row: Row, title_suffix: str, noun: str) -> str:
    """The text of :func:`_title_parts` (no styles), made directly for the common row: a
    socket tuple used by one process."""
    key, procs = row.key, row.processes
    if key.index != "tuple" or len(procs) != 1:
        return "".join([text for text, _ in _title_parts(row, title_suffix, noun)])
    (pid, comm), = procs.items()
    return f"{key_title(key)}  {comm or '?'}[{pid}]  {title_suffix}" if title_suffix \
        else f"{key_title(key)}  {comm or '?'}[{pid}]"


def _title(row: Row, title_suffix: str, noun: str = "socket") -> Text:
    (text, style), *rest = _title_parts(row, title_suffix, noun)
    title = Text(text, style=style)
    for text, style in rest:
        title.append(text, style=style)
    return title


_COUNT, _CONST, _US, _UNIT = range(4)


def _cell_plan(ctx: ReportContext, v6: bool) -> tuple:
    """How each section (column) of an IPv4 or IPv6 row is filled, worked out once per
    report: per section, the names of its counters when they are all plain counts
    ("Name 1,234", the common case), else a function of the row's ``counters.get``
    that returns the section's lines."""
    avail, nozeros = ctx.available_set, ctx.nozeros
    plan = []
    for _section, items in ctx.layout:
        steps = []            # (kind, name, text): what the section shows, in catalogue order
        for name, v4, unit in items:
            if name in avail:
                if v6 and v4:                     # IPv4-only: n/a for an IPv6 row, not 0
                    if not nozeros:
                        steps.append((_CONST, name, f"{name} n/a"))
                elif unit == "us":                # a duration in µs (CaOpenUs -> "CaOpen 1.234 ms")
                    steps.append((_US, name, name[:-2] if name.endswith("Us") else name))
                elif unit:                        # a measurement: absent, not 0
                    steps.append((_UNIT, name, unit))
                else:
                    steps.append((_COUNT, name, ""))
            elif not nozeros and name in ctx.unavailable:
                steps.append((_CONST, name, f"{name} n/a"))
        if nozeros and all(kind == _COUNT for kind, _, _ in steps):
            plan.append(tuple(name for _, name, _ in steps))
        else:
            plan.append(_section_lines(tuple(steps), nozeros, ctx.us))
    return tuple(plan)


def _section_lines(steps: tuple, nozeros: bool, us: bool):
    """A section with zeros shown, durations, measurements or n/a lines: the general loop."""
    def lines(get) -> list[str]:
        out = []
        for kind, name, text in steps:
            if kind == _COUNT:
                v = get(name, 0)
                if v == 0 and nozeros:
                    continue
                out.append(f"{name} {v:,}")
            elif kind == _CONST:
                out.append(text)
            elif kind == _US:
                v = get(name, 0)
                if v == 0 and nozeros:
                    continue
                out.append(f"{text} {v:,} us" if us else f"{text} {v / 1000:,.3f} ms")
            else:
                v = get(name)
                if v is not None:
                    out.append(f"{name} {v:,.3f} {text}")
                elif not nozeros:
                    out.append(f"{name} n/a")
        return out
    return lines


class _TablePlan(NamedTuple):
    """How the tables of a report are filled: the cell plans of IPv4 and IPv6 rows
    (indexed by ``family == AF_INET6``), the sections' names, and the fast layouts of
    IPv4 and IPv6 rows (None where a section is not plain counts: then the cells)."""
    v4: tuple
    v6: tuple
    sections: tuple[str, ...]
    fast: tuple


def _cell_plans(ctx: ReportContext) -> _TablePlan:
    v4, v6 = _cell_plan(ctx, False), _cell_plan(ctx, True)
    sections = tuple(sec for sec, _ in ctx.layout)
    return _TablePlan(v4, v6, sections, tuple(
        _FastTables(plan, sections) if sections and all(type(n) is tuple for n in plan)
        else None
        for plan in (v4, v6)))


_EMPTY_CELL = ("-",)


def _cells(row: Row, plans: _TablePlan) -> list:
    """The counter lines of each section (column) of one row."""
    get = row.counters.get
    # a missing counter is 0 and, like 0, not shown; below 1,000, str() is the text of "{:,}"
    return [([f"{n} {v}" if -1000 < v < 1000 and type(v) is int else f"{n} {v:,}"
              for n, v in zip(names, map(get, names)) if v] if type(names) is tuple
             else names(get)) or _EMPTY_CELL
            for names in plans[row.key.family == AF_INET6]]


@lru_cache(maxsize=4096)
def _table_format(sections: tuple[str, ...], widths: tuple[int, ...],
                  depth: int) -> tuple[str, int]:
    """A row's table with columns of these widths and ``depth`` counter lines, as a
    %-format that takes the cells line by line, and its width: a blank line, the
    section names, a rule, the counter lines and a blank line, laid out like a rich
    SIMPLE_HEAD table."""
    width = sum(widths) + 3 * (len(widths) - 1) + 2
    line = " " + "   ".join(f"%-{w}s" for w in widths) + " "
    head = (line % sections).replace("%", "%%")
    return "\n".join([" " * width, head, " " + "\u2500" * (width - 2) + " ",
                      *[line] * depth, " " * width]), width


def _table(row: Row, ctx: ReportContext, plans: _TablePlan) -> tuple[str, int]:
    """A row's table (Socket / Ip / Tcp / TcpExt columns) and its width, built with plain
    string operations: a 100k-row report renders in about a second, not minutes."""
    fast = plans.fast[row.key.family == AF_INET6]
    table = fast.table(row.counters) if fast is not None else None
    return table or _cells_table(_cells(row, plans), plans.sections)


def _cells_table(cells: list, sections: tuple[str, ...]) -> tuple[str, int]:
    """The table of these cells (a list of lines per section) and its width."""
    widths = tuple([max(len(h), max(map(len, col))) for h, col in zip(sections, cells)])
    fmt, width = _table_format(sections, widths, max(map(len, cells)))
    return fmt % tuple(chain.from_iterable(zip_longest(*cells, fillvalue=""))), width


_CACHE_MAX = 4096     # layouts and tables kept per report
_TEXTS_MAX = 1 << 16  # counts' texts kept per report


class _CountTexts(dict):
    """An int count -> its text in a table ("1,234"), "" for 0 (not shown): looked up in C
    for every value of a row (counts repeat, most rows' texts are found, not formatted)."""

    def __missing__(self, v: int) -> str:
        if len(self) >= _TEXTS_MAX:
            self.clear()
        text = self[v] = format(v, ",") if v else ""
        return text


def _no_texts(_texts: tuple) -> tuple:
    return ()


class _FastTables:
    """The tables of rows whose sections are all plain counts, zeros left out: the text
    :func:`_cells_table` makes of :func:`_cells`, made with C-level calls for rows whose
    counts are all ints. A row's counters' names and the lengths of their values' texts
    decide its layout: which texts go in which section, line by line, and the columns'
    widths. One %-format per layout (cached) then writes the whole table; a row with
    the same counts as one of the last few thousand gets that one's table."""

    def __init__(self, plan: tuple, sections: tuple[str, ...]):
        self.plan, self.sections = plan, sections
        self.texts = _CountTexts()
        self.layouts: dict[tuple, tuple] = {}
        # the last tables made, by counters' names and texts: many rows of a large report
        # have the same counts (connections that did the same thing)
        self.tables: dict[tuple, tuple[str, int]] = {}

    def table(self, counters: dict) -> tuple[str, int] | None:
        """The row's table and its width; None if a value is not an int."""
        vals = tuple(counters.values())
        if not _INT.issuperset(map(type, vals)):
            return None
        names, texts = tuple(counters), tuple(map(self.texts.__getitem__, vals))
        made = self.tables.get((names, texts))
        if made is None:
            key = (names, tuple(map(len, texts)))
            fmt, pick, width = self.layouts.get(key) or self._layout(key)
            if len(self.tables) >= _CACHE_MAX:
                self.tables.clear()
            made = self.tables[names, texts] = (fmt % pick(texts), width)
        return made

    def _layout(self, key: tuple) -> tuple:
        """(%-format, which texts it takes in order, width) of a row with these counters'
        names and texts' lengths (0: the count is 0)."""
        names, lens = key
        pos = {n: i for i, n in enumerate(names) if lens[i]}
        cols = [[(n, pos[n]) for n in sec if n in pos] for sec in self.plan]
        widths = [max(len(h), max((len(n) + 1 + lens[i] for n, i in col), default=1))
                  for h, col in zip(self.sections, cols)]
        order, lines = [], []
        for line in zip_longest(*[col or [None] for col in cols]):
            cells = []
            for item, w, col in zip(line, widths, cols):
                if item is None:     # (a section with nothing to show has "-" in its first line)
                    cells.append(" " * w if col or lines else "-".ljust(w))
                else:
                    n, i = item
                    order.append(i)
                    cells.append("%s %%-%ds" % (n.replace("%", "%%"), w - len(n) - 1))
            lines.append(" " + "   ".join(cells) + " ")
        width = sum(widths) + 3 * (len(widths) - 1) + 2
        head = " " + "   ".join(h.ljust(w) for h, w in zip(self.sections, widths)) + " "
        fmt = "\n".join([" " * width, head.replace("%", "%%"), " " + "\u2500" * (width - 2) + " ",
                         *lines, " " * width])
        pick = itemgetter(*order) if order else _no_texts
        if len(self.layouts) >= _CACHE_MAX:
            self.layouts.clear()
        layout = self.layouts[key] = (fmt, pick, width)
        return layout


def _extra_lines(row: Row, dist: bool, us: bool) -> list[str]:
    """What follows a row's table: RFC 4898 variables, congestion-state histograms, samples."""
    lines = []
    if row.closing:
        lines.extend(estats_lines(row))
    if dist:       # (only the cong group has histograms)
        lines.extend(dist_lines(row, us))
    sm = series_summary(row.samples) if row.samples else None
    if sm:
        lines.extend([summary_line(sm), ""])
    return lines


def _row_text(row: Row, ctx: ReportContext, title_suffix: str, plans: _TablePlan,
              dist: bool) -> str:
    """A row as plain text (not a terminal: no styles), its title padded to the table's width."""
    table, width = _table(row, ctx, plans)
    title = _title_text(row, title_suffix, ctx.catalogue.noun)
    if not title.isprintable():         # what rich's Text drops (a command name's \\r, say)
        title = strip_control_codes(title)
    if row.closing or dist or row.samples:
        extra = _extra_lines(row, dist, ctx.us)
        if extra:
            table += "\n" + "\n".join(extra)
    return f"{title.ljust(width)}\n{table}\n"


def print_row(console: Console, row: Row, ctx: ReportContext, title_suffix: str = "",
              plans: _TablePlan | None = None) -> None:
    plans = plans or _cell_plans(ctx)
    dist = ctx.dist
    if console.is_terminal:   # styles: a bold title and header line
        table, width = _table(row, ctx, plans)
        body = table.split("\n") + _extra_lines(row, dist, ctx.us)
        title = _title(row, title_suffix, ctx.catalogue.noun)
        title.pad_right(max(0, width - len(title)))
        text = Text("\n").join([title, Text(body[0]), Text(body[1], style="bold"),
                                *map(Text, body[2:])])
        console.print(text, crop=False, soft_wrap=True)
    else:
        console.file.write(_row_text(row, ctx, title_suffix, plans, dist))


_UNIT_SUFFIX = {"us": " us", "ms": " ms"}


def _fmt_evar(value, unit: str) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else f"{value:,}"
    return text + _UNIT_SUFFIX.get(unit, "")


def estats_lines(row: Row, width: int = 96) -> list[str]:
    """--rfc4898: the variables of the row's sockets that closed, one line per RFC table."""
    es = row.estats
    if es is None:
        return []
    n = len(row.closing)
    lines = [" RFC 4898 at close" + ("" if n == 1 else f" ({n} sockets: sums, means, min / max)")]
    for table in ESTATS_TABLES:
        items = [f"{v.name} {_fmt_evar(es.get(v.name), v.unit)}" for v in EVARS if v.table == table]
        line = f"   {table}:"
        for item in items:
            if len(line) + len(item) + 2 > width:
                lines.append(line)
                line = "     "
            line += ("  " if not line.endswith(":") and line.strip() else " ") + item
        lines.append(line)
    lines.append("")
    return lines


def row_dist(row: Row) -> dict[str, dict[int, int]]:
    """--dist: {state: {bucket: stays}}, bucket b holding stays of 2^b to 2^(b+1)-1 µs."""
    out: dict[str, dict[int, int]] = {}
    for name, v in row.counters.items():
        hk = hist_key(name)
        if hk and v:
            out.setdefault(CA_STATES[hk[0]], {})[hk[1]] = v
    return {s: dict(sorted(out[s].items())) for s in CA_STATES if s in out}


def _span(b: int, us: bool) -> str:
    lo, hi = (1 << b) if b else 0, (1 << (b + 1)) - 1
    if us:
        return f"{lo:,} -> {hi:,} us"
    return f"{lo / 1000:,.3f} -> {hi / 1000:,.3f} ms"


def dist_lines(row: Row, us: bool = False, width: int = 30) -> list[str]:
    """Log2 histograms of the stays in each congestion state (bcc-style bars)."""
    lines: list[str] = []
    for state, buckets in row_dist(row).items():
        top = max(buckets.values())
        n_stays = sum(buckets.values())
        lines.append(f" {state}: how long each stay lasted "
                     f"({n_stays:,} stay{'' if n_stays == 1 else 's'})")
        spans = {b: _span(b, us) for b in range(min(buckets), max(buckets) + 1)}
        w = max(map(len, spans.values()))
        for b, span in spans.items():
            n = buckets.get(b, 0)
            bar = "*" * (round(width * n / top) if n else 0)
            lines.append(f"   {span:>{w}} : {n:<6,}|{bar:<{width}}|")
    if lines:
        lines.append("")
    return lines


def render_tables(console: Console, rows: Iterable[Row], ctx: ReportContext, header: str) -> int:
    n = 0
    console.print(Text(header, style="bold"), soft_wrap=True)
    plans = _cell_plans(ctx)
    if console.is_terminal:
        for row in rows:
            print_row(console, row, ctx,
                      "" if row.opened_during_collection else ctx.catalogue.partial, plans)
            n += 1
    else:                     # plain text: the console's file takes each row's text as it is
        write, dist, partial = console.file.write, ctx.dist, ctx.catalogue.partial
        for row in rows:
            write(_row_text(row, ctx, "" if row.opened_during_collection else partial, plans, dist))
            n += 1
    if n == 0:
        console.print(ctx.catalogue.empty)
    return n


def render_footer(console: Console, ctx: ReportContext, reconciliation: bool = True) -> None:
    """What the rows do not say: unavailable counters, the host's counters beside the rows'
    (``reconciliation``: unless the output carries them itself), the run's notes."""
    if reconciliation and ctx.reconciliation is not None:
        for line in footer_lines(ctx.reconciliation):
            console.print(escape(line), soft_wrap=True)
    if ctx.unavailable:
        why = ctx.why_unavailable or "probe did not resolve"
        console.print(f"[yellow]Unavailable on this kernel[/] ({why}, not zero): "
                      + ", ".join(ctx.unavailable))
    for note in ctx.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")     # (a note may name a file)


def closed_socket_row(st: SocketTotals, samples: Iterable = ()) -> Row:
    """onclose=1: one closed socket's row (with its RFC 4898 variables and samples)."""
    return Row(GroupKey.of("tuple", st.tuple), dict(st.counters), 1, 1,
               {st.pid: st.comm} if st.pid else {}, st.opened_during_collection,
               [st.estats] if st.estats is not None else [], list(samples))


def _columns(ctx: ReportContext) -> list[tuple[str, bool, bool, int | None]]:
    """(name, available, IPv4 only, value when absent: 0 for a count, None for a
    measurement) of every counter a row shows, in catalogue order."""
    avail, unavail = set(ctx.available), set(ctx.unavailable)
    return [(c.name, c.name in avail, c.ipv4_only, None if getattr(c, "unit", "") else 0)
            for c in ctx.catalogue.counters if c.name in avail or c.name in unavail]


_NULL = object()      # looked up for a column a row shows as null: no row has it
_INT = frozenset({int})
_STR = frozenset({str})


class _CounterColumns:
    """The counters of IPv4 rows, or of IPv6 rows, in JSON and CSV, worked out once per
    report: every column's name, and what a row's ``counters.get`` is asked for it (a
    column not available here, or IPv4-only in an IPv6 row, is null)."""

    def __init__(self, columns: list[tuple[str, bool, bool, int | None]], v6: bool):
        shown = [ok and not (v6 and v4) for _, ok, v4, _ in columns]
        self.names = tuple(name for name, _, _, _ in columns)
        self.lookups = tuple(name if on else _NULL for (name, _, _, _), on in zip(columns, shown))
        self.absents = tuple(absent if on else None
                             for (_, _, _, absent), on in zip(columns, shown))
        self.shown = tuple(name for name, on in zip(self.names, shown) if on)
        self.shown_absents = tuple(absent for absent, on in zip(self.absents, shown) if on)
        # the JSON object with a %s for each shown column's value: null is written in
        self.json_format = "{" + ",".join(
            encode_basestring_ascii(name).replace("%", "%%") + (":%s" if on else ":null")
            for name, on in zip(self.names, shown)) + "}"

    def values(self, counters: dict) -> dict:
        """{name: value or None} of every column, in order."""
        return dict(zip(self.names, map(counters.get, self.lookups, self.absents)))

    def json(self, counters: dict, dumps) -> str:
        """:meth:`values` as compact JSON, as ``dumps`` writes it."""
        vals = tuple(map(counters.get, self.shown, self.shown_absents))
        if _INT.issuperset(map(type, vals)):    # counts: str() is their JSON
            return self.json_format % vals
        return dumps(self.values(counters))


def _counter_columns(ctx: ReportContext) -> tuple[_CounterColumns, _CounterColumns]:
    """The counter columns of IPv4 rows and of IPv6 rows."""
    cols = _columns(ctx)
    return _CounterColumns(cols, False), _CounterColumns(cols, True)


def _row_head(row: Row) -> dict:
    """A row's key fields, sockets, processes, and whether it opened while collecting."""
    d = key_fields(row.key)
    d["sockets"] = row.sockets
    d["closed"] = row.closed
    d["processes"] = [{"pid": p, "comm": c} for p, c in sorted(row.processes.items())]
    d["opened_during_collection"] = row.opened_during_collection
    return d


def _row_extras(row: Row, dist: bool) -> dict:
    """What a row adds after its counters, when it has it: samples, RFC 4898 variables,
    congestion-state histograms."""
    d = {}
    sm = series_summary(row.samples) if row.samples else None
    if sm:                    # --sample: cwnd / srtt over the row's samples (files have them all)
        d["series"] = sm
    es = row.estats
    if es is not None:        # --rfc4898: as the socket(s) closed; null: not kept by this kernel
        d["rfc4898"] = es
    rd = row_dist(row) if dist else None
    if rd:        # --dist: {"Recovery": {"1024": stays of 1024-2047 µs, ...}, ...}
        d["dist_us"] = {s: {str((1 << b) if b else 0): n for b, n in bk.items()}
                        for s, bk in rd.items()}
    return d


def row_dict(row: Row, ctx: ReportContext,
             columns: tuple[_CounterColumns, _CounterColumns] | None = None) -> dict:
    columns = columns or _counter_columns(ctx)
    d = _row_head(row)
    cols = columns[row.key.family == AF_INET6]
    d["counters"] = cols.values(row.counters)
    d.update(_row_extras(row, ctx.dist))
    return d


def _head_json(row: Row) -> str | None:
    """:func:`_row_head` as compact JSON without its closing brace, written as json
    writes it; None for a row whose values are not the plain ones (then json does it)."""
    procs, opened = row.processes, row.opened_during_collection
    if (type(opened) is not bool or type(row.sockets) is not int or type(row.closed) is not int
            or not _INT.issuperset(map(type, procs))
            or not _STR.issuperset(map(type, procs.values()))):
        return None
    p = ",".join(f'{{"pid":{pid},"comm":{encode_basestring_ascii(comm)}}}'
                 for pid, comm in sorted(procs.items()))
    return (f'{key_json(row.key)},"sockets":{row.sockets},"closed":{row.closed},'
            f'"processes":[{p}],"opened_during_collection":{"true" if opened else "false"}')


def write_json(out: IO[str], rows: Iterable[Row], ctx: ReportContext,
               win: Window | None = None) -> int:
    """One compact JSON object per row (NDJSON), :func:`row_dict`'s, put together from
    pieces: the counters, most of each line, go through a format string planned once."""
    n = 0
    columns = _counter_columns(ctx)
    dist = ctx.dist
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    write = out.write
    wf = window_fields(win) if win is not None else None
    for row in rows:
        line = _head_json(row) if wf is None else None
        if line is None:
            line = dumps({**wf, **_row_head(row)} if wf else _row_head(row))[:-1]
        line += ',"counters":' + columns[row.key.family == AF_INET6].json(row.counters, dumps)
        if row.samples or row.closing or dist:
            for k, v in _row_extras(row, dist).items():
                line += "," + encode_basestring_ascii(k) + ":" + dumps(v)
        write(line + "}\n")
        n += 1
    return n


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def window_fields(win: Window) -> dict:
    """Where a snapshot row sits in time: its interval number, end time (UTC), and
    whether it is the partial interval after the last full one."""
    return {"interval": win.seq, "time": _iso(win.end_ms), "final": win.final}


def print_window(console: Console, win: Window, rows: list[Row], hidden: int, ctx: ReportContext,
                 timestamp: bool) -> None:
    """One interval snapshot as tables: the counts since the previous one."""
    head = f"interval {win.seq}" + (" (partial, to the end of the run)" if win.final else "")
    if win.start_ms is not None and win.end_ms is not None:
        head += f", {max(0, win.end_ms - win.start_ms) / 1000:.1f} s"
    if timestamp and win.end_ms is not None:
        head = time.strftime("%H:%M:%S", time.localtime(win.end_ms / 1000)) + "  " + head
    console.print(Text(head, style="bold"))
    plans = _cell_plans(ctx)
    for row in rows:
        print_row(console, row, ctx, plans=plans)
    if not rows:
        console.print("  no socket activity in this interval")
    if hidden:
        console.print(f"  ... {hidden} more rows (--top)")


ROW_KEYS = ("sockets", "closed", "processes")
WINDOW_KEYS = ("interval", "time", "final")


def csv_reconciles(ctx: ReportContext) -> bool:
    """Has the CSV the reconciliation column (empty on the rows, the kind of line on the
    host's three last lines)?"""
    return ctx.reconciling or ctx.reconciliation is not None


def csv_columns(ctx: ReportContext, window: bool = False) -> list[str]:
    return (list(WINDOW_KEYS) if window else []) + [*csv_key_fields(ctx.index), *ROW_KEYS] + [
        c.name for c in ctx.catalogue.counters
        if c.name in ctx.available or c.name in ctx.unavailable] + (
        [f"rfc4898.{v.name}" for v in EVARS] if ctx.estats else []) + (
        [CSV_COLUMN] if csv_reconciles(ctx) else [])


def write_csv_reconciliation(out: IO[str], ctx: ReportContext, window: bool = False) -> None:
    """The host's counters, the rows' sums and the remainder: three lines under the rows'
    header, the counters in their columns (empty: no MIB counterpart), the key columns
    empty, the last column saying which line it is."""
    assert ctx.reconciliation is not None
    columns = csv_columns(ctx, window)
    w = csv.writer(out, lineterminator="\n")
    for kind, values in csv_values(ctx.reconciliation).items():
        w.writerow([values.get(c, "") for c in columns[:-1]] + [kind])


def write_csv(out: IO[str], rows: Iterable[Row], ctx: ReportContext, win: Window | None = None,
              header: bool = True) -> int:
    """A header, then one line per row: csv_columns()'s, a missing value (None) empty."""
    w = csv.writer(out, lineterminator="\n")
    if header:
        w.writerow(csv_columns(ctx, win is not None))
    writerow = w.writerow
    columns = _counter_columns(ctx)
    evars = [v.name for v in EVARS] if ctx.estats else []
    head = [window_fields(win)[k] for k in WINDOW_KEYS] if win is not None else []
    n = 0
    key_columns = csv_key_fields(ctx.index)
    recon = csv_reconciles(ctx)
    for row in rows:
        k = key_fields(row.key)
        vals = head + [k.get(c, "") for c in key_columns]
        vals += (row.sockets, row.closed,
                 " ".join(f"{c}[{p}]" for p, c in sorted(row.processes.items())))
        cols = columns[row.key.family == AF_INET6]
        vals += map(row.counters.get, cols.lookups, cols.absents)       # (csv writes None as "")
        if evars:
            vals += map((row.estats or {}).get, evars)
        if recon:
            vals.append("")
        writerow(vals)
        n += 1
    return n
