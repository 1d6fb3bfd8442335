"""How a run ended, as one object: what the report's notes say, and what
``--outcome-json FILE`` writes for scripts and tests to read.

:func:`run_notes` is the one place that turns the facts of a run into the notes
printed under its report.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .records import ENDED_BY


@dataclass
class Outcome:
    """The facts of one run (live, replayed or a capture's), in the order its notes give
    them."""
    capture: list[str] = field(default_factory=list)      # --read: what the capture showed
    cong: str = ""                 # how congestion states were seen ("": no cong group)
    skipped: int = 0               # probe hits the collector could not run
    unreadable: int = 0            # collector lines that were not records
    first_unreadable: str = ""
    faults: int = 0                # events a probe could not read
    dropped: int = 0               # events lost to full collector tables
    pfull: int = 0                 # times the process table was full
    max_sockets: int = 0           # the collector's table size
    warnings: list[str] = field(default_factory=list)     # the collector's own warnings
    finished: bool = True          # the collector wrote its trailer
    ended_by: str = ""             # what ended the run (records.ENDED_BY), "" if not told
    written: list[str] = field(default_factory=list)      # --series / --plot: what was written
    no_rfc4898: int = 0            # --rfc4898: sockets still open at the end (no variables)
    still_open: int = 0            # onclose=1: sockets still open at the end (not reported)
    hidden: int = 0                # --top: rows left out
    top: int | None = None
    sort: str | None = None
    rejected: int = 0              # --read: connections the filters did not accept
    outside_tree: int = 0          # -c: active sockets not used by the command's processes
    rows: int = 0                  # rows in the report
    duration_s: float | None = None
    interrupted: bool = False
    returncode: int | None = 0     # the collector's exit status
    available: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {**asdict(self), "notes": run_notes(self)}

    def write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.as_dict(), sort_keys=True) + "\n")


def ended_by(code: int) -> str:
    return ENDED_BY.get(code, "")


def run_notes(o: Outcome) -> list[str]:
    """The notes under a run's report, in order."""
    notes = list(o.capture)
    if o.cong:
        notes.append(f"congestion states seen through the {o.cong}")
    notes += _collector_notes(o)
    notes += o.written
    if o.no_rfc4898:
        notes.append(f"{o.no_rfc4898} sockets were still open at the end: RFC 4898 variables "
                     "are read as a socket closes, so they have none")
    if o.still_open:
        notes.append(f"{o.still_open} sockets were still open at the end and are not reported "
                     "(onclose=1)")
    if o.hidden:
        notes.append(f"{o.hidden} more rows not shown (--top {o.top}, by {o.sort})")
    if o.rejected:
        notes.append(f"{o.rejected:,} connections were not accepted by the filters")
    if o.outside_tree:
        notes.append(f"{o.outside_tree} sockets active meanwhile were not used by the command's "
                     "processes and are not reported (--all-processes shows them)")
    return notes


def _collector_notes(o: Outcome) -> list[str]:
    """What the collector could not count, and why."""
    notes = []
    if o.skipped:
        notes.append(f"stap skipped {o.skipped} probe hits (probes that fired while another "
                     "ran on the same CPU, missed returns or lock waits): counters may be low "
                     "by up to that many events")
    if o.unreadable:
        notes.append(f"{o.unreadable} lines from the collector were not records and were "
                     f"skipped (first: {o.first_unreadable}): counters may be low")
    if o.faults:
        notes.append(f"{o.faults} events could not be read (memory faults in probes)")
    size = o.max_sockets
    if o.dropped:
        notes.append(f"{o.dropped} events were not counted: the collector's tables "
                     f"(--max-sockets {size}) were full; they hold the sockets active between "
                     f"two flushes, and more than {size // 2} were active within 10 ms")
    if o.pfull:
        notes.append(f"the process table (--max-sockets {size}) was full {o.pfull} "
                     "times: some sockets may show no process")
    notes += [f"stap: {w}" for w in o.warnings]
    if not o.finished:
        notes.append("the collector did not finish normally: the report holds what was "
                     "received")
    return notes
