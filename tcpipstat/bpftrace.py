"""The bpftrace collector, for hosts that cannot load a SystemTap module.

The program is rendered from tcpipstat/bt_templates/tcpipstat.bt.j2. It counts what a
tracepoint can count exactly, else what fentry/fexit can where the stap collector probes,
where the kernel allows it (BPF_POINTS, chosen per kernel by tcpipstat/bt_points.py);
every other counter of the chosen groups is reported unavailable. With --sample it
samples connections at tcp:tcp_probe (:func:`sample_context`, :class:`SampleOrder`). The
filters, the timeout and the sampling period reach it as numbers (positional parameters,
:func:`program_args`, :func:`sample_args`): nothing the user types is in the program.

It writes the record stream of tcpipstat/records.py itself (header, each socket as it
closes, trailer), except the records of the sockets still open at the end and, with
--interval, of each snapshot: bpftrace 0.17 cannot loop over a map, so the program prints
its maps and :class:`EndDump` writes those records, :class:`Ledger` keeping each to what
came since the socket's last record.
With --cong, a closing socket's congestion times (and --dist stays) come on lines of
their own, keyed by the socket, that :class:`CloseCong` joins to its record.

``TCPIPSTAT_BPFTRACE`` replaces the ``bpftrace`` command (a command line, split like a
shell would).
"""
from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import jinja2

from . import __version__
from .backend import CollectorProcess, Log, Prepared, RunOutcome, command_from_env
from .bt_points import (ASKED, LISTINGS, TLS_PATHS, Choice, KernelPoints, choose,
                        ktls_missed, list_points)
from .counters import CA_COUNTERS, CA_TIME_COUNTERS, UNITS, counters_for_units, units_for_groups
from .errors import EnvironmentNotReady, UsageError
from .estats import EVARS
from .filters import Filter
from .records import (ESTATS, FORMAT_VERSION, HEADER, INTERVAL, MAGIC, SAMPLE, SOCKET,
                      SOCKET_FORMAT2, TRAILER)
from .series import FIELD_NAMES as SAMPLE_FIELDS

INSTALL_HINT = "install bpftrace: 'apt-get install bpftrace' or 'dnf install bpftrace'"
# The oldest bpftrace the program runs on (its CHANGELOG): 0.12 brought -q (before it,
# "Attaching N probes..." went to stdout, the record stream), clear() of a count() map
# and nsecs on the boot clock (boot_to_wall_ms); 0.11 tuples and positional parameters in
# probe names (interval:ms:$N). Kernel types come from BTF (0.9.3).
MIN_VERSION = (0, 12, 0)
_NEED = ".".join(map(str, MIN_VERSION))
VERSION_FIX = f"install bpftrace {_NEED} or later"
_OS_LINE = re.compile(r"^\s*OS: Linux ([\w.+~-]+)", re.M)    # bpftrace --info: uname's
_VERSION = re.compile(r"\bv?(\d+)\.(\d+)(?:\.(\d+))?")     # "v0.17.0", "0.20", "bpftrace v0.23.5"
# A snapshot (--interval, --serve) prints maps the probes still change. bpftrace before 0.19
# ends the run when a socket closing meanwhile deletes a key between the print's next-key
# and its lookup: it took libbpf 1.x's -ENOENT for an error (src/bpftrace.cpp, print_map;
# fixed by bpftrace commit 6edb98028). No program-side way round it: the print is walked in
# user space, later than the probe that asks for it. END prints after the probes detach.
PRINT_RACE_FIXED = (0, 19, 0)
_PRINT_RACE = re.compile(r"(ERROR: )?failed to look up elem: -?\d+\Z")
_PRINT_RACE_AFTER = ("terminate called after throwing", "  what():  Could not print map")
PRINT_RACE = ("bpftrace stopped as it printed a snapshot: a socket that closed meanwhile took "
              "its entry away, which bpftrace before 0.19 takes for an error",
              "bpftrace 0.19 or later reads past it; a run with neither --interval nor "
              "--serve prints the maps once, at the end, with the probes detached")
TRACEFS = Path("/sys/kernel/tracing")
TRACEFS_FIX = "mount it: 'mount -t tracefs nodev /sys/kernel/tracing' (as root)"

# Where each counter is counted (the template says how; the man page's FIELDS lists these
# beside the stap points): a tracepoint that counts as the kernel's MIB does, else fentry
# or fexit (kfunc, kretfunc) where the stap collector probes, where the kernel allows it
_DACK = ("kfunc:tcp_delack_timer", "kfunc:tcp_delack_timer_handler", "kfunc:tcp_send_ack")
_LISTEN = "kretfunc:tcp_v4_syn_recv_sock, kretfunc:tcp_v6_syn_recv_sock"
BPF_POINTS = {
    "SendBytes": "tracepoint:sock:sock_send_length", "SendMsgs": "tracepoint:sock:sock_send_length",
    "RecvBytes": "tracepoint:sock:sock_recv_length", "RecvMsgs": "tracepoint:sock:sock_recv_length",
    **dict.fromkeys(("ActiveOpens", "PassiveOpens", "AttemptFails", "EstabResets", "CurrEstab"),
                    "tracepoint:sock:inet_sock_set_state"),
    "InSegs": "kfunc:tcp_v4_rcv, kfunc:tcp_v6_rcv",
    "RetransSegs": "tracepoint:tcp:tcp_retransmit_skb",
    "OutRsts": "tracepoint:tcp:tcp_send_reset",
    "DelayedACKs": ", ".join(_DACK),
    "ListenOverflows": _LISTEN, "ListenDrops": _LISTEN,
    **dict.fromkeys(CA_COUNTERS, "tracepoint:tcp:tcp_cong_state_set"),
}
_KFUNC_ONLY = " (where the kernel lets BPF attach to them; else n/a)"
# what the man page adds: where a kernel lacks the tracepoint (bt_points.choose), or needs
# what not every kernel allows
_PATHS_NOTE = ("; where the kernel does not let BPF attach to {}, the report and --check say "
               "that the counter misses {}")
BPF_NOTES = {**dict.fromkeys(("SendBytes", "SendMsgs"), (
                 ", or kretfunc:tcp_sendmsg on a kernel without it; and kretfunc:tcp_sendpage "
                 "on a kernel that has it (sendfile(), splice() and vmsplice() into the "
                 "socket, before Linux 6.5; since 6.5 they pass the tracepoint); on kTLS "
                 "sockets kretfunc:tls:tls_sw_sendmsg and kretfunc:tls:tls_sw_sendpage where "
                 "the tracepoint is missing"
                 + _PATHS_NOTE.format("it", "those calls"))),
             **dict.fromkeys(("RecvBytes", "RecvMsgs"), (
                 ", or kretfunc:tcp_recvmsg on a kernel without it; and kretfunc:tcp_splice_read "
                 "(splice() out of the socket) and kretfunc:tcp_zerocopy_receive "
                 "(TCP_ZEROCOPY_RECEIVE), on Linux 6.1 and 6.12 alike; on kTLS sockets "
                 "kretfunc:tls:tls_sw_recvmsg where the tracepoint is missing and "
                 "kretfunc:tls:tls_sw_splice_read"
                 + _PATHS_NOTE.format("them", "those paths"))),
             "OutRsts": ", or kfunc:tcp_v4_send_reset, kfunc:tcp_v6_send_reset and "
                        "kfunc:tcp_send_active_reset on a kernel where it misses the resets "
                        "sent without a full socket (before Linux 6.10)",
             **dict.fromkeys(("InSegs", "DelayedACKs", "ListenOverflows", "ListenDrops"),
                             _KFUNC_ONLY)}
# Counted by a segment's tuple, written at the end and at each --interval snapshot (the
# template's tuple_add): not with onclose=1, whose rows must hold a socket's whole life
TUPLE_COUNTERS = frozenset({"InSegs", "OutRsts", "ListenOverflows", "ListenDrops"})
# ... and never by socket: no per-socket map (a close record writes 0 for them)
TUPLE_ONLY = TUPLE_COUNTERS - {"OutRsts"}
BPF_COUNTERS = frozenset(BPF_POINTS)
# --cong: only where the kernel has the tracepoint (tracefs lists it); the report names it
CONG_HOW = next(u.ca_state for u in UNITS if u.name == "CongState")
PER_FILTER = 21          # numbers per filter (the template's header comment)
# Lines the program writes around its map printouts (no record starts so): before END's;
# with --interval, before a snapshot's (then its number and time), before its serials
# printed again, after them; and the head of a close record (then the socket's serial)
END_MARK = "tcpipstat-bpftrace-end"
# written as the program ends the run itself (timeout, --count), just before its exit():
# where counting stops (bpftrace detaches the probes before END, which can take 100s of ms)
STOP_MARK = "tcpipstat-bpftrace-stop"
MARKS = {"begin": "tcpipstat-bpftrace-interval", "check": "tcpipstat-bpftrace-check",
         "end": "tcpipstat-bpftrace-snapshot"}
CLOSE_HEAD = "tcpipstat-bpftrace-close"
# the run's own maps (the per-socket ones: render_program)
_GLOBAL_MAPS = ("start", "records", "dropped", "ended", "closed", "untracked",
                "unmarked")
# --cong/--dist lines of the program's own, never records (the template says when)
CA_LINES = "tcpipstat-bpftrace-ca-"
CA_TIMES, CA_STAYS, CA_CLOSE = CA_LINES + "times", CA_LINES + "stays", CA_LINES + "close"
CA_NOW = "tcpipstat-bpftrace-now"
_PLACE_MAPS = ("cg", "ns")      # where the socket belongs: cgroup id, netns inode
# (bpftrace 0.17's %d and %u print the low 32 bits only; a cgroup id may be wider)
_PLACE_CONVS = {"CGROUP": "%lu", "NETNS": "%lu"}


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tcpipstat", "bt_templates"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    return _env().get_template("tcpipstat.bt.j2")


def unsupported(plan) -> str:
    """The first option this collector cannot do yet ("" if none)."""
    for what, on in (("--kprobes-only with --cong",
                      "cong" in plan.groups and not plan.tracepoints),
                     ("-r/--kernel-release", plan.kernel_release is not None),
                     ("--stap-arg", bool(plan.stap_args))):
        if on:
            return what
    return ""


def missing_here(plan, choice: Choice) -> frozenset[str]:
    """The counters ``plan`` cannot have with ``choice``'s points."""
    return choice.missing | (TUPLE_COUNTERS if plan.onclose else frozenset())


def counters(groups, missing: frozenset[str] = ASKED
             ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(available, unavailable) counters of ``groups``, in catalogue order; ``missing``:
    those the kernel gives no point for (bt_points.Choice.missing; by default, where
    bpftrace was not asked, those that need the kernel's answer)."""
    wanted = counters_for_units(units_for_groups(groups))
    countable = BPF_COUNTERS - missing
    return (tuple(c for c in wanted if c in countable),
            tuple(c for c in wanted if c not in countable))


def _bt_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t").replace(
        "\n", "\\n")


def _long(fmt: str) -> str:
    """``fmt`` with 64-bit conversions: bpftrace 0.17's %d and %x print the low 32 bits
    (a byte count, an IPv6 half or a boot-clock time would wrap)."""
    return re.sub(r"%([dx])", r"%l\1", fmt)


def _bt_format(spec_format: str) -> str:
    """A record spec's printf format for bpftrace, in the program's string syntax."""
    return _bt_string(_long(spec_format))


def render_program(plan, choice: Choice | None = None, estats: EstatsRead | None = None,
                   cgroup: bool = True, netns: bool = True) -> str:
    """The bpftrace program for ``plan`` on a kernel with ``choice``'s points (default: a
    current kernel's): its groups, whether -c runs a command and how many filters there
    are shape it; their values are positional parameters. With --rfc4898, ``estats`` says
    which variables this kernel lets it read (None: every one this kernel's HZ allows, as
    --dump-script shows it). ``cgroup``: the kernel's sockets hold their cgroup where the
    program reads it (:func:`cgroup_readable`); ``netns``: their namespace is read
    (both False: the records say 0, unknown, Plan.places_kept)."""
    choice = choice or choose(KernelPoints.newest())
    available, _ = counters(plan.groups, missing_here(plan, choice))
    cong = "CaChanges" in available
    dist = cong and plan.dist
    head = HEADER.printf(MAGIC=MAGIC, FORMAT=FORMAT_VERSION, VERSION=__version__,
                         MAX_SOCKETS=plan.max_sockets, COUNTERS=",".join(available))
    interval = plan.interval_s is not None
    intree, sn = ["intree"] if plan.command else [], ["sn"] if interval else []
    sock_counters = [c for c in available if c not in TUPLE_ONLY]
    counts = [f"c_{c}" for c in sock_counters]
    # Per-socket maps, in the order a closing socket leaves them: comm and intree before
    # pid, tup and sn before ok (the template's full tables: their keys stay among those)
    socket_maps = [*counts, "n", *intree, "comm", "pid", "tup", *_PLACE_MAPS, *sn, "no", "miss",
                   "ok",
                   *(["cs"] if cong else [])]
    hist_maps = ["cd", "cm"] if dist else []
    # (the serials first: a snapshot prints them again last, tcpipstat compares the two;
    # the congestion states after the counts and stays: a state that changed while they
    # were printed says so, CongEnd)
    tuples = [f"t_{c}" for c in available if c in TUPLE_COUNTERS]
    dumped = [*sn, "tup", *_PLACE_MAPS, "pid", "comm", *intree, *counts, *tuples,
              *hist_maps[:1], *(["cs"] if cong else [])]
    return _template().render(
        version=__version__, counters=available, command=bool(plan.command), points=choice,
        tls_paths=TLS_PATHS,
        cgroup=cgroup, netns=netns,
        nfilters=len(plan.filters), per_filter=PER_FILTER, end_mark=END_MARK,
        stop_mark=STOP_MARK,
        fmt={"H": _bt_format(head), "R": _bt_format(SOCKET.printf(**_PLACE_CONVS)),
             "T": _bt_format(TRAILER.printf())},
        interval=interval, marks=MARKS,
        close_head=_bt_format(f"{CLOSE_HEAD}\t%d\t") if interval else "",
        maps=socket_maps, dumped=dumped,
        globals=[*_GLOBAL_MAPS, *tuples, *(["dack"] if "DelayedACKs" in available else []),
                 *(["tree"] if plan.command else []),
                 *(["marks"] if interval else []), *hist_maps],
        rcounters=[c for c in available if c not in CA_COUNTERS], sock_counters=sock_counters,
        cong=cong, dist=dist,
        ca_counters=CA_COUNTERS, ca_times=CA_TIME_COUNTERS, ca_times_line=CA_TIMES,
        ca_stays=CA_STAYS, ca_close=CA_CLOSE, ca_now=CA_NOW,
        sample=sample_context(plan),
        # --interval's parameters follow the filters' and --sample's
        interval_at=3 + len(plan.filters) * PER_FILTER
        + (SAMPLE_PARAMS if plan.sample_ms is not None else 0),
        estats=(estats_template(estats or estats_read(None, kernel_hz()))
                if plan.estats else None))


def _words(value: int, mask: int) -> list[int]:
    """A 128-bit value and mask as 4 + 4 32-bit words, most significant first."""
    return ([(value >> s) & 0xFFFFFFFF for s in (96, 64, 32, 0)]
            + [(mask >> s) & 0xFFFFFFFF for s in (96, 64, 32, 0)])


def filter_numbers(f: Filter) -> list[int]:
    """One filter's PER_FILTER positional parameters (an IPv4 address in the last word)."""
    return [f.family, *_words(f.local.value, f.local.mask), f.lport.low, f.lport.high,
            *_words(f.remote.value, f.remote.mask), f.rport.low, f.rport.high]


def program_args(filters, timeout_s: float | None) -> list[str]:
    """The positional parameters: numbers only, whatever the user typed."""
    args = [len(filters), int(round(timeout_s * 1000)) if timeout_s else 0]
    for f in filters:
        args += filter_numbers(f)
    return [str(a) for a in args]


# ---- --sample (tcpipstat/series.py) ----
# The sampled fields read through BTF from the socket as a struct tcp_sock ($s_tp) and an
# inet_connection_sock ($s_icsk): the stap collector's expressions (tcpipstat/render.py,
# STAP_SFIELDS), each with its printf conversion. bpftrace 0.17 prints a 32-bit value
# with %d as signed, whatever it is cast to: %u for the kernel's u32 fields. {hz}: the
# kernel's HZ, a positional parameter (0: not known, rto_ms -1).
BT_SFIELDS = {
    "cwnd": ("%u", "$s_tp->snd_cwnd"),
    "ssthresh": ("%d", "($s_tp->snd_ssthresh >= 0x7fffffff ? (int64)-1 : "
                       "(int64)$s_tp->snd_ssthresh)"),
    "snd_wnd": ("%u", "$s_tp->snd_wnd"),
    "srtt_us": ("%u", "($s_tp->srtt_us >> 3)"),
    "rttvar_us": ("%u", "($s_tp->mdev_us >> 2)"),
    "rto_ms": ("%d", "({hz} > 0 ? (int64)((uint64)$s_icsk->icsk_rto * 1000 / (uint64){hz}) "
                     ": (int64)-1)"),
    "lost": ("%u", "$s_tp->lost_out"),
    "retrans": ("%u", "$s_tp->retrans_out"),
    "total_retrans": ("%u", "$s_tp->total_retrans"),
    "inflight": ("%u", "(($s_tp->packets_out + $s_tp->retrans_out - $s_tp->sacked_out "
                       "- $s_tp->lost_out) & 0xffffffff)"),
    "rqueue": ("%u", "(($s_tp->rcv_nxt - $s_tp->copied_seq) & 0xffffffff)"),
    "wqueue": ("%u", "(($s_tp->write_seq - $s_tp->snd_una) & 0xffffffff)"),
    "snd_nxt": ("%u", "$s_tp->snd_nxt"),
    "snd_una": ("%u", "$s_tp->snd_una"),
    "mss": ("%u", "$s_tp->mss_cache"),
}
SAMPLE_PARAMS = 3       # after the filters: period (us), --on-cwnd-change (0/1), HZ
# The program writes each sample as "Q NUMBER S-record": NUMBER counts the connection's
# samples from 1 (SampleOrder).
SEQUENCED = "Q"


def sample_context(plan) -> dict | None:
    """The template's --sample block: where its positional parameters are, the S
    records' formats and the fields' expressions (None: no sampling)."""
    if plan.sample_ms is None:
        return None
    at = 3 + len(plan.filters) * PER_FILTER
    period, cwnd, hz = (f"${at + i}" for i in range(SAMPLE_PARAMS))
    pairs = "".join(f"\\t{n}={BT_SFIELDS[n][0]}" for n in SAMPLE_FIELDS)
    return {"period": period, "cwnd": cwnd,
            "fmt": {e: f"{SEQUENCED}\\t%d\\t" + _bt_string(SAMPLE.printf(EVENT=e)) + pairs
                    + "\\n" for e in ("ack", "end")},
            "values": [BT_SFIELDS[n][1].format(hz=hz) for n in SAMPLE_FIELDS]}


class SampleOrder:
    """Puts each connection's samples back in the order they were taken. bpftrace 0.17
    prints through one perf buffer per CPU and reads them in turn, so the samples of a
    connection taken on two CPUs can come out swapped (stap's come in time order). Each
    comes numbered (SEQUENCED); one that comes early waits for those before it, and an R
    record of the connection that comes meanwhile waits behind them. A number that never
    comes (bpftrace lost events) holds the rest until :meth:`rest`."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}             # tuple -> the number it waits for
        self._held: dict[str, dict[int, str]] = {}  # tuple -> {number: S record}, early
        self._behind: dict[str, list[str]] = {}     # tuple -> R records after those

    def feed(self, line: str) -> list[str]:
        """The records ``line`` lets out, in order."""
        if line.startswith(SEQUENCED + "\t"):
            _, number, record = line.split("\t", 2)
            return self._sample(int(number), record)
        if self._held and line.startswith("R\t"):
            key = _tuple_key(line, SOCKET)
            if key in self._held:
                self._behind.setdefault(key, []).append(line)
                return []
        return [line]

    def _sample(self, number: int, record: str) -> list[str]:
        key = _tuple_key(record, SAMPLE)
        if number != self._next.get(key, 1):
            self._held.setdefault(key, {})[number] = record
            return []
        held = self._held.pop(key, {})
        out = [record]
        while number + 1 in held:
            number += 1
            out.append(held.pop(number))
        if out[-1].split("\t", 2)[1] == "end":    # (a later socket of this tuple: from 1)
            self._next.pop(key, None)
        else:
            self._next[key] = number + 1
        if held:
            self._held[key] = held
            return out
        return out + self._behind.pop(key, [])

    def rest(self) -> list[str]:
        """What is still held, each connection's in its order (the stream ends)."""
        out = []
        for key, held in self._held.items():
            out += [held[n] for n in sorted(held)] + self._behind.pop(key, [])
        self._held.clear()
        return out


def _tuple_key(line: str, spec) -> str:
    """A record's FAMILY..RPORT fields, as written."""
    f = line.split("\t", spec.at("FAMILY") + 7)
    return "\t".join(f[spec.at("FAMILY"):spec.at("FAMILY") + 7])


def kernel_hz(configs: tuple[Path, ...] = ()) -> int:
    """The running kernel's CONFIG_HZ (icsk_rto and the RFC 4898 variables kept in jiffies
    count them), from its configuration (``configs``: where to look); 0 when none is
    readable (those are then left out)."""
    configs = configs or (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}"))
    for path in configs:
        try:
            raw = path.read_bytes()
            text = gzip.decompress(raw) if path.suffix == ".gz" else raw
        except OSError:
            continue
        m = re.search(rb"^CONFIG_HZ=(\d+)$", text, re.M)
        if m:
            return int(m.group(1))
    return 0


def sample_args(plan, hz: int) -> list[str]:
    """--sample's positional parameters (after the filters'): numbers only."""
    if plan.sample_ms is None:
        return []
    return [str(int(round(plan.sample_ms * 1000))), str(int(plan.on_cwnd_change)), str(int(hz))]


def interval_args(plan) -> list[str]:
    """--interval's positional parameters, after the filters': its ms and --count."""
    if plan.interval_s is None:
        return []
    return [str(int(round(plan.interval_s * 1000))), str(plan.count or 0)]


def _signed(text: str) -> int:
    """A map value as the signed 64-bit number it holds (CurrEstab goes below 0)."""
    v = int(text) & (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# events the kernel could not put in a full perf buffer (bpftrace read too slowly)
_LOST = re.compile(r"(WARNING: )?Lost \d+ events")
_RUNTIME_WARNING = re.compile(r"\S+\.bt:[\d:-]+ WARNING: (.*)\Z")
_DELETE_MISSING = "Can't delete map element because it does not exist"
_SOCKET_END = SOCKET.printf()       # (the R record's fields, as the program writes them)
_SOCKET_END2 = SOCKET_FORMAT2.printf()      # (and as programs of format 2 wrote them)
_MAP_LINE = re.compile(r"@(\w+)\[(-?\d+)\]: (.*)\Z")
_COUNT_LINE = re.compile(r"@(\w+): (\d+)\Z")
# a count by tuple: @t_COUNTER[FAMILY, LADDR high, low, LPORT, RADDR high, low, RPORT]: N
_TUPLE_LINE = re.compile(r"@t_(\w+)\[(-?\d+(?:, -?\d+){6})\]: (-?\d+)\Z")


class Ledger:
    """What the records written so far hold of each socket still open, by its identity
    (--interval: its serial, @sn; else its key): a snapshot, the end and its close then
    write only what came since. Without --interval nothing is written before the end,
    and the end writes everything."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.names = names                # the counters, in the order of since()'s values
        self.written: dict[str, list[int]] = {}
        self.stays: dict[str, dict[tuple[int, int], int]] = {}     # --dist: (state, bucket)
        self.closed: set[str] = set()     # serials closed since the last snapshot
        self.width = SOCKET.width         # fields before a record's counters (its format's)

    def since(self, ident: str, values: list[int | None]) -> tuple[list[int], bool]:
        """(what ``values`` add to the socket's records, whether it had none); a value
        None (its map had no entry for it: deleted as the socket closed; or not known in
        this snapshot) adds nothing."""
        prev = self.written.get(ident)
        base = prev or [0] * len(values)
        now = [b if v is None else v for b, v in zip(base, values)]
        self.written[ident] = now
        return [n - b for n, b in zip(now, base)], prev is None

    def stays_since(self, ident: str, stays: dict[tuple[int, int], int] | None
                    ) -> dict[tuple[int, int], int]:
        """--dist: the stays ``stays`` (the socket's so far; None: not known in this
        snapshot) add to its records."""
        if stays is None:
            return {}
        prev = self.stays.get(ident, {})
        self.stays[ident] = stays
        return {k: n - prev.get(k, 0) for k, n in stays.items() if n != prev.get(k, 0)}

    def close_record(self, line: str) -> str:
        """A close record the program wrote (after its head and the socket's serial), its
        counts (and --dist stays) less what earlier records of the socket hold."""
        _, serial, record = line.split("\t", 2)
        self.closed.add(serial)
        prev = self.written.pop(serial, None)
        stays = self.stays.pop(serial, {})
        f = record.rstrip("\n").split("\t")
        if prev is None:
            return record                 # (nothing written before)
        base = {**dict(zip(self.names, prev)),
                **{f"h.{s}.{b}": n for (s, b), n in stays.items()}}
        out = f[:self.width]
        for pair in f[self.width:]:
            name, eq, v = pair.partition("=")
            if not eq or not v.lstrip("-").isdigit():
                return record             # (the parser's to name)
            n = int(v) - base.get(name, 0)
            if n or not name.startswith("h."):
                out.append(f"{name}={n}")
        return "\t".join(out) + "\n"


_CD_LINE = re.compile(r"@cd\[(-?\d+), (\d+), (\d+)\]: (\d+)\Z")


def _bucket(us: int) -> int:
    """A stay's log2 bucket, as the program finds it: 2^b <= us < 2^(b+1); 0 and 1 in 0."""
    return max(us, 1).bit_length() - 1


class CongEnd:
    """--cong in a printout of the maps (END's; with --interval, each snapshot's): the
    stay still going of each socket is cut at the time the printout says (CA_NOW): its
    time so far joins its state's, and at the end it is one more stay in its histogram
    (--dist), as the stap collector does. ``@cs`` says each socket's state and since when,
    ``@cd`` its stays so far."""

    def __init__(self, dist: bool):
        self.dist = dist
        self.now_us: int | None = None
        self.stays: dict[str, dict[tuple[int, int], int]] = {}

    def add(self, line: str) -> bool:
        """Takes the printout's line if it is one of these."""
        line = line.rstrip("\n")
        if line.startswith(CA_NOW + "\t"):
            self.now_us = int(line.split("\t")[1])
            return True
        m = _CD_LINE.match(line)
        if m:
            key, state, bucket, n = m.groups()
            self.stays.setdefault(key, {})[int(state), int(bucket)] = int(n)
        return bool(m)

    def settle(self, key: str, cs: str | None, values: dict[str, int | None], end: bool
               ) -> dict[tuple[int, int], int] | None:
        """Adds the socket's stay still going to ``values`` (its counters so far); its
        stays so far. A snapshot is printed while the sockets live: a state that changed
        after CA_NOW (its since is later) may have reached some maps printed and not
        others, so the socket's congestion counters and stays are not known this time
        (None): the next snapshot, its close or the end has them."""
        stays = dict(self.stays.get(key, {}))
        if cs is None or self.now_us is None:
            return stays
        v = int(cs)
        state, since = v & 7, v >> 3
        if since > self.now_us:
            for c in CA_COUNTERS:
                if c in values:
                    values[c] = None
            return None
        us = self.now_us - since
        name = CA_TIME_COUNTERS[state]
        values[name] = (values.get(name) or 0) + us
        if end and self.dist:
            b = _bucket(us)
            stays[state, b] = stays.get((state, b), 0) + 1
        return stays


class EndDump:
    """Reads a printout of the per-socket maps (``print(@map)`` of each: END's, and with
    --interval each snapshot's, whose serials come again after :meth:`recheck`) and
    writes the records of the sockets in it."""

    def __init__(self, available: tuple[str, ...], dist: bool = False, place: bool = True):
        self.available = available
        self.place = place          # the records have CGROUP and NETNS (format 3 and later)
        self.maps: dict[str, dict[str, str]] = {}
        self.cong = CongEnd(dist)
        self.check: dict[str, str] | None = None     # the serials printed again
        self.counts: dict[str, int] = {}              # END's counts (@untracked, @unmarked)
        self.tuples: dict[str, dict[str, int]] = {}   # tuple -> its counts by tuple

    def add(self, line: str) -> None:
        if self.cong.add(line):
            return
        text = line.rstrip("\n")
        if (t := _TUPLE_LINE.match(text)):
            self.tuples.setdefault(t.group(2), {})[t.group(1)] = int(t.group(3))
            return
        m = _MAP_LINE.match(text)
        if m and self.check is not None:
            self.check[m.group(2)] = m.group(3)
        elif m:
            self.maps.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
        elif (c := _COUNT_LINE.match(text)):
            self.counts[c.group(1)] = int(c.group(2))

    def recheck(self) -> None:
        self.check = {}

    def records(self, reason: str = "end", ledger: Ledger | None = None) -> list[str]:
        """The records of the sockets printed, ``reason`` theirs (``close`` for those that
        closed after the run was finishing, @closed). In a snapshot, a socket whose serial
        changed or went while it was printed (it closed) is left to its close record."""
        out = []
        get = self.maps.get
        ledger = ledger or Ledger(self.available)
        serials, closed, pids = get("sn", {}), get("closed", {}), get("pid", {})
        for key, tup in get("tup", {}).items():
            ident = serials.get(key, key)
            if ident in ledger.closed or (
                    self.check is not None and self.check.get(key, "") != serials.get(key)):
                continue
            values = {c: get(f"c_{c}", {}).get(key) for c in self.available}
            values = {c: None if v is None else _signed(v) for c, v in values.items()}
            stays = self.cong.settle(key, get("cs", {}).get(key), values, reason != "interval")
            delta, new = ledger.since(ident, [values[c] for c in self.available])
            counts = dict(zip(self.available, delta))
            hist = [f"h.{s}.{b}={n}" for (s, b), n in sorted(ledger.stays_since(ident, stays)
                                                             .items())]
            if not any(counts.values()) and not hist and key not in closed and not (
                    new and key in pids):
                continue                    # (nothing counted since; or resolved, nothing)
            tuple_ = (int(x) & (1 << 64) - 1 for x in tup.strip("()").split(","))
            head = (_SOCKET_END if self.place else _SOCKET_END2) % (
                "close" if key in closed else reason, *tuple_, int(pids.get(key, "0")),
                get("comm", {}).get(key, ""), int(get("intree", {}).get(key, "0")),
                *(self._place(key) if self.place else ()))
            out.append("\t".join([head, *(f"{c}={v}" for c, v in counts.items()), *hist])
                       + "\n")
        return out + self._tuple_records(reason, ledger)

    def _tuple_records(self, reason: str, ledger: Ledger) -> list[str]:
        """A record for each tuple counted by its segments (TUPLE_COUNTERS), with what came
        since its last one: no process, cgroup or netns (the rows of its sockets have them)."""
        out = []
        for key, counts in self.tuples.items():
            delta, _ = ledger.since("t" + key, [counts.get(c) for c in self.available])
            if not any(delta):
                continue
            tuple_ = (int(x) & (1 << 64) - 1 for x in key.split(", "))
            head = (_SOCKET_END if self.place else _SOCKET_END2) % (
                reason, *tuple_, 0, "", 0, *((0, 0) if self.place else ()))
            out.append("\t".join([head, *(f"{c}={v}" for c, v in zip(self.available, delta))])
                       + "\n")
        return out

    def _place(self, key: str) -> tuple[int, int]:
        """The socket's cgroup id and netns inode (0: not known)."""
        return tuple(int(self.maps.get(m, {}).get(key, "0")) & (1 << 64) - 1
                     for m in _PLACE_MAPS)

    @staticmethod
    def trailer(line: str, written: int) -> str:
        """The trailer, its IDS counting the records written here too."""
        f = line.rstrip("\n").split("\t")
        f[TRAILER.at("IDS")] = str(int(f[TRAILER.at("IDS")]) + written)
        return "\t".join(f) + "\n"


# ---- --rfc4898: the RFC 4898 variables of each connection as it closes ----
# Each variable of tcpipstat/estats.py as a bpftrace expression on $tp, the closing
# socket's struct tcp_sock ($icsk: the same socket as an inet_connection_sock), and what
# it reads: "struct.member" of the kernel's BTF, and "HZ" for what the kernel keeps in
# jiffies. Names, units and meanings are the SystemTap collector's (render.py,
# STAP_EVARS). A variable whose members this kernel's BTF lacks (tp->total_rto before
# Linux 6.7, ...) is left out of the program and written -1 (n/a), never guessed.
# (bpftrace 0.17 reads the bitfields of tp->rx_opt through BTF: the native tier checks
# them against getsockopt(TCP_INFO).)
_MSS = "(int64)$tp->mss_cache"


def _tp(member: str) -> tuple[str, tuple[str, ...]]:
    return f"$tp->{member}", (f"tcp_sock.{member}",)


def _rx(bits: str) -> tuple[str, tuple[str, ...]]:
    return f"$tp->rx_opt.{bits}", ("tcp_sock.rx_opt", f"tcp_options_received.{bits}")


BT_EVARS: dict[str, tuple[str, tuple[str, ...]]] = {
    "SegsOut": _tp("segs_out"), "DataSegsOut": _tp("data_segs_out"),
    "DataOctetsOut": _tp("bytes_sent"), "SegsRetrans": _tp("total_retrans"),
    "OctetsRetrans": _tp("bytes_retrans"), "SegsIn": _tp("segs_in"),
    "DataSegsIn": _tp("data_segs_in"),
    "SmoothedRTT": ("$tp->srtt_us >> 3", ("tcp_sock.srtt_us",)),
    "CurRTO": ("(uint64)$icsk->icsk_rto * 1000 / HZ", ("inet_connection_sock.icsk_rto", "HZ")),
    "CurMSS": _tp("mss_cache"),
    "CurCwnd": (f"(int64)$tp->snd_cwnd * {_MSS}", ("tcp_sock.snd_cwnd", "tcp_sock.mss_cache")),
    "CurSsthresh": (f"$tp->snd_ssthresh >= 0x7fffffff ? (int64)-1 : "
                    f"(int64)$tp->snd_ssthresh * {_MSS}",
                    ("tcp_sock.snd_ssthresh", "tcp_sock.mss_cache")),
    # tcp_packets_in_flight(), signed as stap computes it
    "PipeSize": (f"((int64)$tp->packets_out - (int64)$tp->sacked_out - (int64)$tp->lost_out"
                 f" + (int64)$tp->retrans_out) * {_MSS}",
                 tuple(f"tcp_sock.{m}" for m in ("packets_out", "sacked_out", "lost_out",
                                                 "retrans_out", "mss_cache"))),
    "Timeouts": _tp("total_rto"), "CurRwinSent": _tp("rcv_wnd"),
    "CurRwinRcvd": _tp("snd_wnd"), "MaxRwinRcvd": _tp("max_window"),
    # (chrono_stat[i - 1]: TCP_CHRONO_RWND_LIMITED is 2, TCP_CHRONO_SNDBUF_LIMITED 3)
    "SndLimTimeRwin": ("(uint64)$tp->chrono_stat[1] * 1000 / HZ", ("tcp_sock.chrono_stat", "HZ")),
    "SndLimTimeSnd": ("(uint64)$tp->chrono_stat[2] * 1000 / HZ", ("tcp_sock.chrono_stat", "HZ")),
    "MinRTT": ("$tp->rtt_min.s[0].v == 0xffffffff ? (int64)-1 : (int64)$tp->rtt_min.s[0].v",
               ("tcp_sock.rtt_min", "minmax.s", "minmax_sample.v")),
    "MSSSent": _tp("advmss"), "MSSRcvd": _rx("mss_clamp"),
    "WinScaleSent": _rx("rcv_wscale"), "WinScaleRcvd": _rx("snd_wscale"),
    "SACK": ("$tp->rx_opt.sack_ok != 0", _rx("sack_ok")[1]),
    "TimeStamps": _rx("tstamp_ok"),
    "ECN": ("$tp->ecn_flags & 1", ("tcp_sock.ecn_flags",)),     # (TCP_ECN_OK)
    "DSACKDups": _tp("dsack_dups"), "MaxReordering": _tp("reordering"),
    "SndUna": _tp("snd_una"), "SndNxt": _tp("snd_nxt"), "RcvNxt": _tp("rcv_nxt"),
    "ThruOctetsAcked": _tp("bytes_acked"), "ThruOctetsReceived": _tp("bytes_received"),
}
_BTF_STRUCTS = frozenset(m.split(".")[0] for _, needs in BT_EVARS.values()
                         for m in needs if m != "HZ")
ESTATS_PIECE = 10       # variables a printf (one of all 34 exceeds the 512-byte BPF stack)


@dataclass(frozen=True)
class EstatsRead:
    """What the program reads for --rfc4898: these variables (in EVARS order), HZ."""
    names: tuple[str, ...]
    hz: int
    left_out: dict[str, str] = field(hash=False, default_factory=dict)   # name -> why


def btf_members(listing: str) -> set[str]:
    """"struct.member" of the structs BT_EVARS reads, from ``bpftrace -lv 'struct *'``."""
    members, struct = set(), None
    for line in listing.splitlines():
        m = re.match(r"struct (\w+) \{$", line)
        if m:
            struct = m.group(1) if m.group(1) in _BTF_STRUCTS else None
        elif struct and line.startswith("\t") and not line.startswith("\t\t"):
            m = re.search(r"(\w+)(\[\d*\])*(: \d+)?;$", line)
            if m:
                members.add(f"{struct}.{m.group(1)}")
    return members


def estats_read(members: set[str] | None, hz: int) -> EstatsRead:
    """The variables whose every member is in ``members`` (None: all are), and HZ known."""
    have = (members if members is not None else
            {m for _, needs in BT_EVARS.values() for m in needs}) | ({"HZ"} if hz else set())
    left_out = {}
    for name, (_, needs) in BT_EVARS.items():
        missing = [m for m in needs if m not in have]
        if missing:
            left_out[name] = ("HZ unknown (no kernel config)" if missing == ["HZ"] else
                              "not in this kernel's BTF: " + ", ".join(missing))
    return EstatsRead(tuple(n for n in BT_EVARS if n not in left_out), hz, left_out)


def host_estats(cmd: list[str], hz: int | None = None) -> EstatsRead:
    """What bpftrace can read on this kernel (its BTF, as bpftrace lists it; its HZ:
    ``hz``, else read here)."""
    try:
        res = subprocess.run([*cmd, "-lv", "struct *"], capture_output=True, text=True,
                             errors="replace", timeout=120)
        listing = res.stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    members = btf_members(listing)
    if not any(m.startswith("tcp_sock.") for m in members):
        raise EnvironmentNotReady("bpftrace finds no struct tcp_sock in this kernel's BTF "
                                  "(--rfc4898 reads it)",
                                  "a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    return estats_read(members, kernel_hz() if hz is None else hz)


def estats_template(est: EstatsRead) -> dict:
    """The template's printf formats and arguments for the E record's pieces: piece 0 the
    record's head, then ESTATS_PIECE variables a piece (:class:`EstatsJoin`)."""
    names = est.names
    chunks = [names[i:i + ESTATS_PIECE] for i in range(0, len(names), ESTATS_PIECE)]
    last = len(chunks)
    head = f"e\t%lx\t0/{last}\t{ESTATS.printf()}\n"
    pieces = [(_bt_string(f"e\t%lx\t{i}/{last}\t" + "\t".join(f"{n}=%ld" for n in chunk)
                          + "\n"),
               [BT_EVARS[n][0].replace("HZ", str(est.hz)) for n in chunk])
              for i, chunk in enumerate(chunks, 1)]
    return {"head": _bt_format(head), "pieces": pieces}


class EstatsJoin:
    """Joins the pieces the program prints of each E record into the record: bpftrace reads
    each CPU's output apart, so another CPU's lines can come between two printf()s of one
    probe; each piece says its socket and place (``e KEY I/LAST TEXT``), and the record
    is written once whole, every variable of EVARS in order, -1 for those left out."""

    def __init__(self):
        self._open: dict[str, list[str]] = {}
        self.heads = self.whole = 0

    def add(self, line: str) -> str | None:
        _, key, at, text = line.rstrip("\n").split("\t", 3)
        i, last = (int(x) for x in at.split("/"))
        if i == 0:
            self.heads += 1
            self._open[key] = []
        parts = self._open.get(key)
        if parts is None or len(parts) != i:       # (a piece before it was lost)
            self._open.pop(key, None)
            return None
        parts.append(text)
        if i < last:
            return None
        del self._open[key]
        self.whole += 1
        values = dict(p.split("=", 1) for p in "\t".join(parts[1:]).split("\t") if p)
        return "\t".join([parts[0], *(f"{v.name}={values.get(v.name, '-1')}"
                                      for v in EVARS)]) + "\n"


# The program's cgroup read: sk_cgrp_data has held the socket's cgroup pointer as a field
# of its own since Linux 5.15 (commit 8520e224f547, "bpf, cgroups: Fix cgroup v2 fallback
# on v1/v2 mixed mode"); before, a union that the program cannot read the same way.
_CGROUP_READ = ("tracepoint:sock:inet_sock_set_state { $s = (struct sock *)args->skaddr; "
                "@c = $s->sk_cgrp_data.cgroup->kn->id; }")


def cgroup_readable(cmd: list[str], timeout: float = 600) -> bool:
    """Can the program read a socket's cgroup on this kernel? Asked of ``cmd`` (bpftrace or
    its stand-in), which compiles the read without loading it: ``--dry-run`` (bpftrace
    0.18 and later) or ``-d`` (0.17). No answer is no: the records then say 0, unknown."""
    for flag in ("--dry-run", "-d"):
        try:
            res = subprocess.run([*cmd, flag, "-e", _CGROUP_READ], capture_output=True,
                                 text=True, errors="replace", timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if res.returncode == 0:
            return True
    return False


# What the kernel and bpftrace answered (the points, whether the cgroup reads), kept for
# the boot: asking takes bpftrace starts, and the dry run's compile alone ~1 s, before the
# program's own compile can begin. Keyed by the boot, the bpftrace binary and its version,
# and by what is asked (a tcpipstat that lists more, or reads the cgroup otherwise, asks anew).
FACTS_DIR = Path("/run/tcpipstat")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def facts_path(cmd: list[str], version: str) -> Path | None:
    """Where this boot's answers of ``cmd`` are kept (None: cannot say which boot)."""
    try:
        exe = Path(shutil.which(cmd[0]) or cmd[0]).resolve()
        key = (f"{BOOT_ID.read_text().strip()} {exe} {exe.stat().st_mtime_ns} {version} {cmd}"
               f" {LISTINGS} {_CGROUP_READ}")
    except OSError:
        return None
    return FACTS_DIR / f"bpftrace-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _kept_facts(path: Path) -> tuple[KernelPoints | None, bool | None]:
    """What an earlier run of this boot kept at ``path``: its points (None: nothing
    readable) and whether the cgroup reads (None: not asked)."""
    try:
        kept = json.loads(path.read_text())
        points = KernelPoints({k: frozenset(v) for k, v in kept["points"].items()})
        return points, kept["cgroup"] and True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


def kernel_facts(cmd: list[str], path: Path | None,
                 cgroup_wanted: bool = True) -> tuple[KernelPoints, bool]:
    """This kernel's probe points and whether its sockets' cgroup reads
    (:func:`cgroup_readable`, asked only if ``cgroup_wanted``: its dry run's BTF parse
    takes a CPU from the listings): kept at ``path`` once asked (None: asked each time)."""
    points, cgroup = _kept_facts(path) if path else (None, None)
    if points is not None and (cgroup or not cgroup_wanted):
        return points, bool(cgroup)
    # (the dry run's BTF parse and the template's compilation: while bpftrace lists)
    with ThreadPoolExecutor(2) as pool:
        readable = pool.submit(cgroup_readable, cmd) if cgroup_wanted else None
        pool.submit(_template)
        points = points if points is not None else list_points(cmd)
        cgroup = readable.result() if readable else None
    if path:
        _keep_facts(path, points, cgroup)
    return points, bool(cgroup)


def _keep_facts(path: Path, points: KernelPoints, cgroup: bool | None) -> None:
    """Keep the answers at ``path``; a no to the cgroup is kept as not asked: it is asked
    again (it may be a dry run that failed to start)."""
    data = {"points": {k: sorted(v) for k, v in points.fields.items()}, "cgroup": cgroup or None}
    try:        # (written whole, then renamed: a reader never sees half of it)
        path.parent.mkdir(mode=0o755, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}")
        part.write_text(json.dumps(data))
        part.replace(path)
    except OSError:
        pass


def ensure_tracefs(root: Path = TRACEFS) -> None:
    """Tracepoints attach through tracefs: mount it when it is not (root only)."""
    if (root / "events").is_dir():
        return
    if os.geteuid() == 0:
        res = subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)],
                             capture_output=True, text=True)
        if res.returncode == 0 and (root / "events").is_dir():
            return
    raise EnvironmentNotReady(f"tracefs is not mounted on {root}", TRACEFS_FIX)


def bpftrace_version(cmd: list[str]) -> tuple[str, str]:
    """(the version ``cmd --version`` prints, or what it printed; why tcpipstat cannot use
    that bpftrace, in one line: "" when it can)."""
    try:
        res = subprocess.run([*cmd, "--version"], capture_output=True, text=True,
                             errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", f"cannot run '{' '.join(cmd)} --version': {e}"
    said = (res.stdout.strip() or res.stderr.strip() or "nothing").splitlines()[0][:80]
    m = _VERSION.search(said)
    if m is None:
        return said, (f"cannot tell the bpftrace version from '{said}' (tcpipstat needs "
                      f"{_NEED} or later)")
    if version_tuple(m.group(0)) < MIN_VERSION:
        return m.group(0), f"bpftrace {m.group(0)} is too old: tcpipstat needs {_NEED} or later"
    return m.group(0), ""


def kernel_of(cmd: list[str]) -> str:
    """The release of the kernel ``cmd`` runs its programs on, from the "OS: Linux RELEASE"
    line of its --info (a stand-in's, whose kernel is not this host's); "" when it does not
    say (a saved run then names no kernel rather than a wrong one)."""
    try:
        res = subprocess.run([*cmd, "--info"], capture_output=True, text=True,
                             errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = _OS_LINE.search(res.stdout + res.stderr)
    return m.group(1) if m else ""


def print_race_note(plan, version: str) -> str:
    """What a run of ``plan`` risks on bpftrace ``version`` from PRINT_RACE ("": nothing)."""
    if plan.interval_s is None or version_tuple(version) >= PRINT_RACE_FIXED:
        return ""
    return (f"bpftrace {version}: a socket that closes while a snapshot is printed can stop "
            "this run (bpftrace 0.19 reads past it; the report keeps what came before)")


def version_tuple(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version bpftrace_version() found ("v0.17.0", "0.20")."""
    m = _VERSION.match(version)
    if m is None:
        raise ValueError(f"not a bpftrace version: {version!r}")
    major, minor, patch = m.groups()
    return int(major), int(minor), int(patch or 0)


def _header_format(line: str) -> int:
    """The FORMAT of a header line (0 if it does not say)."""
    f = line.split("\t")
    at = HEADER.at("FORMAT")
    return int(f[at]) if len(f) > at and f[at].isdigit() else 0


def boot_to_wall_ms() -> int:
    """What turns bpftrace's ``nsecs / 1000000`` (CLOCK_BOOTTIME since bpftrace 0.12) into
    the wall-clock milliseconds the records' times are (stap's gettimeofday_ms): -T and
    the JSON and CSV snapshots print them as times of day. The clocks' difference is taken
    in ns, the boot clock read on both sides of the wall clock, and only then cut to a ms:
    the same number on every call of a boot (a difference of two ms readings was one ms
    more or less by the instant of the call, so a run's times moved by it)."""
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wall = time.time_ns()
    boot = (boot + time.clock_gettime_ns(time.CLOCK_BOOTTIME)) // 2
    return (wall - boot) // 1_000_000


def shift_ms(line: str, at: int, offset: int) -> str:
    """The record ``line`` with its field ``at`` (milliseconds) moved by ``offset`` (a line
    without that number is left to the parser to name)."""
    f = line.rstrip("\n").split("\t")
    if len(f) <= at or not f[at].isdigit():
        return line
    f[at] = str(int(f[at]) + offset)
    return "\t".join(f) + "\n"


class CloseCong:
    """--cong: a closing socket's congestion times (and --dist stays) come just before its
    record, on lines of their own keyed by the socket (lines from other CPUs may come in
    between); its record, keyed too, gets them as NAME=VALUE fields."""

    def __init__(self):
        self.pending: dict[str, list[str]] = {}

    def take(self, line: str) -> str | None:
        """The record a CA_LINES line completes, else None (its fields were kept)."""
        kind, key, *fields = line.rstrip("\n").split("\t")
        if kind != CA_CLOSE:
            self.pending.setdefault(key, []).extend(fields)
            return None
        return "\t".join([*fields, *self.pending.pop(key, [])]) + "\n"


_PIDFD_GETFD = 438      # (the syscall's number on every architecture but alpha; Linux 5.6)


class ProgramMisses:
    """Probe hits the kernel ran no program for because a BPF program was already
    running on that CPU (its recursion guard: another tool's program, or one of ours that
    a softirq interrupted). The kernel counts them per program (fdinfo's
    recursion_misses). bpftrace closes its programs before END, so tcpipstat takes copies
    of their descriptors (pidfd_getfd) once they are attached and reads them at the end."""

    def __init__(self):
        self.fds: list[int] = []

    def hold(self, pid: int) -> None:
        """Copies of bpftrace's program descriptors (none where the kernel refuses)."""
        if self.fds:
            return
        syscall = ctypes.CDLL(None, use_errno=True).syscall
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                        continue
                except OSError:
                    continue
                mine = syscall(_PIDFD_GETFD, pidfd, int(fd), 0)
                if mine >= 0:
                    self.fds.append(mine)
        finally:
            os.close(pidfd)

    def count(self) -> int:
        """Their misses, the copies closed."""
        total = 0
        for fd in self.fds:
            m = re.search(r"^recursion_misses:\s*(\d+)",
                          Path(f"/proc/self/fdinfo/{fd}").read_text(), re.M)
            total += int(m.group(1)) if m else 0
            os.close(fd)
        self.fds = []
        return total


# The perf buffers bpftrace reads the records from: 64 pages per CPU by default, some 1,300
# close records, which a connection churn fills before a busy host schedules bpftrace to
# read them ("Lost N events": 3,000 connections made in 0.2 s lost up to half of their
# records). Pages per CPU: a power of two (the kernel's rule), 4 MiB at most, 64 MiB in all.
# (bpftrace 0.23 sizes its one ring buffer by it: pages in all, not per CPU.)
PERF_RB_MAX_PAGES, PERF_RB_TOTAL_PAGES = 1024, 16384


def perf_rb_pages(cpus: int) -> int:
    """BPFTRACE_PERF_RB_PAGES for a host of ``cpus`` CPUs."""
    pages = min(PERF_RB_MAX_PAGES, PERF_RB_TOTAL_PAGES // max(cpus, 1))
    return max(64, 1 << (pages.bit_length() - 1))


class Runner(CollectorProcess):
    """bpftrace PROGRAM ARGS, its stdout streamed as records."""
    program = "bpftrace"
    install_hint = INSTALL_HINT

    def __init__(self, cmd: list[str], available: tuple[str, ...], max_sockets: int,
                 echo_stderr: Callable[[str], None], dist: bool = False):
        super().__init__(cmd, echo_stderr,
                         # (bpftrace 0.21 renamed the variable; the old name still works)
                         {**os.environ, "BPFTRACE_MAP_KEYS_MAX": str(max_sockets),
                          "BPFTRACE_MAX_MAP_KEYS": str(max_sockets),
                          "BPFTRACE_PERF_RB_PAGES": str(perf_rb_pages(os.cpu_count() or 1))})
        self._available, self._dist = available, dist
        self._place = True              # (the header says otherwise: _closes)
        self._ledger = Ledger(available)
        self._count = 0                 # records written here (the trailer's IDS adds them)
        self._wall = boot_to_wall_ms()
        self._context = 0           # lines of a runtime warning's context still to come
        self._order = SampleOrder()
        self._cong = CloseCong()
        self._misses = ProgramMisses()
        self._estats = EstatsJoin()
        self.on_end: Callable[[], None] | None = None   # told where END begins

    def classify(self, line: str) -> bool:
        """bpftrace's memlock warning (said on every start: dropped), lost events, and a
        snapshot that bpftrace before 0.19 could not print (its error, the run's problem)."""
        if "RLIMIT_MEMLOCK" in line or "BPFTRACE_MAP_KEYS_MAX is deprecated" in line:
            return True
        if _LOST.match(line):
            self.outcome.warnings.append(line.removeprefix("WARNING: "))
            return True
        if _PRINT_RACE.match(line):     # (the error names the cause and the fix)
            self.outcome.problem = PRINT_RACE
            return True
        return self.outcome.problem is PRINT_RACE and line.startswith(_PRINT_RACE_AFTER)

    def lines(self) -> Iterator[str]:
        """The records; the programs' misses, at the end, as skipped probe hits."""
        try:
            for line in self._records(self.stream()):
                if line.startswith("H\t") and self._proc:     # (attached by now)
                    self._misses.hold(self._proc.pid)
                yield line
        finally:
            self.outcome.skipped += self._misses.count()
        broken = self._estats.heads - self._estats.whole
        if broken:
            self.outcome.warnings.append(f"{broken} RFC 4898 records lost a piece (left out)")

    def _records(self, stdout) -> Iterator[str]:
        """The program's lines as records. A printout of the maps becomes the records of
        its sockets; a close record read while one is printed waits for its end (the
        printout's values were read around it); the trailer comes last, as close records
        bpftrace had not read yet when END ran come after END's printout."""
        dump: EndDump | None = None
        mark: list[str] = []            # a snapshot's number and time
        held: list[str] = []            # close records read during a printout
        trailer = ""
        for line in self._ordered(stdout):
            if dump is None and line.startswith("R\t"):   # (most lines: as they are)
                yield line
                continue
            text = line.rstrip("\n")
            if text == STOP_MARK:
                self._ended()
            elif text.startswith((CLOSE_HEAD, "R\t", "S\t")) and dump is not None:
                held.append(line)
            elif text == MARKS["check"] and dump is not None:
                dump.recheck()
            elif text == MARKS["end"] and dump is not None:
                yield from self._snapshot(dump, mark)
                dump = None
                yield from self._closes(held)
            elif text.startswith("T\t") and dump is not None:
                yield from self._written(dump.records("end", self._ledger))
                self.outcome.untracked = dump.counts.get("untracked", 0)
                self.outcome.untracked_events = dump.counts.get("unmarked", 0)
                trailer, dump = shift_ms(line, TRAILER.at("END_MS"), self._wall), None
            elif dump is not None:
                dump.add(line)
            elif trailer and _COUNT_LINE.match(text):
                continue                  # (bpftrace prints its count() maps again as it exits)
            elif text.startswith(MARKS["begin"] + "\t"):
                dump, mark = EndDump(self._available, self._dist, self._place), text.split("\t")[1:]
            elif text == END_MARK:
                self._ended()       # (unless said before: its probes are detached by now)
                dump = EndDump(self._available, self._dist, self._place)
            else:
                yield from self._closes([line])
        yield from self._closes(held)
        if trailer:
            yield EndDump.trailer(trailer, self._count)

    def _ended(self) -> None:
        """Collection ended here (tcpipstat/reconcile.py's end snapshot: the first call)."""
        if self.on_end:
            self.on_end()

    def _snapshot(self, dump: EndDump, mark: list[str]) -> Iterator[str]:
        """An interval's records, then its mark (I) at the time the program took it."""
        yield from self._written(dump.records("interval", self._ledger))
        self._ledger.closed.clear()     # (a socket closed before it cannot be in the next)
        seq, ms = (int(x) for x in mark)
        yield INTERVAL.printf() % (seq, ms + self._wall)

    def _written(self, records: list[str]) -> list[str]:
        self._count += len(records)
        return records

    def _closes(self, lines: list[str]) -> Iterator[str]:
        """Lines outside printouts: close records less what snapshots wrote of their
        sockets, the header at the wall clock's time, anything else as it is."""
        for line in lines:
            if line.startswith(CLOSE_HEAD + "\t") and line.count("\t") >= 2:
                yield self._ledger.close_record(line)
            elif line.startswith("H\t"):
                # (the records written here follow the format the header announces: a
                # printout recorded by an earlier version reads as it was written)
                self._place = _header_format(line) >= 3
                self._ledger.width = (SOCKET if self._place else SOCKET_FORMAT2).width
                yield shift_ms(line, HEADER.at("START_MS"), self._wall)
            elif line.strip():                # (bpftrace ends with blank lines)
                yield line
        lines.clear()

    def _ordered(self, stdout) -> Iterator[str]:
        """The program's lines less bpftrace's runtime warnings, each connection's samples
        in the order they were taken (SampleOrder: all of them before END's printout)."""
        for line in stdout:
            if line.startswith("R\t") and not self._context:    # (most lines)
                yield from self._order.feed(line)
                continue
            if self._runtime_warning(line):
                continue
            if _LOST.match(line):        # (0.17 says it on stdout, amid the records)
                self.classify(line.rstrip("\n"))
                continue
            if line.startswith("e\t"):            # --rfc4898: a piece of an E record
                line = self._estats.add(line) or ""
                if not line:
                    continue
            if line.startswith(CA_LINES):         # (a close's, even after END began)
                line = self._cong.take(line) or ""
                if not line:
                    continue
            if line.rstrip("\n") == END_MARK:
                yield from self._order.rest()
                yield line
            else:
                yield from self._order.feed(line)
        yield from self._order.rest()       # (bpftrace stopped before END: what waits)

    def _runtime_warning(self, line: str) -> bool:
        """A warning bpftrace writes on stdout while the program runs (0.21 and later): its
        first line, then up to three of context (helper, retcode; the program's line; a
        ~~~ marker). One comes for each delete() of a key a map does not hold, which is
        expected (most of a socket's maps hold nothing for it) and dropped; any other is
        told, once."""
        text = _ANSI.sub("", line).rstrip()
        if self._context:
            self._context = 0 if text.strip(" ~") == "" else self._context - 1
            return True
        m = _RUNTIME_WARNING.match(text)
        if not m:
            return False
        self._context = 3
        why = m.group(1)
        if not why.startswith(_DELETE_MISSING) and why not in self.outcome.warnings:
            self.outcome.warnings.append(why)
        return True

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT makes bpftrace run END (the records); a second: SIGTERM."""
        first = not self.outcome.interrupted
        self.outcome.interrupted = True
        if first:
            self._ended()        # (bpftrace stops counting as SIGINT comes)
        self.signal(signal.SIGINT if first else signal.SIGTERM)


# The footer's reason for the counters this collector leaves out
WHY_UNAVAILABLE = "no tracepoint counts it exactly, nor a kfunc this kernel allows"


def _kernel_choice(cmd: list[str]) -> Choice | None:
    """What this kernel offers, asked of bpftrace (None if it cannot tell)."""
    try:
        return choose(list_points(cmd, timeout=120))
    except (OSError, subprocess.SubprocessError):
        return None


def _choice_text(choice: Choice) -> str:
    """Where this kernel's bytes are counted, for --check."""
    def where(point: str) -> str:
        return point or "nowhere (n/a)"
    def kfuncs(what: str) -> str:
        return "at kfuncs" if getattr(choice, what) else "nowhere (n/a)"
    rsts = {"tracepoint": "at tracepoint:tcp:tcp_send_reset", "kfunc": "at kfuncs"}
    paths = [p for p in (choice.sendpage, choice.splice_read, choice.zc_recv) if p]
    return (f"sends at {where(choice.send)}, receives at {where(choice.recv)}"
            + "".join(f", {p}" for p in paths) + "; "
            + "".join(f"{m}; " for m in missed_notes(choice, BPF_COUNTERS))
            + f"InSegs {kfuncs('insegs')}, OutRsts {rsts.get(choice.rsts, 'nowhere (n/a)')}, "
            f"DelayedACKs {kfuncs('dack')}, ListenDrops {kfuncs('listen')}; records as "
            + ("sockets are destroyed" if choice.destroy else "sockets close"))


def missed_notes(choice: Choice, available) -> list[str]:
    """What the ``available`` counters miss on this kernel (bt_points.Choice.missed): one
    sentence per pair of counters, for --check and the report's notes."""
    return [f"{' and '.join(names)} miss {' and '.join(paths)} on this kernel: BPF cannot "
            "attach to " + ("that function" if len(paths) == 1 else "those functions") + " here"
            for names, paths in _by_counters(choice.missed(), available).items()]


def ktls_notes(choice: Choice, available, sysfs: Path = Path("/sys/module")) -> list[str]:
    """Where this host has loaded the tls module: the kTLS paths the ``available``
    counters miss (bt_points.ktls_missed), one sentence per pair of counters."""
    if not (sysfs / "tls").is_dir():
        return []
    return [f"{' and '.join(names)} miss {' and '.join(paths)}: the tls module is loaded "
            "and this collector does not see those paths (the stap collector does)"
            for names, paths in _by_counters(ktls_missed(choice), available).items()]


def _by_counters(missed, available) -> dict[tuple[str, ...], list[str]]:
    """``missed`` (counters, path) pairs of the ``available`` counters, paths by counters."""
    by: dict[tuple[str, ...], list[str]] = {}
    for names, path in missed:
        if set(names) <= set(available):
            by.setdefault(names, []).append(path)
    return by


class BpftraceBackend:
    """The bpftrace collector (tcpipstat/backend.py's protocol)."""
    name = "bpftrace"

    def __init__(self, plan, echo_stderr: Callable[[str], None]):
        self.plan = plan
        self._echo = echo_stderr
        self.outcome = RunOutcome(program="bpftrace")
        self._runner: Runner | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.on_end: Callable[[], None] | None = None

    @property
    def same_host(self) -> bool:
        """A replaced bpftrace (the lab's) runs the program elsewhere: its sockets are not
        this host's."""
        return not os.environ.get("TCPIPSTAT_BPFTRACE")

    def prepare(self, log: Log) -> Prepared:
        plan = self.plan
        what = unsupported(plan)
        if what:
            raise UsageError(f"{what} is not supported by the bpftrace backend yet "
                             "(use --backend stap)")
        cmd = command_from_env("TCPIPSTAT_BPFTRACE", "bpftrace", INSTALL_HINT)
        version, problem = bpftrace_version(cmd)
        if problem:
            raise EnvironmentNotReady(problem, VERSION_FIX)
        kernel = os.uname().release if self.same_host else kernel_of(cmd)
        if os.geteuid() != 0:
            raise EnvironmentNotReady("collecting needs root (bpftrace loads BPF programs)",
                                      "run it with sudo, or use --dump-script to see the program")
        ensure_tracefs()
        if note := print_race_note(plan, version):
            log(note)
        log("asking bpftrace which probe points this kernel has...")
        # (a stand-in's kernel is not this boot's)
        points, cgroup = kernel_facts(cmd, facts_path(cmd, version) if self.same_host else None,
                                      plan.places_kept)
        choice = choose(points)
        if not cgroup and plan.places_kept:
            log("this kernel's sockets do not say their cgroup where bpftrace can read it: "
                "cgroups are unknown")
        available, unavailable = counters(plan.groups, missing_here(plan, choice))
        # (HZ: what samples' rto_ms and RFC 4898's jiffies are divided by; read once)
        hz = kernel_hz() if plan.sample_ms is not None or plan.estats else 0
        estats = host_estats(cmd, hz) if plan.estats else None
        self._tmp = tempfile.TemporaryDirectory(prefix="tcpipstat-")
        program = Path(self._tmp.name) / "tcpipstat.bt"
        place = plan.places_kept
        program.write_text(render_program(plan, choice, estats, cgroup and place, place))
        if plan.sample_ms is not None and not hz:
            log("rto_ms will not be sampled: this kernel's CONFIG_HZ is not readable "
                "(/proc/config.gz, /boot/config-RELEASE)")
        cmd += ["-q", str(program), *program_args(plan.filters, plan.timeout_s),
                *sample_args(plan, hz), *interval_args(plan)]
        if plan.command:
            # bpftrace splits -c at spaces without quoting: the command goes in a file.
            # Its output goes to stderr: bpftrace's stdout is the record stream.
            script = Path(self._tmp.name) / "command.sh"
            script.write_text("exec >&2\n" + plan.command + "\n")
            cmd += ["-c", f"/bin/sh {script}"]
        log(f"loading the bpftrace collector ({len(available)} counters; "
            f"{len(unavailable)} are not countable on this kernel)...")
        if estats:
            for name, why in estats.left_out.items():
                log(f"RFC 4898 {name} is n/a here: {why}")
        if "cong" in plan.groups and not choice.cong:
            log("this kernel has no tracepoint tcp:tcp_cong_state_set: the congestion "
                "counters are unavailable")
        self._runner = Runner(cmd, available, plan.max_sockets, self._echo,
                              plan.dist and "CaChanges" in available)
        self.outcome = self._runner.outcome
        ktls = ktls_notes(choice, available) if self.same_host else []
        for note in missed_notes(choice, available) + ktls:     # (partial, never a silent 0)
            log(note)
            self.outcome.warnings.append(note)
        why = WHY_UNAVAILABLE + (", or counted by segment with onclose=1" if plan.onclose
                                 else "")
        return Prepared(kernel, available, unavailable,
                        CONG_HOW if "CaChanges" in available else "", why)

    def lines(self) -> Iterator[str]:
        assert self._runner is not None, "prepare() first"
        self._runner.on_end = self.on_end
        try:
            yield from self._runner.lines()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    def interrupt(self) -> None:
        if self._runner is not None:
            self._runner.interrupt()

    @staticmethod
    def checks(kver: str, running: bool, groups: tuple[str, ...], host) -> tuple:
        """bpftrace (TCPIPSTAT_BPFTRACE, else on PATH) and its version, root, tracefs and BTF
        (bpftrace reads struct sock through it)."""
        from .check import Finding
        try:        # (the command a run would use)
            cmd = command_from_env("TCPIPSTAT_BPFTRACE", "bpftrace", INSTALL_HINT)
        except EnvironmentNotReady:
            cmd = []
        found = " ".join(cmd)
        choice = _kernel_choice(cmd) if cmd and running and os.geteuid() == 0 else None
        available, unavailable = counters(groups, choice.missing if choice else ASKED)
        fix = "'apt-get install bpftrace'", "'dnf install bpftrace'"
        findings = [Finding("bpftrace", bool(found), found or "not found on PATH", *fix)]
        if found:
            version, problem = bpftrace_version(cmd)
            findings.append(Finding("bpftrace version", not problem,
                                    problem or f"{version} ({_NEED} or later needed)",
                                    VERSION_FIX, VERSION_FIX))
        findings += [
            Finding("root", os.geteuid() == 0, "collecting loads BPF programs",
                    "run tcpipstat with sudo", "run tcpipstat with sudo"),
            Finding("tracefs", (TRACEFS / "events").is_dir() or None,
                    f"{TRACEFS} (tcpipstat mounts it when it is not)"),
            Finding("BTF", Path("/sys/kernel/btf/vmlinux").is_file() if running else None,
                    "/sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)",
                    "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                    "a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
        ]
        if choice is not None:
            findings.append(Finding("probe points", True, _choice_text(choice)))
        if not running:     # (-r is the stap collector's: bpftrace attaches to this kernel)
            findings.append(Finding("kernel", False, f"{kver} is not the running kernel: "
                                    "bpftrace collects on the running kernel only",
                                    "run --check on the host that runs it",
                                    "run --check on the host that runs it"))
        return findings, list(available), list(unavailable)
