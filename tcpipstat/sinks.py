"""Where a report goes: one Sink per output (tables, NDJSON, CSV).

A run hands its sink what it has as it has it: each socket as it closes
(``onclose=1``), each interval's snapshot (``--interval``), and at the end the rows
of the whole run with the footer (unavailable counters, notes). The main path
(tcpipstat/app.py) never asks which output was chosen; the writers themselves are
tcpipstat/report.py's.
"""
from __future__ import annotations

from typing import IO

from rich.console import Console

from .model import Row, SocketTotals, Window
from .reconcile import write_json as write_reconciliation
from .report import (ReportContext, closed_socket_row, csv_reconciles, print_row, print_window,
                     render_footer, render_tables, write_csv, write_csv_reconciliation,
                     write_json)

PARTIAL = "(opened before collection started: partial totals)"


class Sink:
    """The report of one run. ``on_close`` and ``on_window`` may come before ``on_end``."""

    def __init__(self, ctx: ReportContext, out: IO[str], console: Console, errc: Console):
        self.ctx, self.out, self.console, self.errc = ctx, out, console, errc

    def on_close(self, st: SocketTotals, samples) -> None:
        """onclose=1: a socket closed (its whole-life totals)."""

    def on_window(self, win: Window, rows: list[Row], hidden: int, timestamp: bool) -> None:
        """--interval: a snapshot, the counts since the previous one."""

    def on_end(self, rows: list[Row], title: str) -> None:
        """The report of the whole run (no rows when snapshots or closes were the report),
        then its footer."""

    def footer(self, console: Console, reconciliation: bool = True) -> None:
        render_footer(console, self.ctx, reconciliation)


class TableSink(Sink):
    def on_close(self, st: SocketTotals, samples) -> None:
        print_row(self.console, closed_socket_row(st, samples), self.ctx,
                  "" if st.opened_during_collection else PARTIAL)

    def on_window(self, win: Window, rows: list[Row], hidden: int, timestamp: bool) -> None:
        print_window(self.console, win, rows, hidden, self.ctx, timestamp)
        self.out.flush()

    def on_end(self, rows: list[Row] | None, title: str) -> None:
        if rows is not None:
            render_tables(self.console, rows, self.ctx, title)
        self.footer(self.console)


class JsonSink(Sink):
    def on_close(self, st: SocketTotals, samples) -> None:
        write_json(self.out, [closed_socket_row(st, samples)], self.ctx)
        self.out.flush()

    def on_window(self, win: Window, rows: list[Row], hidden: int, timestamp: bool) -> None:
        write_json(self.out, rows, self.ctx, win)
        self.out.flush()

    def on_end(self, rows: list[Row] | None, title: str) -> None:
        if rows is not None:
            write_json(self.out, rows, self.ctx)
        if self.ctx.reconciliation is not None:     # (the last object, whatever came before)
            write_reconciliation(self.out, self.ctx.reconciliation)
        self.footer(self.errc, reconciliation=False)


class CsvSink(Sink):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._header = True       # (snapshots and closed sockets share one header)
        self._column = False      # that header has the reconciliation column
        self._window = False      # and the interval columns

    def on_close(self, st: SocketTotals, samples) -> None:
        self._lines([closed_socket_row(st, samples)])

    def on_window(self, win: Window, rows: list[Row], hidden: int, timestamp: bool) -> None:
        self._lines(rows, win)

    def _lines(self, rows: list[Row], win: Window | None = None) -> None:
        """Lines written as they come, under the one header."""
        self._write(rows, win)
        self.out.flush()

    def _write(self, rows: list[Row], win: Window | None = None) -> None:
        if self._header:
            self._column, self._window = csv_reconciles(self.ctx), win is not None
        write_csv(self.out, rows, self.ctx, win, header=self._header)
        self._header = False

    def on_end(self, rows: list[Row] | None, title: str) -> None:
        if rows is not None or self._header:     # (a report without rows still has its header)
            self._write(rows or [])
        # (a header written before the collector's host told its counters, an --interval
        # run's in the lab, has no column for them: they go to the footer)
        inline = self.ctx.reconciliation is not None and self._column
        if inline:
            write_csv_reconciliation(self.out, self.ctx, self._window)
        self.footer(self.errc, reconciliation=not inline)


SINKS = {"table": TableSink, "json": JsonSink, "csv": CsvSink}


def make_sink(output: str, ctx: ReportContext, out: IO[str], console: Console,
              errc: Console) -> Sink:
    return SINKS[output](ctx, out, console, errc)
