"""The bpftrace collector: tracepoints only, for hosts that cannot load a SystemTap module.

The program is rendered from tcpipstat/bt_templates/tcpipstat.bt.j2. It counts what a
tracepoint can count exactly (BPF_COUNTERS); every other counter of the chosen groups
is reported unavailable. The filters and the timeout reach it as numbers (positional
parameters, :func:`program_args`): nothing the user types is in the program.

It writes the record stream of tcpipstat/records.py itself (header, each socket as it
closes, trailer), except the records of the sockets still open at the end: bpftrace
0.17 cannot loop over a map, so END prints its maps and :class:`EndDump` writes those
records.

``TCPIPSTAT_BPFTRACE`` replaces the ``bpftrace`` command (a command line, split like a
shell would).
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import jinja2

from . import __version__
from .backend import CollectorProcess, Log, Prepared, RunOutcome, command_from_env
from .counters import counters_for_units, units_for_groups
from .errors import EnvironmentNotReady, UsageError
from .estats import EVARS
from .filters import Filter
from .records import ESTATS, FORMAT_VERSION, HEADER, MAGIC, SOCKET, TRAILER

INSTALL_HINT = "install bpftrace: 'apt-get install bpftrace' or 'dnf install bpftrace'"
TRACEFS = Path("/sys/kernel/tracing")
TRACEFS_FIX = "mount it: 'mount -t tracefs nodev /sys/kernel/tracing' (as root)"

# The counters a tracepoint counts as the kernel's MIB does, and where (the template says
# how; the man page's FIELDS lists these beside the stap points)
BPF_POINTS = {
    "SendBytes": "tracepoint:sock:sock_send_length", "SendMsgs": "tracepoint:sock:sock_send_length",
    "RecvBytes": "tracepoint:sock:sock_recv_length", "RecvMsgs": "tracepoint:sock:sock_recv_length",
    **dict.fromkeys(("ActiveOpens", "PassiveOpens", "AttemptFails", "EstabResets", "CurrEstab"),
                    "tracepoint:sock:inet_sock_set_state"),
    "RetransSegs": "tracepoint:tcp:tcp_retransmit_skb",
}
BPF_COUNTERS = frozenset(BPF_POINTS)
PER_FILTER = 21          # numbers per filter (the template's header comment)
END_MARK = "tcpipstat-bpftrace-end"
# per-socket maps (deleted as a socket closes) and the run's own
_SOCKET_MAPS = ("ok", "tup", "n", "pid", "comm")
_GLOBAL_MAPS = ("start", "records", "dropped", "ended")


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tcpipstat", "bt_templates"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def unsupported(plan) -> str:
    """The first option this collector cannot do yet ("" if none)."""
    for what, on in (("--cong/--dist", "cong" in plan.groups),
                     ("--sample/--series/--plot", plan.sample_ms is not None),
                     ("--interval", plan.interval_s is not None),
                     ("-r/--kernel-release", plan.kernel_release is not None),
                     ("--stap-arg", bool(plan.stap_args))):
        if on:
            return what
    return ""


def counters(groups) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(available, unavailable) counters of ``groups``, in catalogue order."""
    wanted = counters_for_units(units_for_groups(groups))
    return (tuple(c for c in wanted if c in BPF_COUNTERS),
            tuple(c for c in wanted if c not in BPF_COUNTERS))


def _bt_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t").replace(
        "\n", "\\n")


def render_program(plan, estats: EstatsRead | None = None) -> str:
    """The bpftrace program for ``plan``: its groups, whether -c runs a command and how
    many filters there are shape it; their values are positional parameters. With
    --rfc4898, ``estats`` says which variables this kernel lets it read (None: every one
    this kernel's HZ allows, as --dump-script shows it)."""
    available, _ = counters(plan.groups)
    head = HEADER.printf(MAGIC=MAGIC, FORMAT=FORMAT_VERSION, VERSION=__version__,
                         MAX_SOCKETS=plan.max_sockets, COUNTERS=",".join(available))
    socket_maps = [*_SOCKET_MAPS, *(["intree"] if plan.command else []),
                   *(f"c_{c}" for c in available)]
    return _env().get_template("tcpipstat.bt.j2").render(
        version=__version__, counters=available, command=bool(plan.command),
        nfilters=len(plan.filters), per_filter=PER_FILTER, end_mark=END_MARK,
        fmt={"H": _bt_string(head), "R": _bt_string(SOCKET.printf()),
             "T": _bt_string(TRAILER.printf())},
        maps=socket_maps, dumped=[m for m in socket_maps if m not in ("ok", "n")],
        globals=[*_GLOBAL_MAPS, *(["tree"] if plan.command else [])],
        estats=estats_template(estats or estats_read(None, kernel_hz())) if plan.estats else None)


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


def _signed(text: str) -> int:
    """A map value as the signed 64-bit number it holds (CurrEstab goes below 0)."""
    v = int(text) & (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


_SOCKET_END = SOCKET.printf()       # (the R record's fields, as the program writes them)
_MAP_LINE = re.compile(r"@(\w+)\[(-?\d+)\]: (.*)\Z")


class EndDump:
    """Reads what END prints (``print(@map)`` of every per-socket map, then the trailer)
    and writes the records of the sockets still open."""

    def __init__(self, available: tuple[str, ...]):
        self.available = available
        self.maps: dict[str, dict[str, str]] = {}

    def add(self, line: str) -> None:
        m = _MAP_LINE.match(line.rstrip("\n"))
        if m:
            self.maps.setdefault(m.group(1), {})[m.group(2)] = m.group(3)

    def records(self) -> list[str]:
        out = []
        get = self.maps.get
        for key, tup in get("tup", {}).items():
            values = [_signed(get(f"c_{c}", {}).get(key, "0")) for c in self.available]
            if not any(values) and key not in get("pid", {}):
                continue                    # (resolved, nothing counted)
            tuple_ = (int(x) & (1 << 64) - 1 for x in tup.strip("()").split(","))
            head = _SOCKET_END % ("end", *tuple_, int(get("pid", {}).get(key, "0")),
                                  get("comm", {}).get(key, ""),
                                  int(get("intree", {}).get(key, "0")))
            out.append("\t".join([head, *(f"{c}={v}" for c, v in
                                          zip(self.available, values))]) + "\n")
        return out

    def trailer(self, line: str, written: int) -> str:
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


def kernel_hz(configs: tuple[Path, ...] = ()) -> int:
    """The running kernel's CONFIG_HZ, from the first of ``configs`` that says it (by
    default /proc/config.gz, /boot/config-RELEASE); 0 when none does (the variables kept
    in jiffies are then left out)."""
    for path in configs or (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        try:
            with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except (OSError, ValueError):
            continue
    return 0


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


def host_estats(cmd: list[str]) -> EstatsRead:
    """What bpftrace can read on this kernel (its BTF, as bpftrace lists it; its HZ)."""
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
    return estats_read(members, kernel_hz())


def _long(fmt: str) -> str:
    """``fmt`` with 64-bit conversions: bpftrace 0.17's %d and %x print the low 32 bits."""
    return re.sub(r"%([dx])", r"%l\1", fmt)


def estats_template(est: EstatsRead) -> dict:
    """The template's printf formats and arguments for the E record's pieces: piece 0 the
    record's head, then ESTATS_PIECE variables a piece (:class:`EstatsJoin`)."""
    names = est.names
    chunks = [names[i:i + ESTATS_PIECE] for i in range(0, len(names), ESTATS_PIECE)]
    last = len(chunks)
    head = f"e\t%lx\t0/{last}\t{_long(ESTATS.printf())}\n"
    pieces = [(_bt_string(f"e\t%lx\t{i}/{last}\t" + "\t".join(f"{n}=%ld" for n in chunk)
                          + "\n"),
               [BT_EVARS[n][0].replace("HZ", str(est.hz)) for n in chunk])
              for i, chunk in enumerate(chunks, 1)]
    return {"head": _bt_string(head), "pieces": pieces}


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


class Runner(CollectorProcess):
    """bpftrace PROGRAM ARGS, its stdout streamed as records."""
    program = "bpftrace"
    install_hint = INSTALL_HINT

    def __init__(self, cmd: list[str], available: tuple[str, ...], max_sockets: int,
                 echo_stderr: Callable[[str], None]):
        super().__init__(cmd, echo_stderr,
                         {**os.environ, "BPFTRACE_MAP_KEYS_MAX": str(max_sockets)})
        self._dump = EndDump(available)
        self._estats = EstatsJoin()

    def classify(self, line: str) -> bool:
        """bpftrace's memlock warning (said on every start: dropped) and lost events."""
        if "RLIMIT_MEMLOCK" in line:
            return True
        if re.match(r"(WARNING: )?Lost \d+ events", line):
            self.outcome.warnings.append(line.removeprefix("WARNING: "))
            return True
        return False

    def lines(self) -> Iterator[str]:
        yield from self._records(self.stream())
        broken = self._estats.heads - self._estats.whole
        if broken:
            self.outcome.warnings.append(f"{broken} RFC 4898 records lost a piece (left out)")

    def _records(self, stdout) -> Iterator[str]:
        ending = False
        for line in stdout:
            if line.startswith("e\t"):          # --rfc4898: a piece of an E record
                whole = self._estats.add(line)
                if whole:
                    yield whole
            elif ending and line.startswith("T\t"):
                end = self._dump.records()
                yield from end
                yield self._dump.trailer(line, len(end))
                ending = False
            elif ending:
                self._dump.add(line)
            elif line.rstrip("\n") == END_MARK:
                ending = True
            elif line.strip():                # (bpftrace ends with blank lines)
                yield line

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT makes bpftrace run END (the records); a second: SIGTERM."""
        first = not self.outcome.interrupted
        self.outcome.interrupted = True
        self.signal(signal.SIGINT if first else signal.SIGTERM)


# The footer's reason for the counters this collector leaves out
WHY_UNAVAILABLE = "no tracepoint counts it exactly"


class BpftraceBackend:
    """The bpftrace collector (tcpipstat/backend.py's protocol)."""
    name = "bpftrace"
    same_host = True

    def __init__(self, plan, echo_stderr: Callable[[str], None]):
        self.plan = plan
        self._echo = echo_stderr
        self.outcome = RunOutcome(program="bpftrace")
        self._runner: Runner | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def prepare(self, log: Log) -> Prepared:
        plan = self.plan
        what = unsupported(plan)
        if what:
            raise UsageError(f"{what} is not supported by the bpftrace backend yet "
                             "(use --backend stap)")
        cmd = command_from_env("TCPIPSTAT_BPFTRACE", "bpftrace", INSTALL_HINT)
        if os.geteuid() != 0:
            raise EnvironmentNotReady("collecting needs root (bpftrace loads BPF programs)",
                                      "run it with sudo, or use --dump-script to see the program")
        ensure_tracefs()
        available, unavailable = counters(plan.groups)
        estats = host_estats(cmd) if plan.estats else None
        self._tmp = tempfile.TemporaryDirectory(prefix="tcpipstat-")
        program = Path(self._tmp.name) / "tcpipstat.bt"
        program.write_text(render_program(plan, estats))
        cmd += ["-q", str(program), *program_args(plan.filters, plan.timeout_s)]
        if plan.command:
            # bpftrace splits -c at spaces without quoting: the command goes in a file.
            # Its output goes to stderr: bpftrace's stdout is the record stream.
            script = Path(self._tmp.name) / "command.sh"
            script.write_text("exec >&2\n" + plan.command + "\n")
            cmd += ["-c", f"/bin/sh {script}"]
        log(f"loading the bpftrace collector ({len(available)} counters; "
            f"{len(unavailable)} are not countable with tracepoints)...")
        if estats:
            for name, why in estats.left_out.items():
                log(f"RFC 4898 {name} is n/a here: {why}")
        self._runner = Runner(cmd, available, plan.max_sockets, self._echo)
        self.outcome = self._runner.outcome
        return Prepared(os.uname().release, available, unavailable, "", WHY_UNAVAILABLE)

    def lines(self) -> Iterator[str]:
        assert self._runner is not None, "prepare() first"
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
        """bpftrace on PATH, root, tracefs and BTF (bpftrace reads struct sock through it)."""
        from .check import Finding
        available, unavailable = counters(groups)
        found = shutil.which("bpftrace") or os.environ.get("TCPIPSTAT_BPFTRACE")
        fix = "'apt-get install bpftrace'", "'dnf install bpftrace'"
        findings = [
            Finding("bpftrace", bool(found), found or "not found on PATH", *fix),
            Finding("root", os.geteuid() == 0, "collecting loads BPF programs",
                    "run tcpipstat with sudo", "run tcpipstat with sudo"),
            Finding("tracefs", (TRACEFS / "events").is_dir() or None,
                    f"{TRACEFS} (tcpipstat mounts it when it is not)"),
            Finding("BTF", Path("/sys/kernel/btf/vmlinux").is_file() if running else None,
                    "/sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)",
                    "a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                    "a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
        ]
        if not running:     # (-r is the stap collector's: bpftrace attaches to this kernel)
            findings.append(Finding("kernel", False, f"{kver} is not the running kernel: "
                                    "bpftrace collects on the running kernel only",
                                    "run --check on the host that runs it",
                                    "run --check on the host that runs it"))
        return findings, list(available), list(unavailable)
