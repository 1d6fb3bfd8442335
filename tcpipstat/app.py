"""The main path: arguments -> plan -> collector (a Backend) -> records -> model -> Sink.

``run()`` is the one place where errors become exit statuses (errors.ExitStatus).
"""
from __future__ import annotations

import gc
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Iterable

from rich.console import Console
from rich.markup import escape

from . import attribution, reconcile
from .backend import Backend, RunOutcome, choose as choose_backend, dump_script
from .errors import ExitStatus, RecordParseError, TcpipstatError, UsageError, one_line
from .model import Collection, sort_rows
from .outcome import Outcome, ended_by, run_notes
from .plan import Plan, build_plan
from .procs import fill_processes
from .records import Parser, SaveHeader
from .report import ReportContext
from .sinks import make_sink
from .stap import kernel_release

PROG = "tcpipstat"


@dataclass
class _Source:
    """Where a run's records come from: a live collector or a saved file."""
    lines: Iterable[str]
    name: str                                 # names the source in parse errors
    available: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()
    tree: bool = False                        # -c: only the command's process tree
    cong: str = ""                            # how congestion states were seen
    dist: bool = False                        # --dist was on
    estats: bool = False                      # --rfc4898 was on
    backend: Backend | None = None            # None: a saved run
    outcome: RunOutcome = field(default_factory=RunOutcome)
    first_lineno: int = 1                     # (a saved file's header comment is line 1)
    why_unavailable: str = ""                 # the collector's reason ("": stap's)
    snapshots: bool = False                   # the host's counters are expected (reconcile)
    kernel: str = ""                          # the release the collector ran on


def _log(plan: Plan, errc: Console):
    def log(msg: str) -> None:
        if plan.output == "table" or plan.verbose:
            errc.print(f"[dim]{PROG}: {escape(msg)}[/]")       # (msg may hold -c's command)
    return log


def _live(plan: Plan, errc: Console, err: IO[str]) -> _Source:
    """Prepare the collector: probe check and build, before anything runs."""
    backend = choose_backend(plan, lambda line: print(line, file=err))
    prepared = backend.prepare(_log(plan, errc))
    snaps = reconcile.Snapshots(backend.same_host)
    backend.on_end = snaps.end
    # (sockets on another host: that host's cgroups and namespaces name them, as sent)
    lines = backend.lines() if backend.same_host else attribution.sent_places(backend.lines())
    return _Source(snaps.stream(lines), backend.outcome.program, prepared.available,
                   prepared.unavailable, plan.tree, prepared.cong, plan.dist, plan.estats,
                   backend, backend.outcome, why_unavailable=prepared.why_unavailable,
                   snapshots=snaps.local, kernel=prepared.kernel)


def _saved(plan: Plan) -> _Source:
    """A file written by --save-records: its header comment says how the run was made."""
    path = plan.from_records
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read --from-records '{path}': {e.strerror}") from None
    with f:
        first = f.readline()
        lines = list(f)
    head = SaveHeader.read(first)       # None: no header line, the first is a record
    snapshots = any(line.startswith("N\t") for line in lines)
    if head is None:
        return _Source([first, *lines], path, snapshots=snapshots)
    return _Source(lines, path, unavailable=head.unavailable, tree=head.tree, cong=head.cong,
                   dist=head.dist, estats=head.rfc4898, first_lineno=2,
                   why_unavailable=head.why_unavailable, snapshots=snapshots)


def _select(plan: Plan, collection: Collection, tree: bool) -> None:
    """Which sockets are reported: -x PID's, or the -c command's process tree; and, when a
    saved run is replayed, the filters given now (the collector applied its own); then
    --cgroup's and --netns's, which only user space applies."""
    if plan.pid is not None:
        collection.keep, collection.selection = (lambda st, pid=plan.pid: st.pid == pid), "pid"
    elif tree:
        collection.keep, collection.selection = (lambda st: st.in_tree), "tree"
    if plan.from_records and plan.filters:
        by_process, filters = collection.keep, plan.filters
        collection.keep = lambda st: (any(f.matches(*st.tuple) for f in filters)
                                      and (by_process is None or by_process(st)))
    by_place, before = attribution.selector(plan.cgroup, plan.netns), collection.keep
    if by_place is not None:
        collection.keep = lambda st: by_place(st) and (before is None or before(st))


def _hooks(plan: Plan, collection: Collection, sink) -> None:
    """Reports made while collecting: each closing socket, each interval's snapshot."""
    if plan.onclose:
        collection.on_close = lambda st: sink.on_close(st, collection.series.get(st.tuple, ()))
    if plan.interval_s is not None:
        def show(win) -> None:
            rows, hidden = sort_rows(win.rows(plan.index), plan.sort, plan.top)
            sink.on_window(win, rows, hidden, plan.timestamp)
        collection.on_interval = show


def _feed_live(src: _Source, collection: Collection, saved: IO[str] | None) -> None:
    """The collector's lines into the model. One unreadable line must not cost the whole
    run: it is counted, skipped and told (after the report, with a non-zero exit)."""
    parser, outcome = Parser(src.name), src.outcome
    for lineno, line in enumerate(src.lines, 1):
        if saved:
            saved.write(line)
        try:
            rec = parser.parse_line(line, lineno)
        except RecordParseError as e:
            outcome.bad_lines += 1
            outcome.first_bad = outcome.first_bad or e.message
            continue
        if rec is not None:
            collection.add(rec)


def _feed_saved(src: _Source, collection: Collection, ctx: ReportContext) -> None:
    """A saved file's lines into the model: an unreadable line is an error."""
    parser = Parser(src.name)
    for lineno, line in enumerate(src.lines, src.first_lineno):
        rec = parser.parse_line(line, lineno)
        if rec is not None:
            collection.add(rec)
            if rec is collection.header:      # (the counters onclose=1 rows show)
                ctx.available = rec.counters
    if collection.header is None:
        raise UsageError(f"'{src.name}' holds no tcpipstat records (no header line)")
    ctx.available = collection.header.counters


def _collect_into(plan: Plan, src: _Source, collection: Collection, ctx: ReportContext,
                  log) -> None:
    if src.backend is None:
        _feed_saved(src, collection, ctx)
        return
    saved = open(plan.save_records, "w") if plan.save_records else None
    if saved:
        saved.write(SaveHeader(src.kernel, src.unavailable, src.tree, src.cong,
                               src.dist, src.estats, src.why_unavailable).line())
    backend = src.backend
    previous = signal.signal(signal.SIGINT, lambda *_: backend.interrupt())
    try:
        what = f"running {plan.command!r}" if plan.command else (
            f"for {plan.timeout_s:g} s" if plan.timeout_s else "until Ctrl-C")
        log(f"collecting {what}...")
        _feed_live(src, collection, saved)
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved:
            saved.close()
    if backend.same_host:
        fill_processes(collection.sockets.values())


def _write_series(plan: Plan, collection: Collection, outcome: Outcome) -> None:
    """--series / --plot: every sample of the connections the report keeps. What was
    written, and what could not be (told after the report), go into the outcome."""
    from .series import plot, write_series
    series = collection.kept_series()
    if plan.series:
        fmt = "ndjson" if plan.series.lower().endswith((".ndjson", ".json")) else "csv"
        try:
            n = write_series(plan.series, series, fmt)
            outcome.written.append(f"{n:,} samples of {len(series)} connections written to "
                                   f"{plan.series} ({fmt})")
        except OSError as e:
            outcome.unwritten.append(f"cannot write --series '{plan.series}': {e.strerror}")
    if plan.plot:
        try:
            drawn = plot(plan.plot, series)
            outcome.written.append(f"cwnd and srtt of {drawn} connections drawn in {plan.plot}"
                                   + (f" (the {drawn} with most samples of {len(series)})"
                                      if len(series) > drawn else ""))
        except (OSError, TcpipstatError) as e:
            why = e.message if isinstance(e, TcpipstatError) else e.strerror
            outcome.unwritten.append(f"cannot write --plot '{plan.plot}': {why}")


def _outcome(plan: Plan, src: _Source, collection: Collection) -> Outcome:
    """The facts of a finished run (what it counted is the model's)."""
    ro, tr, header = src.outcome, collection.trailer, collection.header
    active_kept = [s for s in collection.sockets.values()
                   if not s.closed and s.has_activity and collection.kept(s)]
    return Outcome(
        cong=src.cong, skipped=ro.skipped, unreadable=ro.bad_lines,
        first_unreadable=ro.first_bad, faults=tr.faults if tr else 0,
        dropped=tr.dropped if tr else 0, pfull=tr.pfull if tr else 0,
        untracked=ro.untracked, untracked_events=ro.untracked_events,
        lost_writes=ro.transport_failures,
        lost_records=collection.lost_records(ro.bad_lines),
        max_sockets=header.max_sockets if header else plan.max_sockets,
        warnings=list(ro.warnings), finished=tr is not None,
        collector="bpftrace" if ro.program == "bpftrace" else "stap",
        ended_by=ended_by(tr.ended) if tr else "",
        no_rfc4898=sum(1 for s in active_kept if s.estats is None) if src.estats else 0,
        still_open=len(active_kept) if plan.onclose else 0,
        outside_tree=collection.outside_tree(),
        duration_s=collection.duration_s, interrupted=ro.interrupted,
        returncode=ro.returncode, available=tuple(src.available),
        unavailable=tuple(src.unavailable))


def _report_rows(plan: Plan, collection: Collection, outcome: Outcome):
    """The rows of the end report; None when the snapshots or the closes were the report."""
    if plan.onclose or plan.interval_s is not None:
        return None
    rows, outcome.hidden = sort_rows(collection.rows(plan.index), plan.sort, plan.top)
    outcome.top, outcome.sort, outcome.rows = plan.top, plan.sort, len(rows)
    return rows


def collect(plan: Plan, out: IO[str], err: IO[str]) -> int:
    console, errc = _consoles(out, err)
    src = _saved(plan) if plan.from_records else _live(plan, errc, err)
    ctx = ReportContext(src.available, src.unavailable, plan.nozeros, us=plan.us,
                        estats=src.estats, dist=src.dist, why_unavailable=src.why_unavailable,
                        index=plan.index, reconciling=src.snapshots)
    sink = make_sink(plan.output, ctx, out, console, errc)
    # (the bpftrace collector's close record is a socket's last; the stap collector may
    # write more of its tuple after it, late segments that the closed socket keeps)
    collection = Collection(forget_closed=(plan.onclose or plan.interval_s is not None)
                            and src.name == "bpftrace" and src.backend is not None)
    _select(plan, collection, src.tree)
    _hooks(plan, collection, sink)
    _collect_into(plan, src, collection, ctx, _log(plan, errc))
    collection.finish()
    outcome = _outcome(plan, src, collection)
    if plan.series or plan.plot:
        _write_series(plan, collection, outcome)
    rows = _report_rows(plan, collection, outcome)
    ctx.notes = run_notes(outcome)
    ctx.reconciliation = reconcile.reconcile(collection.snapshots, collection.totals(),
                                             ctx.available, outcome.skipped)
    dur = collection.duration_s
    sink.on_end(rows, f"tcpipstat: {len(rows or ())} rows, index={plan.index}"
                + (f", {dur:.1f} s" if dur is not None else ""))
    _write_outcome(plan, outcome)
    return _exit_status(src.outcome, outcome)


def _write_outcome(plan: Plan, outcome: Outcome) -> None:
    if plan.outcome_json:
        try:
            outcome.write(plan.outcome_json)
        except OSError as e:
            raise TcpipstatError(f"cannot write --outcome-json '{plan.outcome_json}': "
                                 f"{e.strerror} (the report above is complete)") from None


def _exit_status(ro: RunOutcome, o: Outcome) -> int:
    """After the report: what went wrong, as an error (exit 1), or the run's status. The
    collector's own failure comes first: a file not written is the lesser news."""
    if ro.returncode not in (0, None) and not ro.interrupted:
        problem = ro.problem
        msg = problem[0] if problem else (ro.error_lines[0] if ro.error_lines
                                          else f"{ro.program} exited with status {ro.returncode}")
        raise TcpipstatError(f"collection ended abnormally: {msg} (the report above holds what "
                             "was collected)", problem[1] if problem else "")
    if o.dropped and not ro.interrupted:
        raise TcpipstatError(f"{o.dropped} events were lost to full tables (the report above "
                             "holds everything else)", f"raise --max-sockets (now {o.max_sockets})")
    if (o.untracked or o.untracked_events) and not ro.interrupted:
        raise TcpipstatError(f"{o.untracked} sockets and {o.untracked_events} more events "
                             "were lost to full tables (the report above holds everything "
                             "else)", f"raise --max-sockets (now {o.max_sockets})")
    if o.lost_writes and not ro.interrupted:
        raise TcpipstatError(f"stap's transport lost {o.lost_writes} of the module's writes "
                             "(the report above holds the rest; its counts may be low)",
                             "run again (SystemTap before 5.1 drops a write that finds its relay "
                             "sub-buffer all but full; 5.1 does not)")
    if o.unreadable and not ro.interrupted:
        raise TcpipstatError(f"{o.unreadable} unreadable lines from the collector (the report "
                             "above holds everything else)",
                             "please report it, with --save-records output")
    if o.lost_records and not ro.interrupted:
        raise TcpipstatError(f"{o.lost_records} socket records the collector wrote did not "
                             "arrive (the report above holds the rest; its counts may be low)",
                             "run again; if it recurs, please report it, with --save-records "
                             "output")
    if o.unwritten:
        raise TcpipstatError(f"{o.unwritten[0]} (the report above is complete)")
    return ExitStatus.INTERRUPTED if ro.interrupted else ExitStatus.OK


def _consoles(out: IO[str], err: IO[str]) -> tuple[Console, Console]:
    console = Console(file=out, highlight=False, soft_wrap=False)
    errc = Console(file=err, highlight=False, stderr=True)
    return console, errc


@contextmanager
def _capture_progress(errc: Console):
    """On a terminal, a long read shows the packets read and their rate (cleared at the
    end); elsewhere nothing is drawn."""
    if not errc.is_terminal:
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    start = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("reading: {task.completed:,} packets, "
                                              "{task.fields[rate]:,.0f} packets/s"),
                  TimeElapsedColumn(), console=errc, transient=True) as bar:
        task = bar.add_task("read", total=None, rate=0.0)
        yield lambda packets: bar.update(
            task, completed=packets, rate=packets / max(time.monotonic() - start, 1e-3))


def report_capture(plan: Plan, out: IO[str], err: IO[str]) -> int:
    """--read: the report of a capture file (tcpipstat/capture), through the same sinks."""
    from .capture import analyse
    from .capture.fields import CATALOGUE, NAMES
    console, errc = _consoles(out, err)
    with _capture_progress(errc) as progress:
        cap = analyse(plan.read, plan.filters, progress)
    if cap.reader_note:                 # (asked for with TCPIPSTAT_READER)
        print(f"{PROG}: {cap.reader_note}", file=err)
    rows, hidden = sort_rows(cap.rows(plan.index), plan.sort, plan.top)
    dur = cap.duration_s
    outcome = Outcome(capture=cap.notes(), hidden=hidden, top=plan.top, sort=plan.sort,
                      rejected=cap.flows.rejected, rows=len(rows), duration_s=dur,
                      interrupted=cap.interrupted, available=NAMES)
    ctx = ReportContext(NAMES, (), plan.nozeros, run_notes(outcome), CATALOGUE)
    title = (f"tcpipstat: {len(rows)} rows, index={plan.index}, {plan.read}: "
             f"{cap.read.frames:,} packets, {cap.decoded.tcp:,} TCP"
             + (f", {dur:.1f} s" if dur is not None else ""))
    make_sink(plan.output, ctx, out, console, errc).on_end(rows, title)
    _write_outcome(plan, outcome)
    if cap.interrupted:
        return ExitStatus.INTERRUPTED
    if cap.read.stopped:
        raise TcpipstatError(f"capture '{plan.read}': {cap.read.stopped}; the report above "
                             f"holds the {cap.read.frames:,} packets read before that")
    return ExitStatus.OK


def run(argv: list[str], out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        plan = build_plan(argv)
        if plan.dump_script:
            out.write(dump_script(plan))
            return ExitStatus.OK
        if plan.check:
            from .check import report
            return report(kernel_release(plan), plan.groups, plan.output == "json", out)
        if plan.read is not None:
            return report_capture(plan, out, err)
        if plan.serve is not None:
            from .exporter import serve
            return serve(plan, out, err)
        return collect(plan, out, err)
    except TcpipstatError as e:
        print(f"{PROG}: {one_line(e.message)}", file=err)
        if e.hint:
            print(f"{PROG}: fix: {one_line(e.hint)}", file=err)
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
