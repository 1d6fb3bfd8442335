"""Arguments -> a validated Plan. Everything is checked here, before any stap runs."""
from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import re
from dataclasses import dataclass

from . import attribution
from .cli import OPTIONS, parse_args, word_list
from .counters import COUNTERS, DEFAULT_GROUPS, GROUPS
from .errors import UsageError
from .filters import Filter, parse_filters
from .indexes import BY_NAME, NAMES, OFFLINE_NAMES
from .model import SORT_SUMS

BACKENDS = ("auto", "stap", "bpftrace")
MAX_TIMEOUT_S = 10 * 365 * 24 * 3600
PID_MAX_LIMIT = 4 * 1024 * 1024   # include/linux/threads.h: pids never exceed this
# --serve: [ADDR:]PORT, an IPv6 ADDR in brackets (an unbracketed one has colons of its own)
_SERVE = re.compile(r"(?:(?P<addr>\[[^\]]*\]|[^:\[\]]*):)?(?P<port>[0-9]{1,5})")
SERVE_INTERVAL_S = 5.0
MAX_SERIES = 1000
SERVE_RESTARTS = 3      # --serve: a collector that ends by itself is restarted this often
# what --serve cannot do: a report of any kind, an end, or measurements that are not counters
_NOT_WITH_SERVE = ("output", "sort", "top", "timestamp", "count", "interval", "onclose",
                   "command", "timeout", "dist", "estats", "sample", "series", "plot",
                   "on_cwnd_change", "from_records", "outcome_json", "dump_script")
_KVER = re.compile(r"[A-Za-z0-9._+~][A-Za-z0-9._+~-]{0,99}")     # (fullmatch; not an option)
# stap options a user may pass through: none of them adds code to the script.
_STAP_ARG_OK = (
    # a define of a number, C integer suffix allowed
    re.compile(r"^-D[A-Za-z_][A-Za-z0-9_]{0,63}(=-?[0-9]{1,19}(LL|ULL|L|UL|U)?)?$"),
    re.compile(r"^-s[0-9]{1,4}$"),
    re.compile(r"^-[twuk]$"),
    re.compile(r"^--suppress-time-limits$"),
)


@dataclass(frozen=True)
class Plan:
    filters: tuple[Filter, ...] = ()
    index: str = "tuple"
    timeout_s: float | None = None
    nozeros: bool = True
    onclose: bool = False
    command: str | None = None
    output: str = "table"
    groups: tuple[str, ...] = DEFAULT_GROUPS
    dist: bool = False               # --dist: congestion-state episode histograms
    us: bool = False                 # -u/--us: congestion times in µs in tables
    estats: bool = False             # --rfc4898: RFC 4898 variables of each socket at close
    sample_ms: float | None = None   # --sample: sampling period (0: every ACK); None: no sampling
    on_cwnd_change: bool = False     # --on-cwnd-change
    series: str | None = None        # --series FILE (CSV or NDJSON)
    plot: str | None = None          # --plot FILE.png
    max_sockets: int = 8192
    kernel_release: str | None = None
    overload_guard: bool = True
    tracepoints: bool = True         # False: --kprobes-only
    stap_args: tuple[str, ...] = ()
    dump_script: bool = False
    save_records: str | None = None
    from_records: str | None = None
    verbose: int = 0
    interval_s: float | None = None
    count: int | None = None
    timestamp: bool = False
    sort: str | None = None
    top: int | None = None
    pid: int | None = None           # -x: only this process's sockets
    cgroup: str | None = None        # --cgroup: only the sockets of this cgroup (path) and below
    netns: int | None = None         # --netns: only the sockets of this namespace (inode)
    tree: bool = False               # -c without --all-processes: only the command's tree
    check: bool = False
    read: str | None = None          # --read: report from this capture file
    outcome_json: str | None = None  # --outcome-json FILE: how the run ended, as JSON
    backend: str = "auto"            # --backend: auto, stap or bpftrace
    serve: tuple[str, int] | None = None   # --serve: (address, port) of /metrics
    max_series: int = MAX_SERIES     # --max-series: label sets with series of their own
    serve_restarts: int = SERVE_RESTARTS   # --serve-restarts: restarts in any 10 minutes

    @property
    def places(self) -> bool:
        """Where sockets belong (each socket's cgroup, its namespace) is asked of this run."""
        return asks_places(self.index, self.cgroup, self.netns)

    @property
    def places_kept(self) -> bool:
        """Where sockets belong is asked, or may be of its records (--save-records: a replay
        may take an attribution index). The bpftrace collector reads places then: its reads
        cost its compile, once. The stap collector reads them only when asked (``places``):
        its reads run in its per-call probes."""
        return self.places or self.save_records is not None

    def compile_flags(self) -> list[str]:
        """stap options that change the module (so they are part of its cache key)."""
        flags = ["-DMAXSKIPPED=1000000000",  # report skipped probes, never abort on them
                 # writing out the table is one probe: up to --max-sockets tuples x ~40
                 # statements (stap's default budget, 1000, stops it at a few dozen)
                 f"-DMAXACTION={max(100_000, 64 * self.max_sockets)}",
                 # a whole record is built as one string (--dist: up to 5 x ~30 buckets more)
                 f"-DMAXSTRINGLEN={4096 if self.dist else 2048 if self.estats else 1024}"]
        if not self.overload_guard:
            flags.append("-DSTP_NO_OVERLOAD")
        if "-t" in self.stap_args:
            # stap 5.x leaves the -t report out of a module compiled with its stdout not a
            # terminal (STP_STDOUT_NOT_ATTY), as tcpipstat always compiles; this keeps it
            flags.append("-DSTP_FORCE_STDOUT_TTY")
        return flags + list(self.stap_args)


def _ascii_number(kind, text: str):
    """float() or int() of ASCII text only: Python also reads other scripts' digits
    (timeout=\u0663 would be 3 s), which no one means on a command line."""
    if not text.isascii():
        raise ValueError(text)
    return kind(text)


def _seconds(value, what: str = "timeout") -> float | None:
    if value is None:
        return None
    text = str(value)
    try:
        t = _ascii_number(float, text)
    except ValueError:
        raise UsageError(f"bad {what} '{text}': expected a number of seconds") from None
    if not math.isfinite(t) or t <= 0 or t > MAX_TIMEOUT_S:
        raise UsageError(f"bad {what} '{text}': expected a number of seconds > 0")
    if t < 0.1:
        raise UsageError(f"bad {what} '{text}': expected at least 0.1 s (closed sockets are "
                         "handed over every 0.1 s)")
    return t


def _count(value, what: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    text = str(value)
    if not re.fullmatch(r"[0-9]{1,10}", text) or not lo <= int(text) <= hi:
        raise UsageError(f"bad {what} '{text}': expected a whole number from {lo} to {hi}")
    return int(text)


def _sort_key(value: str | None, counters=COUNTERS) -> str | None:
    if value is None:
        return None
    names = {c.name.lower(): c.name for c in counters}
    names.update({k: k for k in SORT_SUMS})
    key = names.get(value.lower())
    if key is None:
        raise UsageError(f"bad --sort '{value}': expected a counter name (e.g. RetransSegs) "
                         f"or one of {', '.join(SORT_SUMS)}")
    return key


def _capture_fields():
    from .capture.fields import FIELDS
    return FIELDS


def _check_read(ns) -> None:
    """--read reports a capture file: what needs the live collector cannot go with it."""
    if not ns.read:
        raise UsageError("--read needs a capture file name")
    live_only = [o.name for o in OPTIONS if o.live_only and o.given(ns)]
    if live_only:
        raise UsageError("--read reports a capture file: it cannot be combined with "
                         f"{live_only[0]} (that needs the live collector)")
    if not BY_NAME[ns.index].offline:
        raise UsageError(f"index={ns.index} is not available with --read: a capture does not say "
                         "which process, cgroup or namespace a connection belonged to (use "
                         f"index={word_list(OFFLINE_NAMES)})")


def _groups(ns) -> tuple[str, ...]:
    """The counter groups to collect, in the catalogue's order."""
    groups = tuple(g for g in ns.groups.split(",") if g)
    if ns.cong or ns.dist:
        groups += ("cong",)
    for g in groups:
        if g not in GROUPS:
            raise UsageError(f"bad group '{g}': expected some of {', '.join(GROUPS)}")
    if not groups:
        raise UsageError("no counter group selected")
    return tuple(g for g in GROUPS if g in groups)


def _max_sockets(ns) -> int:
    try:
        max_sockets = _ascii_number(int, str(ns.max_sockets))
    except ValueError:
        raise UsageError(f"bad --max-sockets '{ns.max_sockets}': expected a number") from None
    if not 64 <= max_sockets <= 1 << 20:
        raise UsageError(f"bad --max-sockets '{ns.max_sockets}': expected 64 to {1 << 20}")
    return max_sockets


def _stap_args(ns) -> tuple[str, ...]:
    """The --stap-arg options, which go to stap as written (and -r's kernel release)."""
    if ns.kernel_release is not None and not _KVER.fullmatch(ns.kernel_release):
        raise UsageError(f"bad kernel release '{ns.kernel_release}'")
    stap_args = tuple(ns.stap_args or ())
    for a in stap_args:
        if not any(r.fullmatch(a) for r in _STAP_ARG_OK):
            raise UsageError(f"--stap-arg '{a}' is not allowed (allowed: -DNAME=NUMBER, -sNUM, "
                             "-t, -w, -u, -k, --suppress-time-limits)")
    return stap_args


def _check_sources(ns) -> None:
    """-c runs a command; --from-records replays a saved run instead."""
    if ns.command is not None and not ns.command.strip():
        raise UsageError("empty -c command")
    if ns.from_records and (ns.command or ns.save_records):
        raise UsageError("--from-records reports a saved run: it cannot be combined with -c or "
                         "--save-records")
    unused = [w for w, on in (("--from-records", ns.from_records), ("--save-records",
                              ns.save_records), ("--outcome-json", ns.outcome_json)) if on]
    if ns.dump_script and unused:
        raise UsageError(f"--dump-script prints the collector's script and runs nothing: it "
                         f"cannot be combined with {unused[0]}")


def _snapshots(ns) -> tuple[float | None, int | None]:
    """--interval and --count."""
    interval = _seconds(ns.interval, "interval")
    count = _count(ns.count, "--count", 1, 10 ** 9)
    if count is not None and interval is None:
        raise UsageError("--count needs --interval (the number of snapshots to print)")
    if ns.timestamp and interval is None:
        raise UsageError("-T/--timestamp needs --interval (it stamps each snapshot)")
    if interval is not None and ns.onclose:
        raise UsageError("interval and onclose cannot be combined: choose snapshots or one report "
                         "per socket")
    if interval is not None and ns.from_records:
        raise UsageError("--interval cannot replay --from-records (save the run with --interval "
                         "instead: its snapshots are in the records)")
    return interval, count


def _serve_address(text: str) -> tuple[str, int]:
    """--serve's [ADDR:]PORT: an IP address (no name: nothing is looked up), a port."""
    m = _SERVE.fullmatch(text) if text.isascii() else None
    try:
        if m is None or int(m["port"]) > 65535:
            raise ValueError(text)
        addr = m["addr"] or "0.0.0.0"
        if addr.startswith("["):
            addr = str(ipaddress.IPv6Address(addr[1:-1]))
        else:
            ipaddress.IPv4Address(addr)
    except ValueError:
        raise UsageError(f"bad --serve '{text}': expected [ADDR:]PORT, ADDR an IP address (IPv6 "
                         "in brackets), PORT 0 to 65535") from None
    return addr, int(m["port"])


def _serving(ns) -> tuple[tuple[str, int] | None, float | None, int, int]:
    """--serve, its windows (--serve-interval), its budget (--max-series) and its restarts
    (--serve-restarts)."""
    if ns.serve is None:
        stray = [o.name for o in OPTIONS if o.dest in (
                 "serve_interval", "max_series", "serve_restarts") and o.given(ns)]
        if stray:
            raise UsageError(f"{stray[0]} needs --serve")
        return None, None, MAX_SERIES, SERVE_RESTARTS
    # (--json and --csv share a dest: a switch is given when its own value is set)
    refused = [o.name for o in OPTIONS if o.dest in _NOT_WITH_SERVE and o.given(ns)
               and (o.const is None or getattr(ns, o.dest) == o.const)]
    if refused:
        raise UsageError("--serve runs until it is stopped and answers only on /metrics: it "
                         f"cannot be combined with {refused[0]}")
    where = _serve_address(ns.serve)
    interval = _seconds(ns.serve_interval or SERVE_INTERVAL_S, "--serve-interval")
    max_series = _count(ns.max_series, "--max-series", 1, 10 ** 6)
    restarts = _count(ns.serve_restarts, "--serve-restarts", 0, 100)
    if ns.index == "tuple" and max_series is None:
        others = ", ".join(n for n in NAMES if n != "tuple")
        raise UsageError("index=tuple with --serve makes a series per socket: give --max-series N, "
                         f"or choose another index ({others})")
    if importlib.util.find_spec("prometheus_client") is None:
        raise UsageError("--serve needs prometheus_client: pip install 'tcpipstat[serve]' (or "
                         "apt-get install python3-prometheus-client)")
    return (where, interval, MAX_SERIES if max_series is None else max_series,
            SERVE_RESTARTS if restarts is None else restarts)


def _processes(ns, groups: tuple[str, ...]) -> tuple[int | None, bool]:
    """-x PID, and whether only the -c command's process tree is reported."""
    pid = _count(ns.pid, "pid", 1, PID_MAX_LIMIT)
    if pid is not None and ns.all_processes:
        raise UsageError("-x/--pid and --all-processes contradict each other")
    if ns.all_processes and not ns.command:
        raise UsageError("--all-processes only makes sense with -c CMD")
    tree = bool(ns.command) and pid is None and not ns.all_processes
    needs_proc = [w for w, on in ((f"index={ns.index}", BY_NAME[ns.index].needs_process),
                                  ("-x/--pid", pid is not None),
                                  ("-c (its process tree)", tree)) if on]
    if needs_proc and "socket" not in groups:
        raise UsageError(f"{needs_proc[0]} needs the socket group (its probes tell which process "
                         "uses a socket): add socket to --groups"
                         + (", or use --all-processes" if tree else ""))
    return pid, tree


def asks_places(index: str, cgroup, netns) -> bool:
    """Does a run ask where its sockets belong: an attribution index, --cgroup or --netns?"""
    return BY_NAME[index].place or cgroup is not None or netns is not None


def _places(ns) -> tuple[str | None, int | None]:
    """--cgroup and --netns, checked against this host now. A replayed run collected on
    another host carries that host's tables: they name its places, and check these."""
    needed = asks_places(ns.index, ns.cgroup, ns.netns)
    sent = bool(ns.from_records) and needed and attribution.saved_places(ns.from_records)
    cgroup = None if ns.cgroup is None else attribution.check_cgroup(ns.cgroup)
    netns = None if ns.netns is None else attribution.check_netns(ns.netns, PID_MAX_LIMIT,
                                                                  here=not sent)
    return cgroup, netns


def _check_check(ns) -> None:
    """--check diagnoses the host: what would collect or report cannot go with it."""
    refused = [o.name for o in OPTIONS if o.not_with_check and o.given(ns)]
    if ns.filters:
        refused.append("FILTER")
    if refused:
        raise UsageError("--check diagnoses the host and collects nothing: it cannot be combined "
                         f"with {refused[0]}")


def _sample_ms(ns) -> float | None:
    """--sample's period; --series, --plot and --on-cwnd-change sample too (100 ms)."""
    if ns.sample is None and not (ns.series or ns.plot or ns.on_cwnd_change):
        return None
    text = "100" if ns.sample is None else str(ns.sample)
    try:
        sample_ms = _ascii_number(float, text)
    except ValueError:
        raise UsageError(f"bad --sample '{text}': expected milliseconds (0: every ACK)") from None
    if not 0 <= sample_ms <= 3_600_000 or sample_ms != sample_ms:
        raise UsageError(f"bad --sample '{text}': expected 0 to 3600000 milliseconds")
    return sample_ms


def _check_output_files(ns) -> None:
    """Files written after collecting must be writable before anything runs: a run is
    not to be lost to a typo in a file name."""
    if ns.plot and not ns.plot.lower().endswith(".png"):
        raise UsageError(f"bad --plot '{ns.plot}': expected a FILE.png")
    if ns.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'tcpipstat[plot]' (or apt-get "
                         "install python3-matplotlib)")
    for what, path in (("--series", ns.series), ("--plot", ns.plot),
                       ("--save-records", ns.save_records), ("--outcome-json", ns.outcome_json)):
        if path is None:
            continue
        if not path.strip():
            raise UsageError(f"empty {what} file name")
        why = _unwritable(path)
        if why:
            raise UsageError(f"cannot write {what} '{path}': {why}")


def _unwritable(path: str) -> str:
    """Why ``path`` cannot be written ("" if it can), without creating it."""
    if os.path.isdir(path):
        return "it is a directory"
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"no folder '{folder}'"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                      and not os.access(path, os.W_OK)):
        return "permission denied"
    return ""


def _order(ns) -> tuple[str | None, int | None]:
    """--sort and --top (which sorts by bytes unless told)."""
    sort = _sort_key(ns.sort, _capture_fields() if ns.read is not None else COUNTERS)
    top = _count(ns.top, "--top", 1, 10 ** 9)
    if top is not None and sort is None:
        sort = "bytes"
    return sort, top


def build_plan(argv: list[str]) -> Plan:
    for arg in argv:    # (no exec'd argv holds one; a caller's list can, and no path or
        if "\0" in arg:  # command may: the OS would refuse it after collecting)
            raise UsageError(f"bad argument '{arg}': it holds a NUL character")
    ns = parse_args(argv)
    if ns.index not in NAMES:
        raise UsageError(f"bad index '{ns.index}': expected one of {', '.join(NAMES)}")
    if ns.read is not None:
        _check_read(ns)
    if ns.onclose and ns.index != "tuple":
        raise UsageError(f"onclose needs index=tuple (got index={ns.index})")
    groups = _groups(ns)
    max_sockets = _max_sockets(ns)
    stap_args = _stap_args(ns)
    _check_sources(ns)
    interval, count = _snapshots(ns)
    pid, tree = _processes(ns, groups)
    if ns.check:
        _check_check(ns)
    serve, serve_interval, max_series, serve_restarts = _serving(ns)
    cgroup, netns = _places(ns)
    sample_ms = _sample_ms(ns)
    _check_output_files(ns)
    sort, top = _order(ns)
    if ns.backend not in BACKENDS:
        raise UsageError(f"bad --backend '{ns.backend}': expected {word_list(BACKENDS)}")
    return Plan(
        filters=tuple(parse_filters(ns.filters)),
        index=ns.index,
        timeout_s=_seconds(ns.timeout),
        nozeros=bool(ns.nozeros),
        onclose=bool(ns.onclose),
        command=ns.command,
        output=ns.output,
        groups=groups,
        dist=bool(ns.dist),
        estats=bool(ns.estats),
        sample_ms=sample_ms,
        on_cwnd_change=bool(ns.on_cwnd_change),
        series=ns.series,
        plot=ns.plot,
        us=bool(ns.us),
        max_sockets=max_sockets,
        kernel_release=ns.kernel_release,
        overload_guard=ns.overload_guard,
        tracepoints=ns.tracepoints,
        stap_args=stap_args,
        dump_script=ns.dump_script,
        save_records=ns.save_records,
        from_records=ns.from_records,
        verbose=ns.verbose,
        interval_s=interval if serve is None else serve_interval,
        count=count,
        timestamp=ns.timestamp,
        sort=sort,
        top=top,
        pid=pid,
        tree=tree,
        cgroup=cgroup,
        netns=netns,
        check=ns.check,
        read=ns.read,
        outcome_json=ns.outcome_json,
        backend=ns.backend,
        serve=serve,
        max_series=max_series,
        serve_restarts=serve_restarts,
    )
