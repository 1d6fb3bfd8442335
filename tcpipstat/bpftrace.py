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

import os
import re
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
}
# where a kernel lacks the tracepoint (before Linux 6.3: bt_points.choose)
BPF_FALLBACKS = {**dict.fromkeys(("SendBytes", "SendMsgs"), "kretfunc:tcp_sendmsg"),
                 **dict.fromkeys(("RecvBytes", "RecvMsgs"), "kretfunc:tcp_recvmsg")}
BPF_COUNTERS = frozenset(BPF_POINTS)
PER_FILTER = 21          # numbers per filter (the template's header comment)
END_MARK = "tcpipstat-bpftrace-end"
# per-socket maps (deleted as a socket closes) and the run's own
_SOCKET_MAPS = ("ok", "tup", "n", "pid", "comm")
_PLACE_MAPS = ("cg", "ns")      # where the socket belongs: cgroup id, netns inode
# (bpftrace 0.17's %d and %u print the low 32 bits only; a cgroup id may be wider)
_PLACE_CONVS = {"CGROUP": "%lu", "NETNS": "%lu"}
_GLOBAL_MAPS = ("start", "records", "dropped", "ended")


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tcpipstat", "bt_templates"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def unsupported(plan) -> str:
    """The first option this collector cannot do yet ("" if none)."""
    for what, on in (("--cong/--dist", "cong" in plan.groups), ("--rfc4898", plan.estats),
                     ("--sample/--series/--plot", plan.sample_ms is not None),
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


def render_program(plan, choice: Choice | None = None, cgroup: bool = True) -> str:
    """The bpftrace program for ``plan`` on a kernel with ``choice``'s points (default: a
    current kernel's): its groups, whether -c runs a command and how many filters there
    are shape it; their values are positional parameters. ``cgroup``: the kernel's
    sockets hold their cgroup where the program reads it (:func:`cgroup_readable`)."""
    choice = choice or choose(KernelPoints.newest())
    available, _ = counters(plan.groups, choice.missing)
    head = HEADER.printf(MAGIC=MAGIC, FORMAT=FORMAT_VERSION, VERSION=__version__,
                         MAX_SOCKETS=plan.max_sockets, COUNTERS=",".join(available))
    socket_maps = [*_SOCKET_MAPS, *_PLACE_MAPS, *(["intree"] if plan.command else []),
                   *(f"c_{c}" for c in available)]
    return _env().get_template("tcpipstat.bt.j2").render(
        version=__version__, counters=available, command=bool(plan.command), points=choice,
        cgroup=cgroup,
        nfilters=len(plan.filters), per_filter=PER_FILTER, end_mark=END_MARK,
        fmt={"H": _bt_string(head), "R": _bt_string(SOCKET.printf(**_PLACE_CONVS)),
             "T": _bt_string(TRAILER.printf())},
        maps=socket_maps, dumped=[m for m in socket_maps if m not in ("ok", "n")],
        globals=[*_GLOBAL_MAPS, *(["tree"] if plan.command else [])])


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
                                  int(get("intree", {}).get(key, "0")), *self._place(key))
            out.append("\t".join([head, *(f"{c}={v}" for c, v in
                                          zip(self.available, values))]) + "\n")
        return out

    def _place(self, key: str) -> tuple[int, int]:
        """The socket's cgroup id and netns inode (0: not known)."""
        return tuple(int(self.maps.get(m, {}).get(key, "0")) & (1 << 64) - 1
                     for m in _PLACE_MAPS)

    def trailer(self, line: str, written: int) -> str:
        """The trailer, its IDS counting the records written here too."""
        f = line.rstrip("\n").split("\t")
        f[TRAILER.at("IDS")] = str(int(f[TRAILER.at("IDS")]) + written)
        return "\t".join(f) + "\n"


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
                ending = True
            elif line.strip():                # (bpftrace ends with blank lines)
                yield line

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
        with ThreadPoolExecutor(1) as pool:     # (the dry run's BTF parse: while listing)
            readable = pool.submit(cgroup_readable, cmd)
            choice = choose(list_points(cmd))
            cgroup = readable.result()
        if not cgroup:
            log("this kernel's sockets do not say their cgroup where bpftrace can read it: "
                "cgroups are unknown")
        available, unavailable = counters(plan.groups, choice.missing)
        self._tmp = tempfile.TemporaryDirectory(prefix="tcpipstat-")
        program = Path(self._tmp.name) / "tcpipstat.bt"
        program.write_text(render_program(plan, choice, cgroup))
        cmd += ["-q", str(program), *program_args(plan.filters, plan.timeout_s)]
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
