"""The command line: one definition (OPTIONS) feeds argparse, --help and the man page.

Both the classic tcpipstat.stp words (``index=raddr timeout=30 nozeros=0
onclose=1``) and GNU options (``--index raddr --timeout 30 --zeros --onclose``)
are accepted; positional words are filters (see tcpipstat/filters.py).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

from . import __version__
from .counters import DEFAULT_GROUPS, GROUPS
from .errors import UsageError
from .filters import MAX_FILTERS
from .model import INDEXES


@dataclass(frozen=True)
class Opt:
    flags: tuple[str, ...]
    help: str
    dest: str = ""
    metavar: str | None = None
    action: str = "store"
    default: object = None
    classic: str = ""            # the classic key=value spelling, if any
    const: object = None
    hidden: bool = False         # not in --help (still in the man page)
    kwargs: dict = field(default_factory=dict)


PROG = "tcpipstat"
SUMMARY = "per-socket TCP/IP statistics (netstat -s per socket), collected live with SystemTap"

OPTIONS: tuple[Opt, ...] = (
    Opt(("-i", "--index"), "group report rows by the whole socket tuple (default), the local or "
        "remote address, the local or remote port, or the process (pid, or command name: comm) that "
        "last used the socket", dest="index", metavar="|".join(INDEXES),
        default="tuple", classic="index"),
    Opt(("-t", "--timeout"), "stop collecting after SECONDS and report", dest="timeout",
        metavar="SECONDS", classic="timeout"),
    Opt(("--nozeros",), "hide counters that are zero (default)", dest="nozeros", action="store_const",
        const=True, default=True, classic="nozeros"),
    Opt(("--zeros",), "show every available counter, zeros included (classic nozeros=0)", dest="nozeros",
        action="store_const", const=False),
    Opt(("--onclose",), "report each socket when it closes, with its whole-life totals, instead of one "
        "report at the end (needs index=tuple)", dest="onclose", action="store_const", const=True,
        default=False, classic="onclose"),
    Opt(("-c", "--command"), "run CMD (through /bin/sh) and collect for exactly its lifetime, like "
        "stap -c; only sockets used by CMD and the processes it starts (followed at fork, even once "
        "re-parented) are reported (see --all-processes)",
        dest="command", metavar="CMD"),
    Opt(("--all-processes",), "with -c: report every socket the filters accept during CMD's "
        "lifetime, not only those of its process tree", dest="all_processes", action="store_true",
        default=False),
    Opt(("-x", "--pid"), "report only the sockets process PID used (sent, received, connected or "
        "accepted on)", dest="pid", metavar="PID"),
    Opt(("--interval",), "print a snapshot every SECONDS: the counts since the previous one "
        "(deltas), as tables or NDJSON lines", dest="interval", metavar="SECONDS", classic="interval"),
    Opt(("--count",), "with --interval: stop after K snapshots", dest="count", metavar="K"),
    Opt(("-T", "--timestamp"), "with --interval: print each snapshot's wall-clock time",
        dest="timestamp", action="store_true", default=False),
    Opt(("--sort",), "order report rows by a counter, largest first (any counter name, or bytes = "
        "SendBytes+RecvBytes, segs = InSegs+OutSegs)", dest="sort", metavar="COUNTER"),
    Opt(("--top",), "show only the first N rows (sorted by --sort, default bytes)", dest="top",
        metavar="N"),
    Opt(("--json",), "write NDJSON: one object per report row", dest="output", action="store_const",
        const="json", default="table"),
    Opt(("--csv",), "write CSV: a header, then one line per report row", dest="output",
        action="store_const", const="csv"),
    Opt(("-g", "--groups"), "counter groups to collect, comma-separated, from "
        + ",".join(GROUPS) + " (default: " + ",".join(DEFAULT_GROUPS) + "). Fewer groups, fewer probes, "
        "less overhead", dest="groups", metavar="LIST", default=",".join(DEFAULT_GROUPS)),
    Opt(("--cong",), "also measure congestion states: per socket, the time spent in Open, Disorder, "
        "CWR, Recovery and Loss and the number of state changes (adds the cong group; see CONGESTION)",
        dest="cong", action="store_true", default=False),
    Opt(("--dist",), "with --cong: also show, per row, log2 histograms of how long each stay in each "
        "congestion state lasted (implies --cong)", dest="dist", action="store_true", default=False),
    Opt(("--rfc4898",), "also report, for each socket that closes, the RFC 4898 (TCP Extended "
        "Statistics) variables Linux keeps in its tcp_sock: segments, octets and retransmissions, RTT, "
        "RTO, MSS, windows, options (see RFC 4898)", dest="estats", action="store_true", default=False),
    Opt(("--sample",), "sample each connection's state (cwnd, ssthresh, srtt, rttvar, rto, lost, "
        "retransmitted, in flight, queues, snd_nxt/snd_una) after an ACK, at most once every MS "
        "milliseconds (default 100; 0: after every ACK); the report shows cwnd and srtt sparklines "
        "(see SERIES)", dest="sample", metavar="MS"),
    Opt(("--on-cwnd-change",), "with --sample: sample only when the congestion window changed since "
        "the connection's previous sample", dest="on_cwnd_change", action="store_true", default=False),
    Opt(("--series",), "write every sample to FILE: CSV, or NDJSON when FILE ends in .ndjson or .json "
        "(implies --sample)", dest="series", metavar="FILE"),
    Opt(("--plot",), "draw cwnd and srtt over time, one line per connection, into FILE.png "
        "(implies --sample; needs matplotlib)", dest="plot", metavar="FILE"),
    Opt(("-u", "--us"), "show congestion-state times in microseconds (default: milliseconds; JSON and "
        "CSV always carry microseconds)", dest="us", action="store_true", default=False),
    Opt(("--max-sockets",), "socket tuples the collector holds at once before handing them to "
        "tcpipstat (default 8192; half of it is how many sockets may be busy at once, see OVERHEAD)", dest="max_sockets",
        metavar="N", default="8192"),
    Opt(("-r", "--kernel-release"), "compile for kernel KVER instead of the running one (uname -r)",
        dest="kernel_release", metavar="KVER"),
    Opt(("--kprobes-only",), "use kprobes even where a tracepoint resolves (congestion states: the "
        "tcp_ack, tcp_enter_loss and tcp_simple_retransmit fallback instead of tcp:tcp_cong_state_set), "
        "to compare the two or to avoid a tracepoint", dest="tracepoints", action="store_false", default=True),
    Opt(("--no-overload-guard",), "disable stap's probe-overhead guard (-DSTP_NO_OVERLOAD); needed "
        "on slow machines such as emulated VMs, where the guard stops collection", dest="overload_guard",
        action="store_false", default=True),
    Opt(("--stap-arg",), "pass ARG to stap when compiling (repeatable; write --stap-arg=ARG). Allowed: -DNAME=NUMBER, -sNUM, "
        "-t, -w, -u, -k, --suppress-time-limits", dest="stap_args", metavar="ARG", action="append",
        default=None),
    Opt(("--save-records",), "also write the collector's raw records to FILE (re-report them later "
        "with --from-records)", dest="save_records", metavar="FILE"),
    Opt(("--from-records",), "report from a file written by --save-records instead of collecting "
        "(no root, no stap)", dest="from_records", metavar="FILE"),
    Opt(("--read",), "report from the packet capture FILE (pcap or pcapng, e.g. from tcpdump -w) instead of "
        "collecting: one row per TCP connection, local being the side that opened it, with the counters "
        "and timings a capture shows (see CAPTURES); filters and index=tuple|laddr|raddr|lport|rport work "
        "as live. No root, no stap, no debuginfo", dest="read", metavar="FILE"),
    Opt(("--dump-script",), "print the generated SystemTap script and exit (no root needed)",
        dest="dump_script", action="store_true", default=False),
    Opt(("--check",), "diagnose this host without collecting: stap, root, kernel headers and "
        "debuginfo, module loading, which counters this kernel provides; prints the fix for what is "
        "missing. Exit status 0 when collection can work", dest="check", action="store_true",
        default=False),
    Opt(("-v", "--verbose"), "show stap's passes while it compiles", dest="verbose", action="count",
        default=0),
    Opt(("--version",), "print the version and exit", action="version"),
)

CLASSIC_KEYS = {o.classic: o for o in OPTIONS if o.classic}
_CLASSIC_WORD = re.compile(r"^([A-Za-z_]+)=(.*)$", re.S)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse names the bad token in its message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description=SUMMARY + ".",
        usage="%(prog)s [options] [index=tuple|laddr|raddr|lport|rport|pid|comm] [timeout=N] "
              "[interval=N] [nozeros=0|1] [onclose=0|1] [FILTER ...]\n"
              "       %(prog)s --read FILE [index=tuple|laddr|raddr|lport|rport] [--json|--csv] [FILTER ...]",
        epilog="FILTER is <laddr>:<lport>-<raddr>:<rport>; * matches anything, e.g. '*.*.*.*:80-*:*', "
               "'10.0.0.0/8:*-*:*', '[::1]:8000..8080-*:*'. Several filters are ORed (at most %d). "
               "See tcpipstat(8)." % MAX_FILTERS,
    )
    for o in OPTIONS:
        kw: dict = dict(o.kwargs)
        if o.action == "version":
            p.add_argument(*o.flags, action="version", version=f"{PROG} {__version__}", help=o.help)
            continue
        kw["help"] = argparse.SUPPRESS if o.hidden else o.help
        kw["dest"] = o.dest
        kw["action"] = o.action
        if o.action in ("store", "append"):
            kw["metavar"] = o.metavar
        if o.action == "store_const":
            kw["const"] = o.const
        if o.default is not None:
            kw["default"] = o.default
        p.add_argument(*o.flags, **kw)
    p.add_argument("words", nargs="*", metavar="FILTER", help="socket filters (and classic key=value words)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse argv; classic key=value words are folded into the same namespace."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        raise UsageError(f"unrecognized argument '{extra[0]}' (see --help)")
    ns.filters = []
    ns.classic_seen = []
    for word in ns.words:
        m = _CLASSIC_WORD.match(word)
        if m and not word.startswith("*") and ":" not in m.group(1):
            key, value = m.group(1), m.group(2)
            if key not in CLASSIC_KEYS:
                raise UsageError(f"unknown option '{word}': expected one of "
                                 + ", ".join(f"{k}=..." for k in CLASSIC_KEYS))
            _apply_classic(ns, key, value, word)
            continue
        ns.filters.append(word)
    return ns


def _bool01(value: str, word: str) -> bool:
    if value not in ("0", "1"):
        raise UsageError(f"bad value in '{word}': expected 0 or 1")
    return value == "1"


def _apply_classic(ns: argparse.Namespace, key: str, value: str, word: str) -> None:
    ns.classic_seen.append(word)
    if key == "index":
        ns.index = value
    elif key == "timeout":
        ns.timeout = value
    elif key == "interval":
        ns.interval = value
    elif key == "nozeros":
        ns.nozeros = _bool01(value, word)
    elif key == "onclose":
        ns.onclose = _bool01(value, word)
