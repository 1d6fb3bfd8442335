"""The Python side's memory over a long bpftrace run (bench/bt_memory.py measures it).

With onclose=1 and --interval a closed socket is reported once, as it closes or in the
window it closed in. The bpftrace collector writes nothing of a socket after its close
record, so the model then forgets it: memory does not grow with every socket that came
and went. The stap collector may write late segments of a closed tuple after its close
record: there the closed socket is kept (its records add up as before). The records here
are made with records.py's own spec formats.
"""
from __future__ import annotations

import io

import pytest

from tcpipstat import app, model
from tcpipstat.backend import RunOutcome
from tcpipstat.plan import build_plan
from tcpipstat.records import HEADER, INTERVAL, MAGIC, SOCKET, TRAILER, parse_text

COUNTERS = ("SendBytes", "RecvBytes")
CLOSED, OPEN = 3000, 3          # sockets that come and go, sockets open at the end


def _lines(windows: int = 1) -> list[str]:
    """A run's lines: CLOSED sockets (distinct ports) that send 100 bytes and close, in
    ``windows`` intervals, and OPEN that stay open to the end."""
    row = SOCKET.printf() + "\t" + "\t".join(f"{c}=%d" for c in COUNTERS) + "\n"
    out = [HEADER.printf() % (MAGIC, 3, "0", 1000, 2, 4096, ",".join(COUNTERS))]
    per = CLOSED // windows
    for w in range(windows):
        for port in range(10000 + w * per, 10000 + (w + 1) * per):
            out.append(row % ("close", 2, 0, 0x7F000001, port, 0, 0x7F000001, 80, 7, "c", 1,
                              0, 0, 100, 10))
        if windows > 1:
            out.append(INTERVAL.printf() % (w + 1, 2000 + w * 1000))
    for port in range(1, OPEN + 1):
        out.append(row % ("end", 2, 0, 0x7F000001, port, 0, 0x7F000001, 80, 7, "c", 1, 0, 0,
                          5, 0))
    return out + [TRAILER.printf() % (9000, CLOSED + OPEN, 0, 0, 0, 0, 3)]


class _Backend:
    same_host = False

    def interrupt(self) -> None:
        pass


def _run(monkeypatch, words: list[str], collector: str, lines: list[str]):
    """app.collect over ``lines`` as if ``collector`` wrote them live: its Collection."""
    made = []

    class Kept(model.Collection):
        def __init__(self, **kw):
            super().__init__(**kw)
            made.append(self)

    src = app._Source(lines, collector, COUNTERS, backend=_Backend(), outcome=RunOutcome())
    monkeypatch.setattr(app, "_live", lambda plan, errc, err: src)
    monkeypatch.setattr(app, "Collection", Kept)
    out = io.StringIO()
    assert app.collect(build_plan(["--json", *words]), out, io.StringIO()) == 0
    return made[0], out.getvalue().splitlines()


def test_onclose_forgets_the_sockets_it_reported(monkeypatch):
    col, rows = _run(monkeypatch, ["onclose=1"], "bpftrace", _lines())
    assert len(rows) == CLOSED
    assert len(col.sockets) == OPEN                 # (only the sockets still open)


@pytest.mark.parametrize("windows", [1, 3])
def test_interval_forgets_closed_sockets_after_their_window(monkeypatch, windows):
    col, rows = _run(monkeypatch, ["--interval", "1", "index=lport"], "bpftrace",
                     _lines(windows))
    assert len(rows) == CLOSED + OPEN and len(col.sockets) == OPEN


def test_the_stap_collector_keeps_its_closed_tuples(monkeypatch):
    """(late segments of a closed tuple add to it: the golden outputs hold that)"""
    col, rows = _run(monkeypatch, ["onclose=1"], "stap", _lines())
    assert len(rows) == CLOSED and len(col.sockets) == CLOSED + OPEN


def test_a_dropped_socket_outside_the_tree_is_still_counted():
    col = model.Collection(forget_closed=True, selection="tree", keep=lambda st: st.in_tree,
                           on_close=lambda st: None)
    col.extend(parse_text("".join(_lines()).replace("\t7\tc\t1\t", "\t7\tc\t0\t")))
    assert len(col.sockets) == OPEN and col.outside_tree() == CLOSED + OPEN


def test_lost_events_on_stdout_are_told_not_unreadable():
    """bpftrace 0.17 says "Lost N events" (a full perf buffer: a long churn run whose
    reader fell behind) on stdout, amid the records: a warning of the run, not a record."""
    from tcpipstat import bpftrace
    runner = bpftrace.Runner(["bpftrace"], COUNTERS, 4096, print)
    lines = _lines()[1:3]
    out = list(runner._records(iter([lines[0], "Lost 349 events\n", lines[1]])))
    assert out == lines and runner.outcome.warnings == ["Lost 349 events"]
