"""How much of the host a report explains: the host's own MIB counters over the collection
window, what the report's rows attributed, and the remainder.

The host's counters are read from /proc/net/snmp, /proc/net/netstat and /proc/net/snmp6
twice (:class:`Snapshots`): as collection begins and as it ends. Both moments are the
collector's own: its header record is written once its probes are attached (stap's
``probe begin``; bpftrace's BEGIN, whose output bpftrace reads once it has attached the
rest), and collection ends at its trailer (stap: the module writes nothing after it) or,
for bpftrace, where the backend calls :meth:`Snapshots.end`: at the line its program
writes before ending the run itself, at Ctrl-C, else where END begins (the probes are
detached by then). A snapshot is taken as tcpipstat reads that line, so what happens
between the collector's moment and tcpipstat's reading (milliseconds; a -c command starts
as the probes are attached) can fall on either side: events just after attaching may be
in the rows but not in the host's delta, events just before the end in the host's delta
but not in the rows. The counters are those of tcpipstat's network namespace.

Where the collector runs on another host (a replaced stap or bpftrace command, as in the
lab), this host's counters say nothing of it: its stand-in reports that host's own
snapshots as comment lines on the record stream (``SNAPSHOT_LINE``, then the lines of
/proc/net/snmp, /proc/net/netstat and the snmp6 counters as one header and one value
line), taken before the collector starts and after it exits. They become the same
records.

The snapshots travel with the records as N records (tcpipstat/records.py), so that a
replay (--from-records) reconciles as the live run did.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from .records import SNAPSHOT, SNAPSHOT_VERSION, SnapshotRecord

# Each counter with a MIB counterpart: the host's counters that count the same events.
# Tcp counts both families (the kernel keeps one TCP MIB); Ip's IPv6 counterparts are
# Ip6's. Ip counts every protocol, tcpipstat only datagrams carrying TCP. The Socket
# group (bytes and messages an application moved) and the congestion times have none.
MIB: dict[str, tuple[str, ...]] = {
    "InReceives": ("Ip.InReceives", "Ip6.Ip6InReceives"),
    "OutRequests": ("Ip.OutRequests", "Ip6.Ip6OutRequests"),
    "InDiscards": ("Ip.InDiscards", "Ip.InHdrErrors", "Ip6.Ip6InDiscards",
                   "Ip6.Ip6InHdrErrors", "Ip6.Ip6InTruncatedPkts"),
    "InNoRoutes": ("IpExt.InNoRoutes",),
    **{n: (f"Ip.{n}",) for n in ("InAddrErrors", "InUnknownProtos", "ForwDatagrams",
                                 "ReasmTimeout", "ReasmReqds", "FragOKs", "FragFails")},
    **{n: (f"Tcp.{n}",) for n in ("ActiveOpens", "PassiveOpens", "AttemptFails",
                                  "EstabResets", "CurrEstab", "InSegs", "OutSegs",
                                  "RetransSegs", "OutRsts")},
    **{n: (f"TcpExt.{n}",) for n in ("DelayedACKs", "ListenOverflows", "ListenDrops",
                                     "TCPMemoryPressures")},
}
NAMES = frozenset(n for names in MIB.values() for n in names)
SNAPSHOT_LINE = "tcpipstat-snapshot"    # a stand-in's comment: "# tcpipstat-snapshot WHEN"
PROC_NET = Path("/proc/net")


def parse_tables(lines: Iterable[str]) -> dict[str, int]:
    """``Proto: NAME ...`` / ``Proto: VALUE ...`` line pairs (snmp, netstat) and
    ``NAME VALUE`` lines (snmp6) -> {"Proto.NAME": value} for the names in MIB."""
    out: dict[str, int] = {}
    heads: dict[str, list[str]] = {}
    for line in lines:
        words = line.split()
        if len(words) == 2 and words[0].startswith("Ip6") and words[1].isdigit():
            out["Ip6." + words[0]] = int(words[1])
        elif words and words[0].endswith(":"):
            proto = words[0][:-1]
            if proto not in heads or not words[1:2] or not words[1].lstrip("-").isdigit():
                heads[proto] = words[1:]
                continue
            out.update((f"{proto}.{n}", int(v)) for n, v in zip(heads.pop(proto), words[1:]))
    return {k: v for k, v in out.items() if k in NAMES}


def read_host(root: Path = PROC_NET) -> dict[str, int]:
    """This host's counters now (its network namespace's, as tcpipstat's /proc shows)."""
    lines: list[str] = []
    for name in ("snmp", "netstat", "snmp6"):
        try:
            lines += (root / name).read_text().splitlines()
        except OSError:
            pass      # (no IPv6: no snmp6; a counter missing is left out of the report)
    return parse_tables(lines)


def snapshot_line(when: str, source: str, values: dict[str, int]) -> str:
    """The N record of a snapshot."""
    pairs = "".join(f"\t{k}={v}" for k, v in sorted(values.items()))
    return SNAPSHOT.printf() % (SNAPSHOT_VERSION, when, source) + pairs + "\n"


class Snapshots:
    """Takes the host's snapshots around a live collection and puts them into its record
    stream (:meth:`stream`). ``local``: this host's counters, taken at the collector's
    moments; otherwise its stand-in's, from the stream, or none."""

    def __init__(self, local: bool):
        self.local = local
        self._taken: list[str] = []        # N lines not yet handed on
        self._done: set[str] = set()
        self._remote: dict[str, list[str]] = {}
        self._when = ""                     # the stand-in's snapshot being read ("": none)

    def _take(self, when: str) -> None:
        if self.local and when not in self._done:
            self._done.add(when)
            self._taken.append(snapshot_line(when, "local", read_host()))

    def end(self) -> None:
        """Collection ended (the backend's moment, where it knows it better)."""
        self._take("end")

    def _remote_line(self, line: str) -> bool:
        """A stand-in's snapshot line (kept, True), or not one."""
        text = line.lstrip("# ")
        if text.startswith(SNAPSHOT_LINE + " "):
            self._when = text.split()[1].lower()
            self._remote.setdefault(self._when, [])
            return True
        if self._when and line.startswith("# ") and not self.local:
            self._remote[self._when].append(text)
            return True
        self._when = ""
        return False

    def stream(self, lines: Iterable[str]) -> Iterator[str]:
        """The collector's lines with the snapshot records put in: after the header, and
        after the trailer or at the end (whichever comes first)."""
        for line in lines:
            if self._remote_line(line):
                continue
            if line.startswith("T\t"):
                self._take("end")
            yield line
            if line.startswith("H\t"):
                self._take("start")
            yield from self._pending()
        self._take("end")
        yield from self._pending()
        yield from self._from_remote()

    def _pending(self) -> Iterator[str]:
        taken, self._taken = self._taken, []
        yield from taken

    def _from_remote(self) -> Iterator[str]:
        pairs = {"before": "start", "after": "end"}
        if not self.local and set(pairs) <= set(self._remote):
            for theirs, ours in pairs.items():
                yield snapshot_line(ours, "collector", parse_tables(self._remote[theirs]))


@dataclass(frozen=True)
class Line:
    counter: str
    host: int
    attributed: int
    mib: tuple[str, ...]

    @property
    def remainder(self) -> int:
        return self.host - self.attributed


@dataclass(frozen=True)
class Reconciliation:
    source: str                  # "local" or "collector" (records.SNAPSHOT_SOURCES)
    lines: tuple[Line, ...]
    skipped: int                 # probe hits the collector could not run


def reconcile(snapshots: dict[str, SnapshotRecord], attributed: dict[str, int],
              available: Iterable[str], skipped: int = 0) -> Reconciliation | None:
    """Each available counter with a MIB counterpart whose host counters both snapshots
    hold; None without both snapshots."""
    start, end = snapshots.get("start"), snapshots.get("end")
    if start is None or end is None:
        return None
    lines = []
    for name in available:
        mib = MIB.get(name)
        if mib and all(m in start.values and m in end.values for m in mib):
            host = sum(end.values[m] - start.values[m] for m in mib)
            lines.append(Line(name, host, attributed.get(name, 0), mib))
    return Reconciliation(end.source, tuple(lines), skipped)


WHERE = {"local": "this host's", "collector": "the collector's host's"}


def footer_lines(rec: Reconciliation) -> list[str]:
    """The table report's section."""
    out = [f"Host reconciliation ({WHERE[rec.source]} /proc/net counters over the collection"
           " window; the rest is not attributed: filtered out, no socket, skipped probe hits):"]
    width = max([len(ln.counter) for ln in rec.lines] + [7])
    out.append(f"  {'counter':<{width}} {'host':>12} {'attributed':>12} {'not attributed':>15}")
    for ln in rec.lines:
        out.append(f"  {ln.counter:<{width}} {ln.host:>12,} {ln.attributed:>12,} "
                   f"{ln.remainder:>15,}")
    if rec.skipped:
        out.append(f"  (the collector skipped {rec.skipped:,} probe hits)")
    return out


def as_dict(rec: Reconciliation) -> dict:
    """NDJSON's final object."""
    return {"reconciliation": {
        "source": rec.source, "skipped_probe_hits": rec.skipped,
        "counters": {ln.counter: {"host": ln.host, "attributed": ln.attributed,
                                  "not_attributed": ln.remainder, "mib": list(ln.mib)}
                     for ln in rec.lines}}}


def write_json(out: IO[str], rec: Reconciliation) -> None:
    out.write(json.dumps(as_dict(rec), separators=(",", ":")) + "\n")


CSV_COLUMN = "reconciliation"
CSV_KINDS = ("host", "attributed", "not_attributed")


def csv_values(rec: Reconciliation) -> dict[str, dict[str, int]]:
    """CSV's three last lines: kind -> {counter: value}."""
    return {"host": {ln.counter: ln.host for ln in rec.lines},
            "attributed": {ln.counter: ln.attributed for ln in rec.lines},
            "not_attributed": {ln.counter: ln.remainder for ln in rec.lines}}
