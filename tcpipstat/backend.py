"""What the rest of tcpipstat asks of a collector: the Backend protocol.

A backend turns a plan into a running collector and hands back its record stream
(the line format of tcpipstat/records.py). The SystemTap collector
(tcpipstat/stap.py, :class:`~tcpipstat.stap.StapBackend`) is the first one. Nothing
outside a backend knows how it loads its probes: modules, staprun and the module's
control files are the stap backend's business.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol


@dataclass
class Prepared:
    """What a backend found it can collect on the target kernel."""
    kernel: str
    available: tuple[str, ...]          # counters this kernel gives
    unavailable: tuple[str, ...]        # in the chosen groups, not on this kernel
    cong: str = ""                      # how congestion states are seen ("": no cong group)
    why_unavailable: str = ""           # why they are ("": a probe point did not resolve)


@dataclass
class RunOutcome:
    """How a collector's run ended, as the backend saw it (the records' own trailer
    says the rest)."""
    returncode: int | None = 0
    interrupted: bool = False
    errors: int = 0
    skipped: int = 0                    # probe hits the collector could not run
    untracked: int = 0                  # bpftrace: sockets its full tables left out
    untracked_events: int = 0           # bpftrace: events lost to them beyond those sockets
    transport_failures: int = 0         # stap: module writes its transport could not take
    warnings: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    stderr: str = ""
    bad_lines: int = 0                  # collector output that was not a record (skipped)
    first_bad: str = ""
    problem: tuple[str, str] | None = None   # (what went wrong, the fix), when known
    program: str = "the collector"      # who ran it, as error messages name it


Log = Callable[[str], None]


def command_from_env(var: str, default: str, install_hint: str) -> list[str]:
    """A collector's command: ``$var`` (a command line, split like a shell would), else
    ``default`` found on PATH, else an error with the fix."""
    val = os.environ.get(var)
    if val:
        return shlex.split(val)
    path = shutil.which(default)
    if not path:
        from .errors import EnvironmentNotReady
        raise EnvironmentNotReady(f"{default} not found on PATH", install_hint)
    return [path]


class CollectorProcess:
    """A collector's process: its stdout streamed line by line (:meth:`stream`), its
    stderr read on a thread, each line offered to :meth:`classify` (which files what it
    recognises in the outcome) and echoed otherwise. Subclasses say how to start it."""
    program = "the collector"          # how messages name it
    install_hint = ""                  # the fix when it cannot be started

    def __init__(self, cmd: list[str], echo_stderr: Callable[[str], None],
                 env: dict | None = None):
        self.cmd, self.env, self._echo = cmd, env, echo_stderr
        self.outcome = RunOutcome(program=self.program)
        self._proc: subprocess.Popen | None = None
        self._stderr_lines: list[str] = []

    def classify(self, line: str) -> bool:
        """Take a stderr line into the outcome (True) or leave it to be echoed (False)."""
        return False

    def _read_stderr(self, stream) -> None:
        for line in stream:
            line = line.rstrip("\n")
            self._stderr_lines.append(line)
            if not self.classify(line):
                self._echo(line)

    def stream(self) -> Iterator[str]:
        """The process's stdout, then its exit status and stderr in the outcome."""
        from .errors import EnvironmentNotReady
        try:
            self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, errors="replace",
                                          start_new_session=True, env=self.env)
        except OSError as e:
            raise EnvironmentNotReady(f"cannot run {self.program}: {e}",
                                      self.install_hint) from None
        t = threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True)
        t.start()
        assert self._proc.stdout is not None
        yield from self._proc.stdout
        self._proc.wait()
        t.join(timeout=5)
        self.outcome.returncode = self._proc.returncode
        self.outcome.stderr = "\n".join(self._stderr_lines)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process if it still runs."""
        if self._proc and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signum)
            except OSError:
                pass


class Backend(Protocol):
    """One collector. ``prepare`` first, then ``lines`` once."""
    name: str
    outcome: RunOutcome
    # Set before ``lines``; called where collection ends, by a backend that knows that
    # moment before its trailer is read (tcpipstat/reconcile.py's end snapshot). A backend
    # that does not never calls it: the snapshot is then taken at the trailer.
    on_end: Callable[[], None] | None

    def prepare(self, log: Log) -> Prepared:
        """Check the probe points on the target kernel and build the collector."""

    def lines(self) -> Iterator[str]:
        """The collector's output, line by line, until it ends."""

    def interrupt(self) -> None:
        """Ctrl-C: ask the collector to finish (a second call: stop it now)."""

    @property
    def same_host(self) -> bool:
        """Do the sockets it sees live on this host (can psutil look them up)?"""

    @staticmethod
    def checks(kver: str, running: bool, groups: tuple[str, ...], host) -> tuple:
        """--check: (findings, available counters, unavailable counters) on ``kver``
        (check.Finding each; ``host`` reads the files the checks look at)."""


def backends() -> list[type]:
    """Every backend, in order of preference (what --check reports on)."""
    from .bpftrace import BpftraceBackend
    from .stap import StapBackend
    return [StapBackend, BpftraceBackend]


def _stap_can_work() -> bool:
    """stap and staprun replaced (TCPIPSTAT_STAP, TCPIPSTAT_STAPRUN), or installed on a
    kernel that loads modules (--check tells the rest: headers, debuginfo, lockdown)."""
    if os.environ.get("TCPIPSTAT_STAP") or os.environ.get("TCPIPSTAT_STAPRUN"):
        return True
    return bool(shutil.which("stap") and shutil.which("staprun") and _loads_modules())


def _loads_modules() -> bool:
    """Can this kernel load a module at all (built with modules, loading not switched off)?"""
    try:
        with open("/proc/sys/kernel/modules_disabled") as f:
            disabled = f.read().strip() != "0"
    except OSError:
        disabled = False
    return os.path.exists("/proc/modules") and not disabled


def _chosen(plan) -> str | None:
    """--backend, auto resolved: stap where it can work, else bpftrace; None when auto
    finds neither."""
    if plan.backend != "auto":
        return plan.backend
    if _stap_can_work():
        return "stap"
    if os.environ.get("TCPIPSTAT_BPFTRACE") or shutil.which("bpftrace"):
        return "bpftrace"
    return None


def choose(plan, echo_stderr: Callable[[str], None]) -> Backend:
    """The backend that collects for ``plan`` (--backend)."""
    name = _chosen(plan)
    if name is None:
        from .bpftrace import INSTALL_HINT as BPF_HINT
        from .errors import EnvironmentNotReady
        from .stap import INSTALL_HINT as STAP_HINT
        raise EnvironmentNotReady("stap not found on PATH (SystemTap), nor bpftrace",
                                  f"{STAP_HINT}; or {BPF_HINT}")
    if name == "bpftrace":
        from .bpftrace import BpftraceBackend
        return BpftraceBackend(plan, echo_stderr)
    from .stap import StapBackend
    return StapBackend(plan, echo_stderr)


def dump_script(plan) -> str:
    """--dump-script: the chosen backend's program (auto with neither installed: stap's)."""
    if _chosen(plan) == "bpftrace":
        from .bpftrace import render_program
        return render_program(plan)
    from .stap import dump_script as stap_script
    return stap_script(plan)
