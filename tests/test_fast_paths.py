"""The fast paths of the report pipeline against their reference paths, on a large input
made from the lab recordings (tests/fixtures): every socket record of every recording,
replicated with distinct ports and its counts scaled so that every width of number
shows up (0, 1 to 10 digits, thousands separators, negative gauges)."""
from __future__ import annotations

import io
import itertools

import pytest
from rich.console import Console

from tcpipstat import report
from tcpipstat.model import Collection
from tcpipstat.records import SOCKET, SOCKET_FORMAT1, SOCKET_FORMAT2, Parser
from tcpipstat.report import ReportContext, render_tables

from .conftest import FIXTURES

RECORDINGS = sorted(FIXTURES.glob("*.records"))
SCALES = (1, 0, 7, 1000, 12345, 999_999, 10**9 + 7, -1, -1001)
ROWS = 12_000


def _big_stream(rows: int = ROWS) -> list[str]:
    """A format-3 header naming every counter the recordings have, then ``rows`` socket
    records: the recordings' own, each with a port of its own and its counts scaled."""
    socks, names = [], []
    for path in RECORDINGS:
        width = SOCKET.width
        for line in path.read_text().splitlines():
            f = line.split("\t")
            if f[0] == "H":
                names += [n for n in f[7].split(",") if n not in names]
                width = {1: SOCKET_FORMAT1, 2: SOCKET_FORMAT2, 3: SOCKET}[int(f[2])].width
            elif f[0] == "R":     # (FLAGS 1, CGROUP and NETNS 0 where the format has none)
                head = (f[:width] + ["1", "0", "0"][width - SOCKET_FORMAT1.width:])
                socks.append((head, f[width:]))
    assert len(socks) > 100 and len(names) > 20
    header = "\t".join(["H", "tcpipstat", "3", "0.1.0", "1000", "0", "8192", ",".join(names)])
    out = [header]
    scales = itertools.cycle(SCALES)
    for i, (head, counts) in enumerate(itertools.islice(itertools.cycle(socks), rows)):
        head = list(head)
        head[5] = str(i % 65536)
        head[4] = "%x" % (0x0A000000 + (i >> 16)) if head[2] == "2" else head[4]
        pairs = []
        for item in counts:
            name, _, value = item.partition("=")
            if name.startswith("h."):
                pairs.append(item)
            else:
                pairs.append(f"{name}={int(value) * next(scales)}")
        out.append("\t".join(head + pairs))
    return out + ["T\t2000\t%d\t0\t0\t0" % rows]


@pytest.fixture(scope="module")
def big() -> Collection:
    p = Parser("big")
    return Collection().extend(p.parse(_big_stream()))


def _counts(names: tuple[str, ...]) -> tuple[str, ...]:
    """The plain counts among ``names`` (not the congestion-state times: those sections
    take the cells path)."""
    units = {n: unit for _, items in report.LIVE.layout for n, _, unit in items}
    return tuple(n for n in names if not units[n])


_CELL_PLANS = report._cell_plans


def _without_fast(ctx: ReportContext) -> report._TablePlan:
    return _CELL_PLANS(ctx)._replace(fast=(None, None))


@pytest.mark.parametrize("index", ["tuple", "lport"])
@pytest.mark.parametrize("available", ["all", "some"])
def test_fast_tables_are_the_cells_tables(big, index, available):
    """Every row's table: the fast layout's text is the reference (cells) text."""
    names = _counts(big.counter_names)
    ctx = ReportContext(names if available == "all" else names[::2],
                        () if available == "all" else names[1::2])
    plans = report._cell_plans(ctx)
    assert plans.fast[0] is not None and plans.fast[1] is not None
    rows = big.rows(index)
    assert len(rows) > ROWS * 9 // 10       # (the rest scaled to all zeros: no activity)
    families = set()
    for row in rows:
        families.add(row.key.family)
        want = report._cells_table(report._cells(row, plans), plans.sections)
        assert report._table(row, ctx, plans) == want, row.key
    assert index == "lport" or families == {2, 10}


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("width", [40, 100, 250])
def test_fast_tables_render_what_the_reference_renders(big, monkeypatch, terminal, width):
    """The whole report, plain or styled, at consoles narrower and wider than its tables."""
    rows = big.rows("tuple")[:600 if terminal else 6000]
    ctx = ReportContext(_counts(big.counter_names))

    def render() -> str:
        out = io.StringIO()
        console = Console(file=out, width=width, force_terminal=terminal, color_system="standard")
        render_tables(console, rows, ctx, "header")
        return out.getvalue()

    fast = render()
    monkeypatch.setattr(report, "_cell_plans", _without_fast)
    assert fast == render()
    assert "1,000,000,007" in fast and "-1,001" in fast


def test_a_count_that_is_not_an_int_takes_the_cells_path():
    ctx = ReportContext(("SendBytes", "InSegs"))
    plans = report._cell_plans(ctx)
    from tcpipstat.indexes import GroupKey
    from tcpipstat.model import Row
    row = Row(GroupKey("tuple", 2, 1, 2, 3, 4), {"SendBytes": 1234.5, "InSegs": True})
    table, width = report._table(row, ctx, plans)
    assert (table, width) == report._cells_table(report._cells(row, plans), plans.sections)
    assert table.splitlines()[3] == " SendBytes 1,234.5   InSegs 1 " and width == 30


@pytest.mark.parametrize("index", ["tuple", "rport"])
def test_plain_titles_are_the_styled_titles_text(big, index):
    rows = big.rows(index)
    assert any(len(r.processes) > 1 for r in rows) == (index == "rport")
    for suffix in ("", report.LIVE.partial):
        for row in rows:
            want = "".join([text for text, _ in report._title_parts(row, suffix, "socket")])
            assert report._title_text(row, suffix, "socket") == want


def test_tuple_rows_are_the_merged_rows(big):
    """index=tuple rows over the whole run are made without the merging loop; that loop
    (what a window's sockets go through: the same rows when nothing is sampled) agrees."""
    assert not big.series
    rows = big.rows("tuple")
    assert len(rows) > ROWS * 9 // 10
    assert rows == big.rows("tuple", list(big.sockets.values()))
