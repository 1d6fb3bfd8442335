"""The main path: arguments -> plan -> script -> stap -> records -> model -> report.

``main()`` is the one place where errors become exit statuses (errors.ExitStatus).
"""
from __future__ import annotations

import gc
import json
import os
import re
import signal
import sys
from typing import IO

from rich.console import Console
from rich.table import Table

from .counters import points_for_groups, select
from .errors import EnvironmentNotReady, ExitStatus, RecordParseError, TcpipstatError, UsageError
from .model import Collection, Window, sort_rows
from .plan import Plan, build_plan
from .procs import fill_processes
from .records import Parser, SaveHeader
from .render import module_args, render_probe_check, render_script, resolve_points
from .report import (ReportContext, closed_socket_row, print_row, render_footer, render_tables,
                     write_csv, write_json, write_window)
from .stap import Collector, RunOutcome, SpeculativeCompile, Toolchain

PROG = "tcpipstat"


def dump_script(plan: Plan) -> str:
    """The script for the chosen groups, before probe resolution (every unit; with
    --kprobes-only, none that needs a tracepoint)."""
    sel = select(plan.groups, plan.tracepoints)
    return render_script(sel, plan.max_sockets, plan.dist, plan.estats, plan.sample_ms is not None)


def kernel_release(plan: Plan) -> str:
    return plan.kernel_release or os.uname().release


def prepare(plan: Plan, tc: Toolchain, log) -> tuple[str, list[str], list[str], str]:
    """Resolve probe points on the target kernel; returns (script, available, unavailable,
    how congestion states are seen: "" without the cong group)."""
    kver = kernel_release(plan)
    points = points_for_groups(plan.groups, plan.tracepoints)   # --kprobes-only: no tracepoint asked
    log(f"checking which probe points exist on kernel {kver}...")
    sel = select(plan.groups, plan.tracepoints, resolve_points(tc, points, kver))
    return (render_script(sel, plan.max_sockets, plan.dist, plan.estats, plan.sample_ms is not None),
            list(sel.available), list(sel.unavailable), sel.cong)


def _cong_note(how: str) -> str:
    return f"congestion states seen through the {how}"


def _write_series(plan: Plan, collection: Collection, notes: list[str]) -> None:
    """--series / --plot: every sample of the connections the report keeps."""
    from .series import plot, write_series
    series = collection.kept_series()
    if plan.series:
        fmt = "ndjson" if plan.series.lower().endswith((".ndjson", ".json")) else "csv"
        try:
            n = write_series(plan.series, series, fmt)
        except OSError as e:
            raise TcpipstatError(f"cannot write --series '{plan.series}': {e.strerror}") from None
        notes.append(f"{n:,} samples of {len(series)} connections written to {plan.series} ({fmt})")
    if plan.plot:
        try:
            drawn = plot(plan.plot, series)
        except OSError as e:
            raise TcpipstatError(f"cannot write --plot '{plan.plot}': {e.strerror}") from None
        notes.append(f"cwnd and srtt of {drawn} connections drawn in {plan.plot}"
                     + (f" (the {drawn} with most samples of {len(series)})" if len(series) > drawn else ""))


def _top(plan: Plan, rows: list, notes: list[str]) -> list:
    """--sort / --top, saying how many rows were left out."""
    rows, hidden = sort_rows(rows, plan.sort, plan.top)
    if hidden:
        notes.append(f"{hidden} more rows not shown (--top {plan.top}, by {plan.sort})")
    return rows


def _consoles(plan: Plan, out: IO[str], err: IO[str]):
    console = Console(file=out, highlight=False, soft_wrap=False)
    errc = Console(file=err, highlight=False, stderr=True)
    return console, errc


def _select(plan: Plan, collection: Collection, tree: bool) -> None:
    """Which sockets are reported: -x PID's, or the -c command's process tree."""
    if plan.pid is not None:
        collection.keep, collection.selection = (lambda st, pid=plan.pid: st.pid == pid), "pid"
    elif tree:
        collection.keep, collection.selection = (lambda st: st.in_tree), "tree"


def _on_interval(plan: Plan, collection: Collection, ctx: ReportContext, console: Console, out: IO[str]) -> None:
    if plan.interval_s is None:
        return
    state = {"csv_header": True}

    def show(win: Window) -> None:
        rows, hidden = sort_rows(win.rows(plan.index), plan.sort, plan.top)
        write_window(console, out, plan.output, win, rows, hidden, ctx, plan.timestamp, state)
        out.flush()
    collection.on_interval = show


def _on_close(plan: Plan, collection: Collection, ctx: ReportContext, console: Console, out: IO[str]) -> None:
    if not plan.onclose:
        return
    if plan.output == "table":
        collection.on_close = lambda st: print_row(
            console, closed_socket_row(st, collection.series.get(st.tuple, ())), ctx,
            "" if st.opened_during_collection else "(opened before collection started: partial totals)")
    elif plan.output == "json":
        collection.on_close = lambda st: (
            write_json(out, [closed_socket_row(st, collection.series.get(st.tuple, ()))], ctx), out.flush())


def collect_live(plan: Plan, console: Console, errc: Console, out: IO[str], err: IO[str]):
    def log(msg: str) -> None:
        if plan.output == "table" or plan.verbose:
            errc.print(f"[dim]{PROG}: {msg}[/]")

    tc = Toolchain.find()
    if not tc.overridden and os.geteuid() != 0:
        raise EnvironmentNotReady("collecting needs root (staprun loads a kernel module)",
                                  "run it with sudo, or use --dump-script to see the script")
    kver = kernel_release(plan)
    flags = plan.compile_flags()
    guess = None
    first = dump_script(plan)            # the script when every probe point exists
    if (not plan.verbose and not tc.resolved_cached(kver, render_probe_check(points_for_groups(plan.groups)))
            and not tc.module_path(first, kver, flags).is_file()):
        log(f"compiling the collector for {kver} while checking its probe points (cached after the first run)...")
        guess = SpeculativeCompile(tc, first, kver, flags)
    try:
        script, available, unavailable, cong = prepare(plan, tc, log)
        ko = guess.take(script) if guess else None
    except BaseException:
        if guess:
            guess.cancel()
        raise
    if ko is None:
        log(f"compiling the collector for {kver} (cached after the first run)...")
        ko = tc.compile(script, kver, flags, plan.verbose)

    ctx = ReportContext(tuple(available), tuple(unavailable), plan.nozeros, us=plan.us, estats=plan.estats)
    if cong:
        ctx.notes.append(_cong_note(cong))
    collection = Collection()
    _select(plan, collection, plan.tree)
    _on_close(plan, collection, ctx, console, out)
    _on_interval(plan, collection, ctx, console, out)
    drain = tc.drain_ms()
    runner = Collector(tc, ko, module_args(list(plan.filters), plan.timeout_s, plan.interval_s, plan.count,
                                         plan.sample_ms, plan.on_cwnd_change, drain),
                       plan.command, echo_stderr=lambda line: print(line, file=err), drain_ms=drain)
    parser = Parser("staprun")
    saved = open(plan.save_records, "w") if plan.save_records else None
    if saved:
        saved.write(SaveHeader(kver, tuple(unavailable), plan.tree, cong, plan.estats).line())
    previous = signal.signal(signal.SIGINT, lambda *_: runner.interrupt())
    try:
        what = f"running {plan.command!r}" if plan.command else (
            f"for {plan.timeout_s:g} s" if plan.timeout_s else "until Ctrl-C")
        log(f"collecting {what}...")
        timing = False
        for lineno, line in enumerate(runner.lines(), 1):
            # --stap-arg=-t: stap's per-probe timing report follows the records on stdout;
            # its lock contention lines can arrive before them (another CPU's buffer)
            timing = timing or line.startswith("----- probe hit report")
            if timing or _LOCK_CONTENTION.match(line):
                err.write(line)
                if saved:
                    saved.write("# " + line)
                continue
            if saved:
                saved.write(line)
            try:
                rec = parser.parse_line(line, lineno)
            except RecordParseError as e:
                # one unreadable line must not cost the whole run: count it, go on, and
                # say so (after the report, with a non-zero exit)
                runner.outcome.bad_lines += 1
                runner.outcome.first_bad = runner.outcome.first_bad or e.message
                continue
            if rec is not None:
                collection.add(rec)
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved:
            saved.close()
    if not tc.overridden:
        fill_processes(collection.sockets.values())
    return collection, ctx, runner.outcome


def collect_saved(plan: Plan, console: Console, out: IO[str]):
    path = plan.from_records
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read --from-records '{path}': {e.strerror}") from None
    with f:
        first = f.readline()
        saved = SaveHeader.read(first)       # None: no header line, the first is a record
        head = saved or SaveHeader()
        parser = Parser(path)
        collection = Collection()
        # a run of -c CMD reports its command's process tree, replayed or not
        _select(plan, collection, head.tree)
        ctx = ReportContext((), head.unavailable, plan.nozeros, us=plan.us, estats=head.rfc4898)
        if head.cong:
            ctx.notes.append(_cong_note(head.cong))
        _on_close(plan, collection, ctx, console, out)
        lines = list(f) if saved else [first] + list(f)
        for lineno, line in enumerate(lines, 2 if saved else 1):
            rec = parser.parse_line(line, lineno)
            if rec is not None:
                collection.add(rec)
                if rec is collection.header:
                    ctx.available = rec.counters
    if collection.header is None:
        raise UsageError(f"'{path}' holds no tcpipstat records (no header line)")
    ctx.available = collection.header.counters
    return collection, ctx, RunOutcome()


# stap -t (STP_TIMING) at module exit: "'__global_NAME' lock contention occurred N times"
_LOCK_CONTENTION = re.compile(r"'[^']+' lock contention occurred \d+ times$")


def collect(plan: Plan, out: IO[str], err: IO[str]) -> int:
    console, errc = _consoles(plan, out, err)
    if plan.from_records:
        collection, ctx, outcome = collect_saved(plan, console, out)
    else:
        collection, ctx, outcome = collect_live(plan, console, errc, out, err)

    collection.finish()
    notes = ctx.notes
    if outcome.skipped:
        notes.append(f"stap skipped {outcome.skipped} probe hits (probes that fired while another ran on "
                     "the same CPU, missed returns or lock waits): counters may be low by up to that many "
                     "events")
    if outcome.bad_lines:
        notes.append(f"{outcome.bad_lines} lines from the collector were not records and were skipped "
                     f"(first: {outcome.first_bad}): counters may be low")
    tr = collection.trailer
    if tr and tr.faults:
        notes.append(f"{tr.faults} events could not be read (memory faults in probes)")
    size = collection.header.max_sockets if collection.header else plan.max_sockets
    if tr and tr.dropped:
        notes.append(f"{tr.dropped} events were not counted: the collector's tables (--max-sockets {size}) "
                     f"were full; they hold the sockets active between two flushes, and more than {size // 2} "
                     "were active within 10 ms")
    if tr and tr.pfull:
        notes.append(f"the process table (--max-sockets {size}) was full {tr.pfull} "
                     "times: some sockets may show no process")
    for w in outcome.warnings:
        notes.append(f"stap: {w}")
    if tr is None:
        notes.append("the collector did not finish normally: the report holds what was received")

    if plan.series or plan.plot:
        _write_series(plan, collection, notes)
    if ctx.estats:
        no_vars = sum(1 for s in collection.sockets.values()
                      if s.estats is None and not s.closed and s.has_activity and collection._kept(s))
        if no_vars:
            notes.append(f"{no_vars} sockets were still open at the end: RFC 4898 variables are read as a "
                         "socket closes, so they have none")
    if plan.onclose:
        still_open = sum(1 for s in collection.sockets.values()
                         if not s.closed and s.has_activity and collection._kept(s))
        if still_open:
            notes.append(f"{still_open} sockets were still open at the end and are not reported (onclose=1)")
        rows = []
    elif plan.interval_s is not None:
        rows = []   # the snapshots were the report
    else:
        rows = _top(plan, collection.rows(plan.index), notes)
    if collection.selection == "tree":
        left = sum(1 for s in collection.sockets.values() if s.has_activity and not s.in_tree)
        if left:
            notes.append(f"{left} sockets active meanwhile were not used by the command's processes and "
                         "are not reported (--all-processes shows them)")
    if plan.interval_s is not None:
        pass
    elif plan.output == "json":
        write_json(out, rows, ctx)
    elif plan.output == "csv":
        write_csv(out, rows, ctx)
    elif not plan.onclose:
        dur = collection.duration_s
        header = f"tcpipstat: {len(rows)} rows, index={plan.index}" + (f", {dur:.1f} s" if dur is not None else "")
        render_tables(console, rows, ctx, header)
    render_footer(console if plan.output == "table" else errc, ctx)

    if outcome.returncode not in (0, None) and not outcome.interrupted:
        problem = outcome.problem()
        msg = problem[0] if problem else (outcome.error_lines[0] if outcome.error_lines
                                          else f"staprun exited with status {outcome.returncode}")
        raise TcpipstatError(f"collection ended abnormally: {msg} (the report above holds what was collected)",
                             problem[1] if problem else "")
    if tr and tr.dropped and not outcome.interrupted:
        raise TcpipstatError(f"{tr.dropped} events were lost to full tables (the report above holds "
                             "everything else)",
                             f"raise --max-sockets (now {size})")
    if outcome.bad_lines and not outcome.interrupted:
        raise TcpipstatError(f"{outcome.bad_lines} unreadable lines from the collector (the report above "
                             "holds everything else)", "please report it, with --save-records output")
    return ExitStatus.INTERRUPTED if outcome.interrupted else ExitStatus.OK


def report_capture(plan: Plan, out: IO[str], err: IO[str]) -> int:
    """--read: the report of a capture file (tcpipstat/capture), through the same report layer."""
    from .capture import analyse
    from .capture.fields import CATALOGUE, NAMES
    console, errc = _consoles(plan, out, err)
    cap = analyse(plan.read, plan.filters)
    ctx = ReportContext(NAMES, (), plan.nozeros, cap.notes(), CATALOGUE)
    rows = _top(plan, cap.rows(plan.index), ctx.notes)
    if cap.flows.rejected:
        ctx.notes.append(f"{cap.flows.rejected:,} connections were not accepted by the filters")
    if plan.output == "json":
        write_json(out, rows, ctx)
    elif plan.output == "csv":
        write_csv(out, rows, ctx)
    else:
        dur = cap.duration_s
        header = (f"tcpipstat: {len(rows)} rows, index={plan.index}, {plan.read}: {cap.read.frames:,} packets, "
                  f"{cap.decoded.tcp:,} TCP" + (f", {dur:.1f} s" if dur is not None else ""))
        render_tables(console, rows, ctx, header)
    render_footer(console if plan.output == "table" else errc, ctx)
    if cap.interrupted:
        return ExitStatus.INTERRUPTED
    if cap.read.stopped:
        raise TcpipstatError(f"capture '{plan.read}': {cap.read.stopped}; the report above holds the "
                             f"{cap.read.frames:,} packets read before that")
    return ExitStatus.OK


def check(plan: Plan, out: IO[str]) -> int:
    """--check: print what this host can and cannot do; OK when collection can work."""
    from .check import run_checks
    kver = kernel_release(plan)
    result = run_checks(kver, kver == os.uname().release, plan.groups)
    if plan.output == "json":
        doc = {**result, "checks": [f.as_dict() for f in result["checks"]]}
        out.write(json.dumps(doc, separators=(",", ":")) + "\n")
    else:
        console = Console(file=out, highlight=False, soft_wrap=False)
        console.print(f"[bold]tcpipstat --check[/] for kernel {kver}"
                      + ("" if result["running"] else " (not the running kernel)"))
        mark = {True: "[green]ok[/]", False: "[red]PROBLEM[/]", None: "[yellow]unknown[/]"}
        t = Table(box=None, show_header=False, pad_edge=False)
        t.add_column(no_wrap=True)
        t.add_column(no_wrap=True)
        t.add_column()
        for f in result["checks"]:
            t.add_row(mark[f.ok], f.name, f.detail)
            if f.ok is False:
                t.add_row("", "", f"fix (Debian/Ubuntu): {f.fix_debian}")
                t.add_row("", "", f"fix (Fedora/RHEL): {f.fix_fedora}")
        console.print(t)
        console.print("[green]collection can work here[/]" if result["ready"] else
                      "[red]collection cannot work here until the problems above are fixed[/]")
    return ExitStatus.OK if result["ready"] else ExitStatus.ERROR


def run(argv: list[str], out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        plan = build_plan(argv)
        if plan.dump_script:
            out.write(dump_script(plan))
            return ExitStatus.OK
        if plan.check:
            return check(plan, out)
        if plan.read is not None:
            return report_capture(plan, out, err)
        return collect(plan, out, err)
    except TcpipstatError as e:
        print(f"{PROG}: {e.message}", file=err)
        if e.hint:
            print(f"{PROG}: fix: {e.hint}", file=err)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before collection started; nothing was collected", file=err)
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        return ExitStatus.OK


# Python's cycle collector scans everything it tracks again each time about 70,000 new
# objects have piled up (thresholds 700, 10, 10). A run's records, per-socket totals
# and report rows are such objects (about 700,000 for 100k sockets), none of them in
# a reference cycle: those full passes were about 1.2 s of a 4 s 100k-row report.
# Young collections ten times rarer make full passes rare; cycles are still collected.
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Let the cycle collector run less often (what tcpipstat does as it starts)."""
    gc.set_threshold(*GC_THRESHOLDS)


def main() -> None:
    tune_gc()
    sys.exit(int(run(sys.argv[1:])))
