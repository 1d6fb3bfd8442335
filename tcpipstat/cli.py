"""The command line: one definition (OPTION_GROUPS) feeds argparse, --help, the man page
and the checks of tcpipstat/plan.py.

Both the classic tcpipstat.stp words (``index=raddr timeout=30 nozeros=0
onclose=1``) and GNU options (``--index raddr --timeout 30 --zeros --onclose``)
are accepted; positional words are filters (see tcpipstat/filters.py).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from . import __version__
from .counters import DEFAULT_GROUPS, GROUPS
from .errors import UsageError
from .filters import MAX_FILTERS
from .indexes import INDEXES, NAMES, OFFLINE_NAMES


@dataclass(frozen=True)
class Opt:
    flags: tuple[str, ...]
    help: str
    dest: str = ""
    metavar: str | None = None
    action: str = "store"
    default: object = None
    const: object = None
    classic: str = ""            # the classic key=value spelling, if any
    live_only: bool = False      # needs the live collector: refused with --read
    not_with_check: bool = False  # collects or reports: refused with --check
    label: str = ""              # how messages name it, if not by its flags

    @property
    def name(self) -> str:
        """How error messages name the option."""
        return self.label or "/".join(self.flags)

    @property
    def classic_value(self) -> str:
        """What the classic word takes: 0 or 1 for a switch, else the option's value."""
        return "0|1" if self.action == "store_const" else str(self.metavar)

    def given(self, ns: argparse.Namespace) -> bool:
        """Whether the command line set the option (to other than its default)."""
        return getattr(ns, self.dest) != self.default


def word_list(words: Iterable[str], conj: str = "or") -> str:
    """``a, b or c``."""
    words = list(words)
    return ", ".join(words[:-1]) + f" {conj} " + words[-1] if len(words) > 1 else "".join(words)


PROG = "tcpipstat"
SUMMARY = "per-socket TCP/IP statistics (netstat -s per socket), collected live with SystemTap"
DEFAULT_INDEX = "tuple"


def _index_help() -> str:
    """--index's help: what each index of the registry groups by."""
    return "group report rows by " + word_list(
        f"{ix.name} ({ix.help}{', the default' if ix.name == DEFAULT_INDEX else ''})"
        for ix in INDEXES)


# The options in the sections of --help and of the man page's OPTIONS, in their order
OPTION_GROUPS: tuple[tuple[str, tuple[Opt, ...]], ...] = (
    ("Selecting sockets", (
        Opt(("-c", "--command"), "run CMD (through /bin/sh) and collect for exactly its lifetime, "
            "like stap -c; only sockets used by CMD and the processes it starts (followed at fork, "
            "even once re-parented) are reported (see --all-processes)",
            dest="command", metavar="CMD", live_only=True, not_with_check=True, label="-c"),
        Opt(("--all-processes",), "with -c: report every socket the filters accept during CMD's "
            "lifetime, not only those of its process tree", dest="all_processes",
            action="store_true", default=False, live_only=True),
        Opt(("-x", "--pid"), "report only the sockets process PID used (sent, received, connected "
            "or accepted on)", dest="pid", metavar="PID", live_only=True),
        Opt(("--cgroup",), "report only the sockets of cgroup PATH (v2) and of the cgroups below "
            "it; PATH as /proc/PID/cgroup shows it (/system.slice/nginx.service) or its folder "
            "under the cgroup v2 mount. A socket is in the cgroup of the process that created it "
            "(an accepted socket: its listener's; see ATTRIBUTION)", dest="cgroup", metavar="PATH",
            live_only=True, not_with_check=True),
        Opt(("--netns",), "report only the sockets of one network namespace: its inode (ls -iL "
            "/run/netns/NAME, readlink /proc/PID/ns/net) or a process ID, for that process's "
            "namespace", dest="netns", metavar="INODE|PID", live_only=True, not_with_check=True),
    )),
    ("Report rows", (
        Opt(("-i", "--index"), _index_help(), dest="index", metavar="|".join(NAMES),
            default=DEFAULT_INDEX, classic="index"),
        Opt(("--nozeros",), "hide counters that are zero (default)", dest="nozeros",
            action="store_const", const=True, default=True, classic="nozeros"),
        Opt(("--zeros",), "show every available counter, zeros included (classic nozeros=0)",
            dest="nozeros", action="store_const", const=False),
        Opt(("--sort",), "order report rows by a counter, largest first (any counter name, or "
            "bytes = SendBytes+RecvBytes, segs = InSegs+OutSegs)", dest="sort", metavar="COUNTER"),
        Opt(("--top",), "show only the first N rows (sorted by --sort, default bytes)", dest="top",
            metavar="N"),
    )),
    ("Collection", (
        Opt(("--backend",), "the collector: stap (SystemTap), bpftrace (tracepoints, and "
            "fentry where the kernel allows it, for hosts that cannot load a module; fewer "
            "counters, the others shown n/a) or auto "
            "(default: stap where stap and staprun are installed and the kernel loads modules, "
            "else bpftrace)", dest="backend", metavar="NAME", default="auto", live_only=True),
        Opt(("-t", "--timeout"), "stop collecting after SECONDS and report", dest="timeout",
            metavar="SECONDS", classic="timeout", live_only=True, label="timeout"),
        Opt(("--interval",), "print a snapshot every SECONDS: the counts since the previous one "
            "(deltas), as tables or NDJSON lines", dest="interval", metavar="SECONDS",
            classic="interval", live_only=True, not_with_check=True),
        Opt(("--count",), "with --interval: stop after K snapshots", dest="count", metavar="K",
            live_only=True),
        Opt(("-T", "--timestamp"), "with --interval: print each snapshot's wall-clock time",
            dest="timestamp", action="store_true", default=False, live_only=True),
        Opt(("--onclose",), "report each socket when it closes, with its whole-life totals, "
            "instead of one report at the end (needs index=tuple)", dest="onclose",
            action="store_const", const=True, default=False, classic="onclose", live_only=True,
            not_with_check=True, label="onclose"),
    )),
    ("Counters", (
        Opt(("-g", "--groups"), "counter groups to collect, comma-separated, from "
            + ",".join(GROUPS) + " (default: " + ",".join(DEFAULT_GROUPS) + "). Fewer groups, "
            "fewer probes, less overhead", dest="groups", metavar="LIST",
            default=",".join(DEFAULT_GROUPS), live_only=True),
        Opt(("--cong",), "also measure congestion states: per socket, the time spent in Open, "
            "Disorder, CWR, Recovery and Loss and the number of state changes (adds the cong "
            "group; see CONGESTION)", dest="cong", action="store_true", default=False,
            live_only=True),
        Opt(("--dist",), "with --cong: also show, per row, log2 histograms of how long each stay "
            "in each congestion state lasted (implies --cong)", dest="dist", action="store_true",
            default=False, live_only=True),
        Opt(("--rfc4898",), "also report, for each socket that closes, the RFC 4898 (TCP "
            "Extended Statistics) variables Linux keeps in its tcp_sock: segments, octets and "
            "retransmissions, RTT, RTO, MSS, windows, options (see RFC 4898)", dest="estats",
            action="store_true", default=False, live_only=True),
        Opt(("--sample",), "sample each connection's state (cwnd, ssthresh, srtt, rttvar, rto, "
            "lost, retransmitted, in flight, queues, snd_nxt/snd_una) after an ACK, at most once "
            "every MS milliseconds (default 100; 0: after every ACK); the report shows cwnd and "
            "srtt sparklines (see SERIES)", dest="sample", metavar="MS", live_only=True),
        Opt(("--on-cwnd-change",), "with --sample: sample only when the congestion window "
            "changed since the connection's previous sample", dest="on_cwnd_change",
            action="store_true", default=False, live_only=True),
        Opt(("--series",), "write every sample to FILE: CSV, or NDJSON when FILE ends in .ndjson "
            "or .json (implies --sample)", dest="series", metavar="FILE", live_only=True),
        Opt(("--plot",), "draw cwnd and srtt over time, one line per connection, into FILE.png "
            "(implies --sample; needs matplotlib)", dest="plot", metavar="FILE", live_only=True),
    )),
    ("Output", (
        Opt(("--json",), "write NDJSON: one object per report row", dest="output",
            action="store_const", const="json", default="table"),
        Opt(("--csv",), "write CSV: a header, then one line per report row", dest="output",
            action="store_const", const="csv"),
        Opt(("-u", "--us"), "show congestion-state times in microseconds (default: milliseconds; "
            "JSON and CSV always carry microseconds)", dest="us", action="store_true",
            default=False),
        Opt(("--outcome-json",), "also write how the run ended to FILE, as one JSON object: what "
            "ended it, the probe hits the collector skipped, events lost or unreadable, rows, "
            "duration and the notes under the report (written once the run has collected, even "
            "when it then fails; see OUTCOME)", dest="outcome_json", metavar="FILE",
            not_with_check=True),
    )),
    ("Serving (Prometheus)", (
        Opt(("--serve",), "run as a Prometheus exporter until SIGTERM or SIGINT: collect in "
            "windows of --serve-interval seconds and serve each label set's cumulative counters "
            "(labels: the index's fields) on http://ADDR:PORT/metrics, as Prometheus text or "
            "OpenMetrics (see SERVING). ADDR is an IP address (IPv6 in brackets; default 0.0.0.0, "
            "every IPv4 address); PORT 0 takes a free port, which is printed",
            dest="serve", metavar="[ADDR:]PORT", live_only=True, not_with_check=True),
        Opt(("--serve-interval",), "with --serve: hand the collector's counts over every SECONDS "
            "(default 5); /metrics lags the kernel by at most that", dest="serve_interval",
            metavar="SECONDS", live_only=True, not_with_check=True),
        Opt(("--max-series",), "with --serve: label sets that get series of their own (default "
            "1000); the others are folded into one series labelled other (see SERVING). Needed "
            "for index=tuple", dest="max_series", metavar="N", live_only=True,
            not_with_check=True),
        Opt(("--serve-restarts",), "with --serve: restart a collector that ends by itself, a "
            "second later, at most N times in any 10 minutes (default 3; 0: never); then serve "
            "tcpipstat_up 0 and exit 1 when stopped (see SERVING)", dest="serve_restarts",
            metavar="N", live_only=True, not_with_check=True),
    )),
    ("Offline", (
        Opt(("--save-records",), "also write the collector's raw records to FILE (re-report them "
            "later with --from-records)", dest="save_records", metavar="FILE", live_only=True,
            not_with_check=True),
        Opt(("--from-records",), "report from a file written by --save-records instead of "
            "collecting (no root, no stap)", dest="from_records", metavar="FILE", live_only=True,
            not_with_check=True),
        Opt(("--read",), "report from the packet capture FILE (pcap or pcapng, e.g. from tcpdump "
            "-w) instead of collecting: one row per TCP connection, local being the side that "
            "opened it, with the counters and timings a capture shows (see CAPTURES); filters and "
            f"index={'|'.join(OFFLINE_NAMES)} work as live. No root, no stap, no debuginfo",
            dest="read", metavar="FILE"),
    )),
    ("Compiling (SystemTap)", (
        Opt(("--max-sockets",), "socket tuples the collector holds at once before handing them "
            "to tcpipstat (default 8192; half of it is how many sockets may be busy at once, see "
            "OVERHEAD)", dest="max_sockets", metavar="N", default="8192", live_only=True),
        Opt(("-r", "--kernel-release"), "compile for kernel KVER instead of the running one "
            "(uname -r)", dest="kernel_release", metavar="KVER", live_only=True),
        Opt(("--kprobes-only",), "use kprobes even where a tracepoint resolves (congestion "
            "states: the tcp_ack, tcp_enter_loss and tcp_simple_retransmit fallback instead of "
            "tcp:tcp_cong_state_set), to compare the two or to avoid a tracepoint",
            dest="tracepoints", action="store_false", default=True, live_only=True),
        Opt(("--no-overload-guard",), "disable stap's probe-overhead guard (-DSTP_NO_OVERLOAD); "
            "needed on slow machines such as emulated VMs, where the guard stops collection",
            dest="overload_guard", action="store_false", default=True, live_only=True),
        Opt(("--stap-arg",), "pass ARG to stap when compiling (repeatable; write --stap-arg=ARG). "
            "Allowed: -DNAME=NUMBER, -sNUM, -t, -w, -u, -k, --suppress-time-limits",
            dest="stap_args", metavar="ARG", action="append", live_only=True),
        Opt(("-v", "--verbose"), "show stap's passes while it compiles", dest="verbose",
            action="count", default=0),
    )),
    ("Diagnostics", (
        Opt(("--dump-script",), "print the generated collector script and exit (no root needed)",
            dest="dump_script", action="store_true", default=False, live_only=True,
            not_with_check=True),
        Opt(("--check",), "diagnose this host without collecting: stap, root, kernel headers and "
            "debuginfo, module loading, which counters this kernel provides; prints the fix for "
            "what is missing. Exit status 0 when collection can work", dest="check",
            action="store_true", default=False, live_only=True),
        Opt(("-h", "--help"), "show this help and exit", action="help"),
        Opt(("--version",), "print the version and exit", action="version"),
    )),
)

OPTIONS: tuple[Opt, ...] = tuple(o for _, opts in OPTION_GROUPS for o in opts)
CLASSIC_KEYS = {o.classic: o for o in OPTIONS if o.classic}
_CLASSIC_WORD = re.compile(r"^([A-Za-z_]+)=(.*)$", re.S)


def synopsis(bold: Callable[[str], str] = str, italic: Callable[[str], str] = str) -> list[str]:
    """The forms of the command, literal words through ``bold`` and values through
    ``italic``: plain for the usage of --help, in roff fonts for the man page."""
    b, i = bold, italic
    classic = " ".join(f"[{b(o.classic + '=')}{i(o.classic_value)}]"
                       for o in OPTIONS if o.classic)
    return [
        f"{b(PROG)} [{i('options')}] {classic} [{i('FILTER')} ...]",
        f"{b(PROG + ' --check')} [{b('-r')} {i('KVER')}] [{b('--json')}]",
        f"{b(PROG + ' --serve')} [{i('ADDR')}{b(':')}]{i('PORT')} [{b('index=')}{i('NAME')}] "
        f"[{b('--max-series')} {i('N')}] [{i('FILTER')} ...]",
        f"{b(PROG + ' --read')} {i('FILE')} [{b('index=')}{i('|'.join(OFFLINE_NAMES))}] "
        f"[{b('--json')}|{b('--csv')}] [{b('--sort')} {i('COUNTER')}] [{i('FILTER')} ...]",
    ]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse names the bad token in its message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        allow_abbrev=False,
        add_help=False,          # -h is an option of OPTION_GROUPS (Diagnostics)
        description=SUMMARY + ".",
        usage="\n       ".join(synopsis()),
        epilog="FILTER is <laddr>:<lport>-<raddr>:<rport>; * matches anything, e.g. "
               "'*.*.*.*:80-*:*', '10.0.0.0/8:*-*:*', '[::1]:8000..8080-*:*'. Several filters "
               "are ORed (at most %d). See tcpipstat(8)." % MAX_FILTERS,
    )
    p.add_argument("words", nargs="*", metavar="FILTER",
                   help="socket filters (and classic key=value words)")
    for title, opts in OPTION_GROUPS:
        group = p.add_argument_group(title)
        for o in opts:
            _add_option(group, o)
    return p


def _add_option(group, o: Opt) -> None:
    if o.action == "help":
        group.add_argument(*o.flags, action="help", help=o.help)
        return
    if o.action == "version":
        group.add_argument(*o.flags, action="version", version=f"{PROG} {__version__}",
                           help=o.help)
        return
    kw: dict = {"dest": o.dest, "action": o.action, "help": o.help}
    if o.action in ("store", "append"):
        kw["metavar"] = o.metavar
    if o.action == "store_const":
        kw["const"] = o.const
    if o.default is not None:
        kw["default"] = o.default
    group.add_argument(*o.flags, **kw)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse argv; classic key=value words are folded into the same namespace."""
    parser = build_parser()
    # (intermixed: classic words and filters may come anywhere among the options)
    ns, extra = parser.parse_known_intermixed_args(argv)
    if extra:
        raise UsageError(f"unrecognized argument '{extra[0]}' (see --help)")
    _refuse_empty_values(ns)
    _refuse_two_outputs(argv)
    ns.filters = []
    for word in ns.words:
        m = _CLASSIC_WORD.match(word)
        if m and not word.startswith("*") and ":" not in m.group(1):
            key, value = m.group(1), m.group(2)
            if key not in CLASSIC_KEYS:
                raise UsageError(f"unknown option '{word}': expected one of "
                                 + ", ".join(f"{k}=..." for k in CLASSIC_KEYS))
            _apply_classic(ns, CLASSIC_KEYS[key], value, word)
            continue
        ns.filters.append(word)
    return ns


def _refuse_empty_values(ns: argparse.Namespace) -> None:
    """argparse takes the value '--' of ``--OPT=--`` for the end of the options and stores
    an empty list where a string belongs: refuse it by name."""
    for o in OPTIONS:
        if o.action not in ("store", "append"):
            continue
        value = getattr(ns, o.dest)
        values = value if o.action == "append" and value is not None else [value]
        if any(isinstance(v, list) for v in values):
            raise UsageError(f"bad value '--' for {o.name}: expected {o.metavar}")


def _refuse_two_outputs(argv: list[str]) -> None:
    """--json and --csv set one output: the last would silently win."""
    outputs = [o for o in OPTIONS if o.dest == "output"]
    given = [f for o in outputs for f in o.flags if f in argv]
    if len(given) > 1:
        raise UsageError(f"{given[0]} and {given[1]} contradict each other: choose one output")


def _bool01(value: str, word: str) -> bool:
    if value not in ("0", "1"):
        raise UsageError(f"bad value in '{word}': expected 0 or 1")
    return value == "1"


def _apply_classic(ns: argparse.Namespace, o: Opt, value: str, word: str) -> None:
    """A classic word sets what its option sets; a switch's word is 1 (on) or 0 (off).
    Given beside its option with another value, neither may silently win."""
    if o.action == "store_const":
        value = o.const if _bool01(value, word) else not o.const
    given = getattr(ns, o.dest)
    if o.action != "store_const" and given != o.default and given != value:
        raise UsageError(f"'{word}' and {o.name} {given} contradict each other: give one")
    setattr(ns, o.dest, value)
