"""The bpftrace collector: tracepoints only, for hosts that cannot load a SystemTap module.

The program is rendered from tcpipstat/bt_templates/tcpipstat.bt.j2. It counts what a
tracepoint can count exactly (BPF_COUNTERS); every other counter of the chosen groups
is reported unavailable. With --sample it samples connections at tcp:tcp_probe
(:func:`sample_context`, :class:`SampleOrder`). The filters, the timeout and the sampling
period reach it as numbers (positional parameters, :func:`program_args`,
:func:`sample_args`): nothing the user types is in the program.

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
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import jinja2

from . import __version__
from .backend import CollectorProcess, Log, Prepared, RunOutcome, command_from_env
from .bt_points import Choice, KernelPoints, choose, list_points
from .counters import counters_for_units, units_for_groups
from .errors import EnvironmentNotReady, UsageError
from .filters import Filter
from .records import FORMAT_VERSION, HEADER, MAGIC, SAMPLE, SOCKET, TRAILER
from .series import FIELD_NAMES as SAMPLE_FIELDS

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
# where a kernel lacks the tracepoint (before Linux 6.3: bt_points.choose)
BPF_FALLBACKS = {**dict.fromkeys(("SendBytes", "SendMsgs"), "kretfunc:tcp_sendmsg"),
                 **dict.fromkeys(("RecvBytes", "RecvMsgs"), "kretfunc:tcp_recvmsg")}
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
    for what, on in (("--cong/--dist", "cong" in plan.groups), ("--rfc4898", plan.estats),
                     ("--interval", plan.interval_s is not None),
                     ("-r/--kernel-release", plan.kernel_release is not None),
                     ("--stap-arg", bool(plan.stap_args))):
        if on:
            return what
    return ""


def counters(groups, missing: frozenset[str] = frozenset()
             ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(available, unavailable) counters of ``groups``, in catalogue order; ``missing``:
    those the kernel gives no point for (bt_points.Choice.missing)."""
    wanted = counters_for_units(units_for_groups(groups))
    countable = BPF_COUNTERS - missing
    return (tuple(c for c in wanted if c in countable),
            tuple(c for c in wanted if c not in countable))


def _bt_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t").replace(
        "\n", "\\n")


def render_program(plan, choice: Choice | None = None) -> str:
    """The bpftrace program for ``plan`` on a kernel with ``choice``'s points (default: a
    current kernel's): its groups, whether -c runs a command and how many filters there
    are shape it; their values are positional parameters."""
    choice = choice or choose(KernelPoints.newest())
    available, _ = counters(plan.groups, choice.missing)
    head = HEADER.printf(MAGIC=MAGIC, FORMAT=FORMAT_VERSION, VERSION=__version__,
                         MAX_SOCKETS=plan.max_sockets, COUNTERS=",".join(available))
    socket_maps = [*_SOCKET_MAPS, *(["intree"] if plan.command else []),
                   *(f"c_{c}" for c in available)]
    return _env().get_template("tcpipstat.bt.j2").render(
        version=__version__, counters=available, command=bool(plan.command), points=choice,
        nfilters=len(plan.filters), per_filter=PER_FILTER, end_mark=END_MARK,
        fmt={"H": _bt_string(head), "R": _bt_string(SOCKET.printf()),
             "T": _bt_string(TRAILER.printf())},
        maps=socket_maps, dumped=[m for m in socket_maps if m not in ("ok", "n")],
        globals=[*_GLOBAL_MAPS, *(["tree"] if plan.command else [])],
        sample=sample_context(plan))


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
    """The running kernel's CONFIG_HZ (icsk_rto counts jiffies), from its configuration
    (``configs``: where to look); 0 when none is readable."""
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


def _signed(text: str) -> int:
    """A map value as the signed 64-bit number it holds (CurrEstab goes below 0)."""
    v = int(text) & (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUNTIME_WARNING = re.compile(r"\S+\.bt:[\d:-]+ WARNING: (.*)\Z")
_DELETE_MISSING = "Can't delete map element because it does not exist"
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
                         # (bpftrace 0.21 renamed the variable; the old name still works)
                         {**os.environ, "BPFTRACE_MAP_KEYS_MAX": str(max_sockets),
                          "BPFTRACE_MAX_MAP_KEYS": str(max_sockets)})
        self._dump = EndDump(available)
        self._context = 0           # lines of a runtime warning's context still to come
        self._order = SampleOrder()

    def classify(self, line: str) -> bool:
        """bpftrace's memlock warning (said on every start: dropped) and lost events."""
        if "RLIMIT_MEMLOCK" in line or "BPFTRACE_MAP_KEYS_MAX is deprecated" in line:
            return True
        if re.match(r"(WARNING: )?Lost \d+ events", line):
            self.outcome.warnings.append(line.removeprefix("WARNING: "))
            return True
        return False

    def lines(self) -> Iterator[str]:
        yield from self._records(self.stream())

    def _records(self, stdout) -> Iterator[str]:
        ending = False
        for line in stdout:
            if self._runtime_warning(line):
                continue
            if ending and line.startswith("T\t"):
                end = self._dump.records()
                yield from end
                yield self._dump.trailer(line, len(end))
                ending = False
            elif ending:
                self._dump.add(line)
            elif line.rstrip("\n") == END_MARK:
                yield from self._order.rest()
                ending = True
            elif line.strip():                # (bpftrace ends with blank lines)
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
        self.signal(signal.SIGINT if first else signal.SIGTERM)


# The footer's reason for the counters this collector leaves out
WHY_UNAVAILABLE = "no tracepoint counts it exactly"


def _kernel_choice() -> Choice | None:
    """What this kernel offers, asked of bpftrace (None if it cannot tell)."""
    try:
        cmd = command_from_env("TCPIPSTAT_BPFTRACE", "bpftrace", INSTALL_HINT)
        return choose(list_points(cmd, timeout=120))
    except (EnvironmentNotReady, OSError, subprocess.SubprocessError):
        return None


def _choice_text(choice: Choice) -> str:
    """Where this kernel's bytes are counted, for --check."""
    def where(point: str) -> str:
        return point or "nowhere (n/a)"
    return (f"sends at {where(choice.send)}, receives at {where(choice.recv)}; records as "
            + ("sockets are destroyed" if choice.destroy else "sockets close"))


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
        log("asking bpftrace which probe points this kernel has...")
        choice = choose(list_points(cmd))
        available, unavailable = counters(plan.groups, choice.missing)
        self._tmp = tempfile.TemporaryDirectory(prefix="tcpipstat-")
        program = Path(self._tmp.name) / "tcpipstat.bt"
        program.write_text(render_program(plan, choice))
        hz = kernel_hz() if plan.sample_ms is not None else 0
        if plan.sample_ms is not None and not hz:
            log("rto_ms will not be sampled: this kernel's CONFIG_HZ is not readable "
                "(/proc/config.gz, /boot/config-RELEASE)")
        cmd += ["-q", str(program), *program_args(plan.filters, plan.timeout_s),
                *sample_args(plan, hz)]
        if plan.command:
            # bpftrace splits -c at spaces without quoting: the command goes in a file.
            # Its output goes to stderr: bpftrace's stdout is the record stream.
            script = Path(self._tmp.name) / "command.sh"
            script.write_text("exec >&2\n" + plan.command + "\n")
            cmd += ["-c", f"/bin/sh {script}"]
        log(f"loading the bpftrace collector ({len(available)} counters; "
            f"{len(unavailable)} are not countable with tracepoints)...")
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
        found = shutil.which("bpftrace") or os.environ.get("TCPIPSTAT_BPFTRACE")
        choice = _kernel_choice() if found and running and os.geteuid() == 0 else None
        available, unavailable = counters(groups, choice.missing if choice else frozenset())
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
        if choice is not None:
            findings.append(Finding("probe points", True, _choice_text(choice)))
        if not running:     # (-r is the stap collector's: bpftrace attaches to this kernel)
            findings.append(Finding("kernel", False, f"{kver} is not the running kernel: "
                                    "bpftrace collects on the running kernel only",
                                    "run --check on the host that runs it",
                                    "run --check on the host that runs it"))
        return findings, list(available), list(unavailable)
