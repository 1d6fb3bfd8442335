"""Running SystemTap: probe resolution (stap -p2), compiling (stap -p4, cached) and
collecting (staprun, streaming its output).

``TCPIPSTAT_STAP`` / ``TCPIPSTAT_STAPRUN`` replace the two commands (a command
line, split like a shell would); the kernel lab uses them to compile in its
Debian root and to run the module in a QEMU guest (see lab/lab.sh).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .backend import CollectorProcess, Log, Prepared, RunOutcome, command_from_env
from .counters import Selection, points_for_groups, select
from .errors import EnvironmentNotReady, StapFailed
from .render import module_args, probe_check, render_script, resolve_points

INSTALL_HINT = ("install SystemTap: 'apt-get install systemtap' (Debian/Ubuntu) or "
                "'dnf install systemtap' (Fedora/RHEL)")


def cache_dir() -> Path:
    base = os.environ.get("TCPIPSTAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tcpipstat")
    return Path(base)


# ---- stap's messages -> one clear line with the fix ----
_DIAG = (
    (re.compile(r"missing .*kernel.*debuginfo|debuginfo.*(not|missing)|"
                r"Couldn't find .*vmlinux", re.I),
     "the kernel's debug information is missing",
     "install it: 'apt-get install linux-image-$(uname -r)-dbg' (Debian; Ubuntu: the -dbgsym "
     "package) or 'debuginfo-install kernel-$(uname -r)' (Fedora/RHEL)"),
    (re.compile(r"build/\.config.*(No such file|failed)|kernel build tree.*not found|"
                r"Checking \".*/build/\.config\" failed", re.I),
     "the kernel headers (build tree) are missing",
     "install them: 'apt-get install linux-headers-$(uname -r)' or "
     "'dnf install kernel-devel-$(uname -r)'"),
    # "\d+ cycles": the run-time message, not the C source that a compiler error quotes
    (re.compile(r"probe overhead \(\d+ cycles\) exceeded threshold", re.I),
     "stap stopped collection: its probe-overhead guard tripped",
     "run again with --no-overload-guard (slow or emulated machines) or collect fewer --groups"),
    (re.compile(r"Array overflow|MAXMAPENTRIES", re.I),
     "a collector table overflowed",
     "run again with a larger --max-sockets"),
    (re.compile(r"Couldn't insert module|Operation not permitted.*insert|"
                r"module verification failed|Key was rejected|Lockdown|lockdown", re.I),
     "the kernel refused to load the module",
     "loadable modules must be enabled and unsigned modules allowed (Secure Boot / lockdown off, "
     "or sign stap modules: see stap's --use-server and mokutil)"),
    # ("transport failures", plural, is the count of lost writes at exit: _TRANSPORT below)
    (re.compile(r"Cannot attach to module control channel|transport failure(?!s)", re.I),
     "stap's transport to the module failed",
     "check dmesg; another stap session or a stale module may be loaded (staprun -d NAME)"),
)


def diagnose(stderr: str) -> tuple[str, str] | None:
    for rx, what, fix in _DIAG:
        if rx.search(stderr):
            return what, fix
    return None


def _first_error(stderr: str) -> str:
    for line in stderr.splitlines():
        if re.search(r"(semantic|parse) error|ERROR:|error:", line):
            return line.strip()
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


@dataclass
class Toolchain:
    stap: list[str]
    staprun: list[str]
    overridden: bool = False
    # stap processes running now (so that a speculative compile can be cancelled)
    _running: set = field(default_factory=set, repr=False, compare=False)
    _cancelled: bool = field(default=False, repr=False, compare=False)
    _version: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def find(cls) -> "Toolchain":
        over = bool(os.environ.get("TCPIPSTAT_STAP") or os.environ.get("TCPIPSTAT_STAPRUN"))
        return cls(command_from_env("TCPIPSTAT_STAP", "stap", INSTALL_HINT),
                   command_from_env("TCPIPSTAT_STAPRUN", "staprun", INSTALL_HINT), over)

    def version(self) -> str:
        """`stap -V`'s first line, asked once per toolchain (every cache key has it)."""
        if self._version is None:
            self._version = self._ask_version()
        return self._version

    def drain_ms(self) -> int:
        """How long a finished run waits before its module exits, so that stapio reads
        the last records: stapio before SystemTap 5.1 stops its reader threads as soon
        as the module has exited and drops what they had not read yet (PR31597; 5.1
        waits 2 x its 200 ms read timeout itself). Unknown versions get the wait."""
        m = re.search(r"version (\d+)\.(\d+)", self.version())
        return 0 if m and (int(m.group(1)), int(m.group(2))) >= (5, 1) else DRAIN_MS

    def _ask_version(self) -> str:
        try:
            out = subprocess.run([*self.stap, "-V"], capture_output=True, text=True, timeout=60)
        except OSError as e:
            raise EnvironmentNotReady(f"cannot run stap: {e}", INSTALL_HINT) from None
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "unknown"

    # -- pass 2: which probe points exist on this kernel --
    def _resolve_path(self, kver: str, script: str) -> Path:
        key = hashlib.sha256("\0".join([kver, self.version(), script]).encode()).hexdigest()[:20]
        return cache_dir() / "resolve" / f"{key}.json"

    def resolve(self, points: list[str], kver: str, script: str) -> frozenset[str]:
        path = self._resolve_path(kver, script)
        try:
            return frozenset(json.loads(path.read_text())["resolved"])
        except (OSError, ValueError, KeyError):
            pass
        with tempfile.TemporaryDirectory(prefix="tcpipstat-") as tmp:
            f = Path(tmp) / "tcpipstat_check.stp"
            f.write_text(script)
            res = self._run_stap(["-p2", "-r", kver, f.name], cwd=tmp, capture=True)
        if res.returncode != 0:
            self._fail("probe check (stap -p2)", res.stderr)
        resolved = parse_resolved(res.stdout, points)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kernel": kver, "resolved": sorted(resolved)}))
        return resolved

    def resolved_cached(self, kver: str, script: str) -> bool:
        """Is the probe check of ``script`` for ``kver`` already in the cache?"""
        return self._resolve_path(kver, script).is_file()

    # -- pass 4: the module, cached by everything that shapes it --
    def module_path(self, script: str, kver: str, flags: list[str]) -> Path:
        digest = hashlib.sha256("\0".join([kver, self.version(), script, *flags]).encode())
        key = digest.hexdigest()[:16]
        return cache_dir() / "modules" / f"tcpipstat_{key}.ko"

    def compile(self, script: str, kver: str, flags: list[str], verbose: int = 0) -> Path:
        ko = self.module_path(script, kver, flags)
        name = ko.stem
        if ko.is_file():
            return ko
        with tempfile.TemporaryDirectory(prefix="tcpipstat-") as tmp:
            (Path(tmp) / "tcpipstat.stp").write_text(script)
            args = ["-p4", "-m", name, "-r", kver, *flags] + ["-v"] * verbose + ["tcpipstat.stp"]
            res = self._run_stap(args, cwd=tmp, capture=not verbose)
            if res.returncode != 0:
                self._fail("compile (stap -p4)", res.stderr or "")
            built = Path(tmp) / f"{name}.ko"
            if not built.is_file():
                raise StapFailed(f"stap -p4 succeeded but left no {name}.ko")
            ko.parent.mkdir(parents=True, exist_ok=True)
            tmp_ko = ko.with_suffix(".ko.tmp")
            shutil.copyfile(built, tmp_ko)
            os.replace(tmp_ko, ko)
        return ko

    def _run_stap(self, args: list[str], cwd: str, capture: bool) -> subprocess.CompletedProcess:
        cmd = [*self.stap, *args]
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE if capture else None,
                                    start_new_session=True)
        except OSError as e:
            raise EnvironmentNotReady(f"cannot run stap: {e}", INSTALL_HINT) from None
        self._running.add(proc)
        try:
            if self._cancelled:
                _stop(proc)
            out, err = proc.communicate()
        except KeyboardInterrupt:
            _stop(proc)
            raise
        finally:
            self._running.discard(proc)
        return subprocess.CompletedProcess(cmd, proc.returncode, out or "", err or "")

    def cancel(self) -> None:
        """Stop this toolchain's stap processes (a speculative compile not needed)."""
        self._cancelled = True
        for proc in list(self._running):
            _stop(proc)

    @staticmethod
    def _fail(step: str, stderr: str) -> None:
        d = diagnose(stderr)
        if d:
            raise EnvironmentNotReady(f"{step} failed: {d[0]}", d[1])
        raise StapFailed(f"{step} failed: {_first_error(stderr)}",
                         "run with -v to see stap's passes, or --dump-script to see the script")


class SpeculativeCompile:
    """Compile the script a plan renders before knowing which probe points the kernel
    has, while the probe check (stap -p2, seconds) runs: on the usual kernel, where every
    point exists, the checked script is the same text and its module is ready sooner
    (a cold start costs the longer of the two passes, not their sum). When the check
    drops a unit, the guess is cancelled and the checked script compiled as always."""

    def __init__(self, tc: "Toolchain", script: str, kver: str, flags: list[str]):
        self.script = script
        self._tc = Toolchain(tc.stap, tc.staprun, tc.overridden, _version=tc.version())
        self._result: Path | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(script, kver, flags), daemon=True)
        self._thread.start()

    def _run(self, script: str, kver: str, flags: list[str]) -> None:
        try:
            self._result = self._tc.compile(script, kver, flags)
        except BaseException as e:          # handed to take() (or dropped with the guess)
            self._result = e

    def take(self, script: str) -> Path | None:
        """The module if ``script`` is the one guessed (raising its compile error), else
        None after cancelling the guess."""
        if script != self.script:
            self.cancel()
            return None
        try:
            self._thread.join()
        except BaseException:               # Ctrl-C while waiting: stop the compile too
            self.cancel()
            raise
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def cancel(self) -> None:
        self._tc.cancel()
        self._thread.join(timeout=30)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# A finished run's wait before exiting on stap < 5.1 (Toolchain.drain_ms): stapio's
# readers are woken on the next jiffy when there is output (the runtime's relay timer,
# STP_RELAY_TIMER_INTERVAL), so this is ample even in an emulated guest.
DRAIN_MS = 500

# The module's control file (tcpipstat.stp.j2: probe procfs("finish")): a write ends the run.
PROCFS_ROOT = Path("/proc/systemtap")


# a module by its name or by its debug file's path (render.stap_spellings)
_POINT_LINE = re.compile(r'^(kernel|module\("[A-Za-z0-9_./+~-]+"\))\.function\("([A-Za-z0-9_.]+)'
                         r'(@[^"]*)?"\)(\.return|\.call)?')
_TRACE_LINE = re.compile(r'^kernel\.trace\("([A-Za-z0-9_]+:[A-Za-z0-9_]+)"\)')


def parse_resolved(p2_stdout: str, points: list[str]) -> frozenset[str]:
    """Probe points of ``points`` that `stap -p2` kept (its '# probes' section)."""
    found: set[str] = set()
    in_probes = False
    for line in p2_stdout.splitlines():
        if line.startswith("# probes"):
            in_probes = True
            continue
        if line.startswith("# ") and in_probes:
            in_probes = False
        if not in_probes:
            continue
        m = _POINT_LINE.match(line)
        # a module's function stap found in its symbol table only (no @file:line: no
        # debug information, as trixie's stap 5.1 for a compressed .ko.xz) resolves, but
        # a handler reading $return or a parameter then fails to compile
        if m and (m.group(3) or m.group(1) == "kernel"):
            found.add(f'{m.group(1)}.function("{m.group(2)}")'
                      + (".return" if m.group(4) == ".return" else ""))
        m = _TRACE_LINE.match(line)
        if m:
            found.add(f'kernel.trace("{m.group(1)}")')
    return frozenset(p for p in points if p in found)


# ---- collection ----
_SKIPPED = re.compile(r"Number of errors: (\d+), skipped probes: (\d+)")
# The module's count, at exit, of print-buffer flushes its relay buffer could not take
# (runtime/print_flush.c): the records in them never reached staprun.
_TRANSPORT = re.compile(r"There were (\d+) transport failures")


def finish_path(ko: Path, root: Path = PROCFS_ROOT) -> Path:
    """The module's control file: its name is the .ko's (stap -m at compile)."""
    return root / ko.stem / "finish"


def command_wrapper(command: str, finish: Path, drain_ms: int) -> str:
    """The -c command as stapio is given it. stapio splits -c with wordexp (no shell):
    a shell runs the command, then tells the module to finish (write out everything
    and its trailer) and waits ``drain_ms`` before exiting, since its exit is what makes
    stapio stop the module: on stap < 5.1 output still unread at that moment is lost.
    The command's exit status is kept."""
    tail = f"rc=$?; {{ echo 1 > {shlex.quote(str(finish))}; }} 2>/dev/null"
    if drain_ms:
        tail += f" && sleep {drain_ms / 1000:g}"
    script = f"/bin/sh -c {shlex.quote(command)}; {tail}; exit $rc"
    return "/bin/sh -c " + shlex.quote(script)


class Collector(CollectorProcess):
    """staprun MODULE ARGS, its stdout streamed line by line."""
    program = "staprun"
    install_hint = INSTALL_HINT

    def __init__(self, tc: Toolchain, ko: Path, module_args: list[str], command: str | None,
                 echo_stderr: Callable[[str], None] | None = None, drain_ms: int = 0,
                 procfs_root: Path = PROCFS_ROOT):
        self.finish = finish_path(ko, procfs_root)
        cmd = [*tc.staprun]
        if command:
            cmd += ["-c", command_wrapper(command, self.finish, drain_ms)]
        super().__init__(cmd + [str(ko), *module_args],
                         echo_stderr or (lambda line: print(line, file=sys.stderr)))

    def classify(self, line: str) -> bool:
        """stapio's skipped-probe count, the module's transport failures, WARNING: and
        ERROR: lines."""
        if m := _SKIPPED.search(line):
            self.outcome.errors, self.outcome.skipped = int(m.group(1)), int(m.group(2))
        elif t := _TRANSPORT.search(line):
            self.outcome.transport_failures = int(t.group(1))
        elif line.startswith("WARNING:"):
            self.outcome.warnings.append(line[len("WARNING:"):].strip())
        elif line.startswith("ERROR:"):
            self.outcome.error_lines.append(line[len("ERROR:"):].strip())
        else:
            return False
        return True

    def interrupt(self) -> None:
        """Ctrl-C: the first asks the module to finish (it writes everything out, then
        exits on its own once stapio has had time to read it); where its control file
        cannot be written (another host's module, as in the lab), or on a second
        Ctrl-C, staprun gets SIGINT."""
        first = not self.outcome.interrupted
        self.outcome.interrupted = True
        if first:
            try:
                self.finish.write_text("1\n")
                return
            except OSError:
                pass
        self.signal(signal.SIGINT)

    def lines(self) -> Iterator[str]:
        yield from self.stream()
        self.outcome.problem = diagnose(self.outcome.stderr)


# ---- the stap backend (tcpipstat/backend.py's protocol) ----
def dump_script(plan) -> str:
    """The script for the chosen groups, before probe resolution (every unit; with
    --kprobes-only, none that needs a tracepoint)."""
    return script_for(plan, select(plan.groups, plan.tracepoints))


def kernel_release(plan) -> str:
    return plan.kernel_release or os.uname().release


def check_points(plan) -> list:
    """The probe points the run's probe check asks about (--kprobes-only: no tracepoint)."""
    return points_for_groups(plan.groups, plan.tracepoints)


def selection(plan, tc: Toolchain, log: Log) -> Selection:
    """The units to run: probe points resolved on the target kernel."""
    kver = kernel_release(plan)
    log(f"checking which probe points exist on kernel {kver}...")
    return select(plan.groups, plan.tracepoints, resolve_points(tc, check_points(plan), kver))


def script_for(plan, sel: Selection) -> str:
    return render_script(sel, plan.max_sockets, plan.dist, plan.estats,
                         plan.sample_ms is not None, plan.places)


def prepare(plan, tc: Toolchain, log: Log) -> tuple[str, list[str], list[str], str]:
    """Resolve probe points on the target kernel; returns (script, available, unavailable,
    how congestion states are seen: "" without the cong group)."""
    sel = selection(plan, tc, log)
    return script_for(plan, sel), list(sel.available), list(sel.unavailable), sel.cong


def unloaded_modules(sel: Selection, sysfs: Path = Path("/sys/module")) -> list[str]:
    """The modules ``sel`` probes that this host has not loaded: SystemTap 4.8 does not
    probe a module loaded after the collector started (seen with tls on Linux 6.1)."""
    names = dict.fromkeys(p.module for u in sel.units for p in u.points if p.module)
    return [m for m in names if not (sysfs / m).is_dir()]


# stap -t (STP_TIMING) at module exit: "'__global_NAME' lock contention occurred N times"
_LOCK_CONTENTION = re.compile(r"'[^']+' lock contention occurred \d+ times$")


class StapBackend:
    """The SystemTap collector: probe check (stap -p2), module (stap -p4, cached),
    staprun streaming the records."""
    name = "stap"

    def __init__(self, plan, echo_stderr: Callable[[str], None]):
        self.plan = plan
        self._echo = echo_stderr
        self.tc = Toolchain.find()
        self.outcome = RunOutcome()
        # never called: the module's own timer ends collection, and says so in its trailer
        self.on_end: Callable[[], None] | None = None
        self._collector: Collector | None = None
        self._guess: SpeculativeCompile | None = None

    @property
    def same_host(self) -> bool:
        """A replaced staprun (the lab's) runs the module elsewhere: its sockets are not
        this host's."""
        return not self.tc.overridden

    def prepare(self, log: Log) -> Prepared:
        plan, tc = self.plan, self.tc
        if not tc.overridden and os.geteuid() != 0:
            raise EnvironmentNotReady("collecting needs root (staprun loads a kernel module)",
                                      "run it with sudo, or use --dump-script to see the script")
        kver = kernel_release(plan)
        sel = self._checked_selection(log, kver)
        ko = self._module(script_for(plan, sel), kver, log)
        drain = tc.drain_ms()
        args = module_args(list(plan.filters), plan.timeout_s, plan.interval_s, plan.count,
                           plan.sample_ms, plan.on_cwnd_change, drain)
        self._collector = Collector(tc, ko, args, plan.command, echo_stderr=self._echo,
                                    drain_ms=drain)
        self.outcome = self._collector.outcome
        for m in unloaded_modules(sel) if self.same_host else ():
            note = (f"the {m} module was not loaded when collection started: its sockets "
                    f"(kTLS) may not be counted (modprobe {m} first)")
            log(note)
            self.outcome.warnings.append(note)
        return Prepared(kver, sel.available, sel.unavailable, sel.cong)

    def _checked_selection(self, log: Log, kver: str) -> Selection:
        """The probe check, with the usual script compiled meanwhile on a cold cache."""
        plan, tc = self.plan, self.tc
        first = dump_script(plan)            # the script when every probe point exists
        flags = plan.compile_flags()
        _, check = probe_check(check_points(plan), kver)
        if (not plan.verbose and not tc.resolved_cached(kver, check)
                and not tc.module_path(first, kver, flags).is_file()):
            log(f"compiling the collector for {kver} while checking its probe points "
                "(cached after the first run)...")
            self._guess = SpeculativeCompile(tc, first, kver, flags)
        try:
            return selection(plan, tc, log)
        except BaseException:
            if self._guess:
                self._guess.cancel()
            raise

    def _module(self, script: str, kver: str, log: Log) -> Path:
        ko = self._guess.take(script) if self._guess else None
        if ko is None:
            log(f"compiling the collector for {kver} (cached after the first run)...")
            ko = self.tc.compile(script, kver, self.plan.compile_flags(), self.plan.verbose)
        return ko

    @staticmethod
    def checks(kver: str, running: bool, groups: tuple[str, ...], host) -> tuple:
        """stap itself and its probe check on ``kver``, then what the host must allow."""
        from .check import host_checks, stap_checks
        findings, available, unavailable = stap_checks(kver, groups)
        over = bool(os.environ.get("TCPIPSTAT_STAPRUN"))
        findings += host_checks(kver, running, host, os.geteuid(), over)
        return findings, available, unavailable

    def lines(self) -> Iterator[str]:
        """The module's records. --stap-arg=-t: stap's per-probe timing report follows them
        on stdout, and its lock contention lines can come before them (another CPU's
        buffer): those go to stderr, and on as comments (saved records keep them)."""
        assert self._collector is not None, "prepare() first"
        timing = False
        for line in self._collector.lines():
            timing = timing or line.startswith("----- probe hit report")
            if timing or _LOCK_CONTENTION.match(line):
                self._echo(line.rstrip("\n"))
                yield "# " + line
                continue
            yield line

    def interrupt(self) -> None:
        if self._collector is not None:
            self._collector.interrupt()
