"""--serve: tcpipstat as a Prometheus exporter.

The collector runs in interval mode (--serve-interval): each window's per-index-key deltas
reach :class:`Exporter` (a Sink) through ``on_window``, which adds them to cumulative
counters per label set; prometheus_client serves them on /metrics (Prometheus text or
OpenMetrics, as the scraper asks) through :meth:`Exporter.collect`. Every socket record
belongs to exactly one window, closing sockets' last counts included, so each count is
added once; ``on_close`` (whole-life totals) is not used.

A serving run makes no report at the end, so the exporter also lets the model forget what
it keeps for one: closed sockets (their counts are in their label set's totals now) and
old interval marks. Its own memory is bounded by the budget (--max-series) and the
sockets still open.
"""
from __future__ import annotations

import math
import re
import signal
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import IO, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .app import PROG, _collect_into, _consoles, _hooks, _live, _log, _select
from .counters import COUNTERS
from .errors import ExitStatus, TcpipstatError, UsageError, one_line
from .indexes import AF_INET6, BY_NAME, FIELD_VALUE, GroupKey
from .model import Collection, Row, Window, sort_value
from .plan import Plan
from .report import ReportContext
from .sinks import Sink

OTHER = "other"          # every label of the series that folded label sets go into
# With process labels (index=pid, comm; -x), a closed socket's process is remembered this
# long: segments after the close (TIME-WAIT lasts 60 s) arrive from softirq, without a
# process, and must count for the socket's process as in a report.
PROCESS_GRACE_S = 120
# --serve-restarts: how long a collector that ended waits to be started again, and the span
# in which at most N restarts are made (a collector failing again at once is given up)
RESTART_DELAY_S = 1.0
RESTART_SPAN_S = 600.0
_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z]{2,})")
# The collector's health counters (name, help), in Exporter._own_health's order: each is a
# loss that a report tells in its notes; the exporter has no notes, only these.
# The collector tells all but unreadable lines as it ends; a restarted collector's add to
# those of the collectors before it.
_HEALTH = (
    ("skipped_probe_hits", "probe hits the collector skipped (told as it ends)"),
    ("lost_events", "events lost to full collector tables (told as it ends)"),
    ("lost_records", "socket records the collector wrote that did not arrive (told as it "
     "ends)"),
    ("lost_writes", "collector writes stap's transport lost (SystemTap before 5.1; told as it "
     "ends)"),
    ("unreadable_lines", "collector lines that were not records"))


def metric_name(counter: str) -> str:
    """A counter's metric name without its type suffix: RecvBytes -> tcpipstat_recv_bytes,
    DelayedACKs -> tcpipstat_delayed_acks, TCPMemoryPressures -> tcpipstat_tcp_memory_pressures."""
    return f"{PROG}_" + _WORD.sub("_", counter).lower()


def _busiest_first(rows: list[Row]) -> list[Row]:
    """Bytes sent and received in the window, then segments; ties in key order (the order
    the model hands rows in, which a stable sort keeps)."""
    return sorted(rows, key=lambda r: (-sort_value(r, "bytes"), -sort_value(r, "segs")))


class Exporter(Sink):
    """Cumulative counters per label set, under the --max-series budget, and the run's
    health; a prometheus_client collector (:meth:`collect`) for the HTTP thread."""

    def __init__(self, plan: Plan):     # (no Sink.__init__: nothing is printed)
        self.index = BY_NAME[plan.index]
        self.max_series = plan.max_series
        attributed = self.index.needs_process or plan.pid is not None
        self._grace = math.ceil(PROCESS_GRACE_S / plan.interval_s) if attributed else 0
        self._lock = threading.Lock()     # scrapes read what windows write
        self._series: dict[GroupKey, dict[str, int]] = {}
        self._other: dict[str, int] | None = None
        self._other_labels = [OTHER] * len(self.index.fields)
        self._folded: set[GroupKey] = set()   # label sets in other that still have sockets
        self.folded = 0
        self.windows = 0
        self._closed: dict = {}               # closed socket tuple -> window it was last seen
        self.available: tuple[str, ...] = ()
        self.up = False
        self.failed = False
        self._collection: Collection | None = None
        self._outcome = None
        self.restarts = 0
        self._first_window = 1      # the windows count once the collector's first is added
        self._past = [0] * len(_HEALTH)     # health counts of the collectors before

    def start(self, available: tuple[str, ...], collection: Collection, outcome) -> None:
        """A collector runs: its counters, the model it feeds, how its run goes. A restarted
        collector's health counts add to those of the collectors before it."""
        with self._lock:
            if self._outcome is not None:
                self._past = [a + b for a, b in zip(self._past, self._own_health())]
                self.restarts += 1
            self.available, self._collection, self._outcome = available, collection, outcome
            self.up, self._first_window = True, self.windows + 1

    def ended(self, failed: bool) -> None:
        with self._lock:
            self.up, self.failed = False, failed

    def labels(self, key: GroupKey) -> list[str]:
        return [str(FIELD_VALUE[f](key)) for f in self.index.fields]

    def on_window(self, win: Window, rows: list[Row], hidden: int, timestamp: bool) -> None:
        with self._lock:
            self._admit(rows)
            for row in rows:
                totals = self._series.get(row.key)
                if totals is None:
                    totals = self._other = {} if self._other is None else self._other
                for k, v in row.counters.items():
                    totals[k] = totals.get(k, 0) + v
            self.windows += 1
        self._forget(win.collection, win)

    def _admit(self, rows: list[Row]) -> None:
        """New label sets get series of their own while the budget lasts, busiest first;
        the others fold into other, each counted once while it has sockets."""
        for row in _busiest_first([r for r in rows if r.key not in self._series]):
            # (a label set whose values are all "other", a command named other, is other's)
            if len(self._series) < self.max_series and self.labels(row.key) != self._other_labels:
                self._series[row.key] = {}
            elif row.key not in self._folded:
                self._folded.add(row.key)
                self.folded += 1

    def _forget(self, collection: Collection, win: Window) -> None:
        """Let the model drop closed sockets (after the grace, with process labels) and old
        marks; forget folded label sets none of whose sockets is left."""
        sockets = collection.sockets
        for t in win.sockets:
            whole = sockets.get(t)
            if whole is not None and whole.closed:
                self._closed[t] = self.windows
        for t in [t for t, seen in self._closed.items() if self.windows - seen >= self._grace]:
            del self._closed[t]
            sockets.pop(t, None)
        del collection.marks[:-1]       # (only the last is read: where the next window starts)
        if self._folded:
            key_of = self.index.of_socket
            self._folded &= {key_of(st) for st in sockets.values()}

    def collect(self) -> Iterator:
        """The metrics of one scrape (prometheus_client's Collector protocol)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        with self._lock:
            series = [(self.labels(k), dict(c), k.family == AF_INET6)
                      for k, c in self._series.items()]
            if self._other is not None:
                series.append((self._other_labels, dict(self._other), False))
            health = self._health(GaugeMetricFamily, CounterMetricFamily)
            available = set(self.available)
        yield from health
        for c in COUNTERS:
            if c.name not in available:
                continue
            family = GaugeMetricFamily if c.gauge else CounterMetricFamily
            metric = family(metric_name(c.name), f"{c.name}: {c.description}",
                            labels=self.index.fields)
            for labels, totals, v6 in series:
                if not (v6 and c.ipv4_only):          # (n/a for IPv6 sockets: absent)
                    metric.add_metric(labels, totals.get(c.name, 0))
            yield metric

    def _own_health(self) -> list[int]:
        """The current collector's counts of _HEALTH, in its order."""
        ro, col = self._outcome, self._collection
        if ro is None or col is None:
            return [0] * len(_HEALTH)
        tr = col.trailer
        return [ro.skipped, tr.dropped if tr else 0, col.lost_records(ro.bad_lines),
                ro.transport_failures, ro.bad_lines]

    def _health(self, gauge, counter) -> list:
        """The exporter's and the collector's state (called with the lock held)."""
        counts = [a + b for a, b in zip(self._past, self._own_health())]
        # (up from the collector's first window, which comes --serve-interval after every
        # probe was attached. bpftrace 0.17 runs BEGIN before it attaches the others, but
        # reads BEGIN's output, the header, only once all are attached (BPFtrace::run); up
        # on the header once lost one of three connections made right after a restart in
        # the native test, for a reason not found: the first window is the safer sign.)
        up = self.up and self.windows >= self._first_window
        return [kind(f"{PROG}_{name}", text, value=value) for kind, name, text, value in (
                (gauge, "up", "1 while the collector runs", int(up)),
                (gauge, "collector_failed", "1 once the collector has ended without being "
                 "asked to and is not restarted (tcpipstat then exits 1 when stopped)",
                 int(self.failed)),
                (counter, "collector_restarts", "collectors started again after the one before "
                 "ended by itself (--serve-restarts)", self.restarts),
                (counter, "windows", "windows of --serve-interval added", self.windows),
                (gauge, "label_sets", "label sets with series of their own", len(self._series)),
                (gauge, "max_series", "--max-series: the label sets that may have series of "
                 "their own", self.max_series),
                (counter, "folded_label_sets", "label sets folded into the other series (one "
                 "that returns after all its sockets closed counts again)", self.folded))] + [
                counter(f"{PROG}_{name}", text, value=value)
                for (name, text), value in zip(_HEALTH, counts)]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True            # (a scrape in progress does not hold up the exit)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:     # (not a line on stderr per scrape)
        pass


def _listen(plan: Plan, registry) -> _Server:
    """The HTTP server of /metrics (prometheus_client's WSGI application, which chooses
    the format from the scraper's Accept header), listening before anything is collected."""
    from prometheus_client import make_wsgi_app
    addr, port = plan.serve
    server = _Server6 if ":" in addr else _Server
    try:
        httpd = make_server(addr, port, make_wsgi_app(registry), server, handler_class=_Quiet)
    except OSError as e:
        where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        raise UsageError(f"cannot serve on '{where}': {e.strerror or e}") from None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _url(httpd) -> str:
    host, port = httpd.server_address[:2]
    if httpd.address_family == socket.AF_INET6:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def _stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the event (while a collector runs, _run_collector's handlers
    also ask it to finish)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def _why_ended(ro) -> tuple[str, str]:
    """What the collector's end says of itself, and the fix when known."""
    if ro.problem:
        return ro.problem
    if ro.error_lines:
        return ro.error_lines[0], ""
    return f"{ro.program} exited with status {ro.returncode}", ""


class _Restarts:
    """--serve-restarts N: at most N restarts in any RESTART_SPAN_S seconds."""

    def __init__(self, most: int):
        self.most, self.times = most, []

    def allowed(self) -> bool:
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < RESTART_SPAN_S]
        if len(self.times) >= self.most:
            return False
        self.times.append(now)
        return True


def _run_collector(plan: Plan, exporter: Exporter, src, stop: threading.Event,
                   log) -> tuple[str, str] | None:
    """One collector, until it ends: None when tcpipstat was stopped, else why it ended
    (and the fix when known)."""
    collection = Collection()
    _select(plan, collection, src.tree)
    _hooks(plan, collection, exporter)
    backend = src.backend
    # (SIGINT: _collect_into's; a signal before that sets stop, which is read first)
    signal.signal(signal.SIGTERM, lambda *_: (stop.set(), backend.interrupt()))
    if stop.is_set():
        return None
    exporter.start(src.available, collection, src.outcome)
    _collect_into(plan, src, collection, ReportContext(src.available), log)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    collection.finish()
    exporter.ended(failed=False)
    if src.outcome.interrupted or stop.is_set():
        return None
    return _why_ended(src.outcome)


def _next_collector(plan: Plan, restarts: _Restarts, why: tuple[str, str], stop, errc, err):
    """After a collector ended by itself: (a collector prepared again, None), or (None,
    None) when tcpipstat was stopped meanwhile, or (None, why) when --serve-restarts is
    used up. A collector that cannot be prepared again counts as one more that ended."""
    while restarts.allowed():
        print(f"{PROG}: the collector ended while serving: {one_line(why[0])}; restarting it "
              f"(at most {restarts.most} times in {RESTART_SPAN_S / 60:g} minutes)",
              file=err, flush=True)
        if stop.wait(RESTART_DELAY_S):
            return None, None
        try:
            src = _live(plan, errc, err)
        except TcpipstatError as e:
            why = f"it could not be started again: {e.message}", e.hint
            continue
        return (None, None) if stop.is_set() else (src, None)
    return None, why


def _give_up(exporter: Exporter, httpd, why: tuple[str, str], stop, err: IO[str]) -> int:
    """Serve tcpipstat_up 0 and the last totals until stopped; exit 1."""
    exporter.ended(failed=True)
    what, fix = why
    print(f"{PROG}: the collector ended while serving: {one_line(what)}; {_url(httpd)} serves "
          f"{PROG}_up 0 and the last totals until {PROG} is stopped", file=err)
    if fix:
        print(f"{PROG}: fix: {one_line(fix)}", file=err)
    err.flush()
    while not stop.wait(1.0):
        pass
    return ExitStatus.ERROR


def _collect(plan: Plan, exporter: Exporter, httpd, out: IO[str], err: IO[str]) -> int:
    """Collect until stopped (exit 0); a collector that ends by itself is restarted as
    --serve-restarts allows, and once it does not: serve tcpipstat_up 0 and the last totals
    until stopped, and exit 1."""
    console, errc = _consoles(out, err)
    log = _log(plan, errc)
    src = _live(plan, errc, err)
    # (once the collector is ready: a backend's refusal stays the one line of a refused run)
    print(f"{PROG}: serving {_url(httpd)}", file=err, flush=True)   # (PORT 0: the one taken)
    stop, restarts = _stop_on_signals(), _Restarts(plan.serve_restarts)
    while True:
        why = _run_collector(plan, exporter, src, stop, log)
        if why is None:
            return ExitStatus.OK
        src, why = _next_collector(plan, restarts, why, stop, errc, err)
        if src is None:
            return ExitStatus.OK if why is None else _give_up(exporter, httpd, why, stop, err)


def serve(plan: Plan, out: IO[str], err: IO[str]) -> int:
    """--serve: listen first (a port in use is refused before anything runs), then collect.
    SIGTERM or SIGINT ends a serving run cleanly: exit 0."""
    from prometheus_client import CollectorRegistry, ProcessCollector
    exporter = Exporter(plan)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    ProcessCollector(registry=registry)    # (its own memory and CPU, for the scraper to watch)
    httpd = _listen(plan, registry)
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _collect(plan, exporter, httpd, out, err)
    except KeyboardInterrupt:
        print(f"{PROG}: stopped before collection started", file=err)
        return ExitStatus.OK
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        httpd.shutdown()
        httpd.server_close()
