"""The bpftrace collector: tracepoints only, for hosts that cannot load a SystemTap module.

The program is rendered from tcpipstat/bt_templates/tcpipstat.bt.j2. It counts what a
tracepoint can count exactly (BPF_COUNTERS); every other counter of the chosen groups
is reported unavailable. The filters and the timeout reach it as numbers (positional
parameters, :func:`program_args`): nothing the user types is in the program.

It writes the record stream of tcpipstat/records.py itself (header, each socket as it
closes, trailer), except the records of the sockets still open at the end: bpftrace
0.17 cannot loop over a map, so END prints its maps and :class:`EndDump` writes those
records. With --cong, a closing socket's congestion times (and --dist stays) come on
lines of their own, keyed by the socket, that :class:`CloseCong` joins to its record.

``TCPIPSTAT_BPFTRACE`` replaces the ``bpftrace`` command (a command line, split like a
shell would).
"""
from __future__ import annotations

import ctypes
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
from .counters import CA_COUNTERS, CA_TIME_COUNTERS, UNITS, counters_for_units, units_for_groups
from .errors import EnvironmentNotReady, UsageError
from .filters import Filter
from .records import FORMAT_VERSION, HEADER, MAGIC, SOCKET, TRAILER

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
    **dict.fromkeys(CA_COUNTERS, "tracepoint:tcp:tcp_cong_state_set"),
}
BPF_COUNTERS = frozenset(BPF_POINTS)
# --cong: only where the kernel has the tracepoint (tracefs lists it); the report names it
CONG_EVENT = Path("events/tcp/tcp_cong_state_set")
CONG_HOW = next(u.ca_state for u in UNITS if u.name == "CongState")
PER_FILTER = 21          # numbers per filter (the template's header comment)
END_MARK = "tcpipstat-bpftrace-end"
# --cong/--dist lines of the program's own, never records (the template says when)
CA_LINES = "tcpipstat-bpftrace-ca-"
CA_TIMES, CA_STAYS, CA_CLOSE = CA_LINES + "times", CA_LINES + "stays", CA_LINES + "close"
CA_NOW = "tcpipstat-bpftrace-now"
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
    for what, on in (("--kprobes-only with --cong", "cong" in plan.groups and not plan.tracepoints),
                     ("--rfc4898", plan.estats),
                     ("--sample/--series/--plot", plan.sample_ms is not None),
                     ("--interval", plan.interval_s is not None),
                     ("-r/--kernel-release", plan.kernel_release is not None),
                     ("--stap-arg", bool(plan.stap_args))):
        if on:
            return what
    return ""


def counters(groups, cong: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(available, unavailable) counters of ``groups``, in catalogue order; cong: the
    kernel has the congestion-state tracepoint (:func:`has_cong_tracepoint`)."""
    wanted = counters_for_units(units_for_groups(groups))
    countable = BPF_COUNTERS if cong else BPF_COUNTERS - set(CA_COUNTERS)
    return (tuple(c for c in wanted if c in countable),
            tuple(c for c in wanted if c not in countable))


def has_cong_tracepoint(root: Path = TRACEFS) -> bool:
    return (root / CONG_EVENT).is_dir()


def _bt_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t").replace(
        "\n", "\\n")


def _bt_format(text: str) -> str:
    """A record's printf format for bpftrace, whose %d and %x print 32 bits only (0.17):
    times in ms since boot, counts, 64-bit address words would wrap."""
    return _bt_string(re.sub(r"%([dx])", r"%ll\1", text))


def render_program(plan, cong: bool = True) -> str:
    """The bpftrace program for ``plan``: its groups, whether -c runs a command and how
    many filters there are shape it; their values are positional parameters. cong: the
    kernel has the congestion-state tracepoint (--dump-script assumes it has)."""
    available, _ = counters(plan.groups, cong)
    cong = "CaChanges" in available
    dist = cong and plan.dist
    head = HEADER.printf(MAGIC=MAGIC, FORMAT=FORMAT_VERSION, VERSION=__version__,
                         MAX_SOCKETS=plan.max_sockets, COUNTERS=",".join(available))
    socket_maps = [*_SOCKET_MAPS, *(["intree"] if plan.command else []),
                   *(f"c_{c}" for c in available), *(["cs"] if cong else [])]
    hist_maps = ["cd", "cm"] if dist else []
    return _env().get_template("tcpipstat.bt.j2").render(
        version=__version__, counters=available, command=bool(plan.command),
        nfilters=len(plan.filters), per_filter=PER_FILTER, end_mark=END_MARK,
        fmt={"H": _bt_format(head), "R": _bt_format(SOCKET.printf()),
             "T": _bt_format(TRAILER.printf())},
        maps=socket_maps, dumped=[m for m in socket_maps if m not in ("ok", "n")] + hist_maps[:1],
        globals=[*_GLOBAL_MAPS, *(["tree"] if plan.command else []), *hist_maps],
        rcounters=[c for c in available if c not in CA_COUNTERS], cong=cong, dist=dist,
        ca_counters=CA_COUNTERS, ca_times=CA_TIME_COUNTERS, ca_times_line=CA_TIMES,
        ca_stays=CA_STAYS, ca_close=CA_CLOSE, ca_now=CA_NOW)


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
_CD_LINE = re.compile(r"@cd\[(-?\d+), (\d+), (\d+)\]: (\d+)\Z")


def _bucket(us: int) -> int:
    """A stay's log2 bucket, as the program finds it: 2^b <= us < 2^(b+1); 0 and 1 in 0."""
    return max(us, 1).bit_length() - 1


class CongEnd:
    """--cong at the end: the stay still going of each socket open at the end is cut
    there (its time, and with --dist one more stay in its histogram), as the stap
    collector does; END prints ``@cs`` (state and since when), ``@cd`` (the stays so
    far) and the time it ran (CA_NOW)."""

    def __init__(self, dist: bool):
        self.dist = dist
        self.now_us: int | None = None
        self.stays: dict[str, dict[tuple[int, int], int]] = {}

    def add(self, line: str) -> bool:
        """Takes END's line if it is one of these."""
        line = line.rstrip("\n")
        if line.startswith(CA_NOW + "\t"):
            self.now_us = int(line.split("\t")[1])
            return True
        m = _CD_LINE.match(line)
        if m:
            key, state, bucket, n = m.groups()
            self.stays.setdefault(key, {})[int(state), int(bucket)] = int(n)
        return bool(m)

    def settle(self, key: str, cs: str | None, counts: dict[str, int]) -> list[str]:
        """Adds the socket's stay still going to ``counts``; its h.STATE.BUCKET fields."""
        stays = self.stays.get(key, {})
        if cs is not None and self.now_us is not None:
            v = int(cs)
            state, us = v & 7, self.now_us - (v >> 3)
            counts[CA_TIME_COUNTERS[state]] += us
            if self.dist:
                b = _bucket(us)
                stays[state, b] = stays.get((state, b), 0) + 1
        return [f"h.{s}.{b}={n}" for (s, b), n in sorted(stays.items())]


class EndDump:
    """Reads what END prints (``print(@map)`` of every per-socket map, then the trailer)
    and writes the records of the sockets still open."""

    def __init__(self, available: tuple[str, ...], dist: bool = False):
        self.available = available
        self.maps: dict[str, dict[str, str]] = {}
        self.cong = CongEnd(dist)

    def add(self, line: str) -> None:
        if self.cong.add(line):
            return
        m = _MAP_LINE.match(line.rstrip("\n"))
        if m:
            self.maps.setdefault(m.group(1), {})[m.group(2)] = m.group(3)

    def records(self) -> list[str]:
        out = []
        get = self.maps.get
        for key, tup in get("tup", {}).items():
            counts = {c: _signed(get(f"c_{c}", {}).get(key, "0")) for c in self.available}
            hist = self.cong.settle(key, get("cs", {}).get(key), counts)
            if not any(counts.values()) and key not in get("pid", {}):
                continue                    # (resolved, nothing counted)
            tuple_ = (int(x) & (1 << 64) - 1 for x in tup.strip("()").split(","))
            head = _SOCKET_END % ("end", *tuple_, int(get("pid", {}).get(key, "0")),
                                  get("comm", {}).get(key, ""),
                                  int(get("intree", {}).get(key, "0")))
            out.append("\t".join([head, *(f"{c}={v}" for c, v in counts.items()), *hist])
                       + "\n")
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


class Runner(CollectorProcess):
    """bpftrace PROGRAM ARGS, its stdout streamed as records."""
    program = "bpftrace"
    install_hint = INSTALL_HINT

    def __init__(self, cmd: list[str], available: tuple[str, ...], max_sockets: int,
                 echo_stderr: Callable[[str], None], dist: bool = False):
        super().__init__(cmd, echo_stderr,
                         {**os.environ, "BPFTRACE_MAP_KEYS_MAX": str(max_sockets)})
        self._dump = EndDump(available, dist)
        self._cong = CloseCong()
        self._misses = ProgramMisses()

    def classify(self, line: str) -> bool:
        """bpftrace's memlock warning (said on every start: dropped) and lost events."""
        if "RLIMIT_MEMLOCK" in line:
            return True
        if re.match(r"(WARNING: )?Lost \d+ events", line):
            self.outcome.warnings.append(line.removeprefix("WARNING: "))
            return True
        return False

    def lines(self) -> Iterator[str]:
        """The records; the programs' misses, at the end, as skipped probe hits."""
        try:
            for line in self._records(self.stream()):
                if line.startswith("H\t") and self._proc:     # (attached by now)
                    self._misses.hold(self._proc.pid)
                yield line
        finally:
            self.outcome.skipped += self._misses.count()

    def _records(self, stdout) -> Iterator[str]:
        ending = False
        for line in stdout:
            if line.startswith(CA_LINES):     # (a close's, even after END began)
                record = self._cong.take(line)
                if record:
                    yield record
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
        cong = has_cong_tracepoint()
        available, unavailable = counters(plan.groups, cong)
        self._tmp = tempfile.TemporaryDirectory(prefix="tcpipstat-")
        program = Path(self._tmp.name) / "tcpipstat.bt"
        program.write_text(render_program(plan, cong))
        cmd += ["-q", str(program), *program_args(plan.filters, plan.timeout_s)]
        if plan.command:
            # bpftrace splits -c at spaces without quoting: the command goes in a file.
            # Its output goes to stderr: bpftrace's stdout is the record stream.
            script = Path(self._tmp.name) / "command.sh"
            script.write_text("exec >&2\n" + plan.command + "\n")
            cmd += ["-c", f"/bin/sh {script}"]
        log(f"loading the bpftrace collector ({len(available)} counters; "
            f"{len(unavailable)} are not countable with tracepoints)...")
        if "cong" in plan.groups and not cong:
            log(f"this kernel has no tracepoint {CONG_EVENT.parent.name}:{CONG_EVENT.name}: "
                "the congestion counters are unavailable")
        self._runner = Runner(cmd, available, plan.max_sockets, self._echo,
                              plan.dist and cong)
        self.outcome = self._runner.outcome
        return Prepared(os.uname().release, available, unavailable,
                        CONG_HOW if "CaChanges" in available else "", WHY_UNAVAILABLE)

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
        # (tracefs not mounted yet: tcpipstat mounts it before it looks)
        cong = not running or not (TRACEFS / "events").is_dir() or has_cong_tracepoint()
        available, unavailable = counters(groups, cong)
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
