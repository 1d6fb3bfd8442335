"""How a run ended, as one object: what the report's notes say, and what
``--outcome-json FILE`` writes for scripts and tests to read.

:func:`run_notes` is the one place that turns the facts of a run into the notes
printed under its report.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .records import ENDED_BY


def _f(default, doc: str):
    """A field with its documentation (a factory when ``default`` is a type)."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class Outcome:
    """The facts of one run (live, replayed or a capture's), in the order its notes give
    them. Each field's doc is its entry in the man page (OUTCOME)."""
    capture: list[str] = _f(list, "--read: what the capture showed (its notes)")
    cong: str = _f("", "how congestion states were seen (empty: no cong group)")
    skipped: int = _f(0, "probe hits the collector could not run (counters may be low by as "
                      "many events)")
    unreadable: int = _f(0, "collector lines that were not records (skipped)")
    first_unreadable: str = _f("", "the first of them, with its line number")
    faults: int = _f(0, "events a probe could not read")
    dropped: int = _f(0, "events lost because the collector's tables were full")
    pfull: int = _f(0, "times the process table was full (some sockets may lack a process)")
    untracked: int = _f(0, "bpftrace: sockets the filters accept that its tables, full, could "
                        "not hold: not counted, or not wholly")
    untracked_events: int = _f(0, "bpftrace: events its full tables lost besides: of more "
                               "sockets left out at once than --max-sockets, or a -c "
                               "command's process not followed")
    lost_writes: int = _f(0, "stap: the module's writes its transport could not take (the "
                          "records in them are lost: counts may be low)")
    lost_records: int = _f(0, "socket records the collector wrote (its trailer counts them) "
                           "that did not arrive, whatever lost them: counts may be low")
    max_sockets: int = _f(0, "the collector's table size (--max-sockets)")
    warnings: list[str] = _f(list, "the collector's own warnings")
    collector: str = _f("stap", "the collector that ran (stap or bpftrace), as its warnings "
                        "are named")
    finished: bool = _f(True, "false when the collector did not write its trailer (cut short)")
    ended_by: str = _f("", "what ended the run: timeout, count, request (Ctrl-C or the end of "
                       "the -c command), stap; empty when not told")
    written: list[str] = _f(list, "--series and --plot: what was written where")
    unwritten: list[str] = _f(list, "--series and --plot: what could not be written, and why")
    no_rfc4898: int = _f(0, "--rfc4898: sockets still open at the end (no variables)")
    still_open: int = _f(0, "onclose=1: sockets still open at the end (not reported)")
    hidden: int = _f(0, "--top: rows left out")
    top: int | None = _f(None, "--top N")
    sort: str | None = _f(None, "the counter rows were sorted by")
    rejected: int = _f(0, "--read: connections the filters did not accept")
    outside_tree: int = _f(0, "-c: active sockets not used by the command's processes")
    rows: int = _f(0, "rows in the report (0 when snapshots or closes were the report)")
    duration_s: float | None = _f(None, "seconds from the collector's start to its end")
    interrupted: bool = _f(False, "true after Ctrl-C")
    returncode: int | None = _f(0, "the collector's exit status")
    available: tuple[str, ...] = _f(tuple, "the counters this kernel gave")
    unavailable: tuple[str, ...] = _f(tuple, "counters of the chosen groups this kernel lacks")

    def as_dict(self) -> dict:
        return {**asdict(self), "notes": run_notes(self)}

    def write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.as_dict()) + "\n")


def documented_fields() -> list[tuple[str, str]]:
    """(name, what it says) of every field --outcome-json writes, notes last."""
    return [(f.name, f.metadata["doc"]) for f in fields(Outcome)] + [
        ("notes", "the notes printed under the report, in order")]


def ended_by(code: int) -> str:
    return ENDED_BY.get(code, "")


def run_notes(o: Outcome) -> list[str]:
    """The notes under a run's report, in order."""
    notes = list(o.capture)
    if o.cong:
        notes.append(f"congestion states seen through the {o.cong}")
    notes += _collector_notes(o)
    notes += o.written + o.unwritten
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
        notes.append(f"{o.collector} skipped {o.skipped} probe hits (probes that fired while "
                     "another ran on the same CPU, missed returns or lock waits): counters may "
                     "be low by up to that many events")
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
    if o.untracked:
        notes.append(f"{o.untracked} sockets were not counted, or not wholly: bpftrace's "
                     f"tables (--max-sockets {size}) were full; they hold {size} sockets "
                     "at once")
    if o.untracked_events:
        notes.append(f"{o.untracked_events} more events were lost to bpftrace's full tables "
                     f"(--max-sockets {size}): of more sockets left out at once than they "
                     "hold, or of a -c command's process they could not follow")
    if o.lost_writes:
        notes.append(f"stap's transport lost {o.lost_writes} of the module's writes: the "
                     "records in them are missing, so counts may be low")
    if o.lost_records:
        notes.append(f"{o.lost_records} socket records the {o.collector} collector wrote did "
                     "not arrive (its trailer counts them): counts may be low")
    notes += [f"{o.collector}: {w}" for w in o.warnings]
    if not o.finished:
        notes.append("the collector did not finish normally: the report holds what was "
                     "received")
    return notes
