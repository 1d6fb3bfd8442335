"""What the rest of tcpipstat asks of a collector: the Backend protocol.

A backend turns a plan into a running collector and hands back its record stream
(the line format of tcpipstat/records.py). The SystemTap collector
(tcpipstat/stap.py, :class:`~tcpipstat.stap.StapBackend`) is the first one. Nothing
outside a backend knows how it loads its probes: modules, staprun and the module's
control files are the stap backend's business.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol


@dataclass
class Prepared:
    """What a backend found it can collect on the target kernel."""
    kernel: str
    available: tuple[str, ...]          # counters this kernel gives
    unavailable: tuple[str, ...]        # in the chosen groups, not on this kernel
    cong: str = ""                      # how congestion states are seen ("": no cong group)


@dataclass
class RunOutcome:
    """How a collector's run ended, as the backend saw it (the records' own trailer
    says the rest)."""
    returncode: int | None = 0
    interrupted: bool = False
    errors: int = 0
    skipped: int = 0                    # probe hits the collector could not run
    warnings: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    stderr: str = ""
    bad_lines: int = 0                  # collector output that was not a record (skipped)
    first_bad: str = ""
    problem: tuple[str, str] | None = None   # (what went wrong, the fix), when known
    program: str = "the collector"      # who ran it, as error messages name it


Log = Callable[[str], None]


class Backend(Protocol):
    """One collector. ``prepare`` first, then ``lines`` once."""
    name: str
    outcome: RunOutcome

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
    from .stap import StapBackend
    return [StapBackend]


def choose(plan, echo_stderr: Callable[[str], None]) -> Backend:
    """The backend that collects for ``plan`` (only SystemTap, for now)."""
    from .stap import StapBackend
    return StapBackend(plan, echo_stderr)
