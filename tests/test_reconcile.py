"""Host reconciliation (tcpipstat/reconcile.py): the host's MIB counters around a run, what
the rows attributed, the remainder; on fixtures recorded by real bpftrace runs
(tests/fixtures/reconcile/record.sh: 3 connections to port 7001 in a network namespace of
their own, so the host's counters are the workload's alone)."""
import csv
import io
import json

import pytest

from tcpipstat import reconcile
from tcpipstat.errors import RecordParseError
from tcpipstat.records import Parser, SnapshotRecord

from .conftest import FIXTURES, json_rows, run_cli

HERE = FIXTURES / "reconcile"
BOTH = HERE / "native-both-ends.records"          # filters: both ends of port 7001
SERVER = HERE / "native-server-only.records"      # filter: the server's end only
LAB = HERE / "bookworm-stap-tcpwork-v4.records"   # stap in the lab's guest: 5 connections
OPENS = ("ActiveOpens", "PassiveOpens")

SNMP = """Ip: Forwarding DefaultTTL InReceives InHdrErrors InDiscards OutRequests
Ip: 1 64 100 2 3 90
Tcp: RtoAlgorithm ActiveOpens PassiveOpens CurrEstab InSegs
Tcp: 1 7 5 -1 400
TcpExt: SyncookiesSent DelayedACKs
TcpExt: 0 12
Ip6InReceives                   	40
Ip6OutRequests                  	30
Ip6InDiscards                   	1
"""


def test_proc_tables_read_by_name():
    got = reconcile.parse_tables(SNMP.splitlines())
    assert got == {"Ip.InReceives": 100, "Ip.InHdrErrors": 2, "Ip.InDiscards": 3,
                   "Ip.OutRequests": 90, "Tcp.ActiveOpens": 7, "Tcp.PassiveOpens": 5,
                   "Tcp.CurrEstab": -1, "Tcp.InSegs": 400, "TcpExt.DelayedACKs": 12,
                   "Ip6.Ip6InReceives": 40, "Ip6.Ip6OutRequests": 30, "Ip6.Ip6InDiscards": 1}


def test_ip_counters_add_their_ipv6_counterparts():
    start = SnapshotRecord("start", "local", {"Ip.InReceives": 100, "Ip6.Ip6InReceives": 40,
                                              "Tcp.ActiveOpens": 7})
    end = SnapshotRecord("end", "local", {"Ip.InReceives": 150, "Ip6.Ip6InReceives": 45,
                                          "Tcp.ActiveOpens": 9})
    rec = reconcile.reconcile({"start": start, "end": end}, {"InReceives": 50, "SendBytes": 9},
                              ("SendBytes", "InReceives", "ActiveOpens", "OutSegs"))
    # SendBytes has no MIB counterpart; OutSegs none in these snapshots
    assert [(ln.counter, ln.host, ln.attributed, ln.remainder) for ln in rec.lines] == [
        ("InReceives", 55, 50, 5), ("ActiveOpens", 2, 0, 2)]


def _stream(local: bool, lines: list[str], monkeypatch) -> list[str]:
    reads = iter([{"Tcp.ActiveOpens": 1}, {"Tcp.ActiveOpens": 4}])
    monkeypatch.setattr(reconcile, "read_host", lambda root=None: next(reads))
    return list(reconcile.Snapshots(local).stream(lines))


def test_local_snapshots_follow_the_header_and_the_trailer(monkeypatch):
    out = _stream(True, ["H\tx\n", "R\tx\n", "T\tx\n"], monkeypatch)
    assert out == ["H\tx\n", "N\t1\tstart\tlocal\tTcp.ActiveOpens=1\n", "R\tx\n", "T\tx\n",
                   "N\t1\tend\tlocal\tTcp.ActiveOpens=4\n"]


def test_a_stand_ins_snapshots_replace_this_hosts(monkeypatch):
    guest = ["# tcpipstat-snapshot BEFORE\n", "# Tcp: ActiveOpens PassiveOpens\n",
             "# Tcp: 10 20\n", "# tcpipstat-snapshot AFTER\n",
             "# Tcp: ActiveOpens PassiveOpens\n", "# Tcp: 15 26\n"]
    monkeypatch.setattr(reconcile, "read_host", lambda root=None: pytest.fail("read here"))
    out = list(reconcile.Snapshots(False).stream(["H\tx\n", "T\tx\n", *guest]))
    assert out == ["H\tx\n", "T\tx\n",
                   "N\t1\tstart\tcollector\tTcp.ActiveOpens=10\tTcp.PassiveOpens=20\n",
                   "N\t1\tend\tcollector\tTcp.ActiveOpens=15\tTcp.PassiveOpens=26\n"]
    # none from the stand-in: none at all (never this host's)
    assert list(reconcile.Snapshots(False).stream(["H\tx\n", "T\tx\n"])) == ["H\tx\n", "T\tx\n"]


@pytest.mark.parametrize("line, why", [
    ("N\t2\tstart\tlocal\tTcp.ActiveOpens=1", "snapshot record version 2"),
    ("N\t1\tmiddle\tlocal", "malformed snapshot record"),
    ("N\t1\tstart\tlocal\tActiveOpens=1", "unknown MIB counter 'ActiveOpens'"),
    ("N\t1\tstart", "malformed snapshot record")])
def test_bad_snapshot_records_are_named(line, why):
    with pytest.raises(RecordParseError, match=why):
        Parser("x").parse_line(line, 3)


def _json(*args) -> dict:
    status, out, err = run_cli("--from-records", *map(str, args), "--json")
    assert status == 0, err
    last = json.loads(out.splitlines()[-1])
    assert len(json_rows(out)) == len(out.splitlines()) - 1
    return last["reconciliation"]


def test_every_socket_of_the_workload_leaves_nothing_unattributed():
    rec = _json(BOTH, "index=lport")
    assert rec["source"] == "local" and rec["skipped_probe_hits"] == 0
    assert {n: rec["counters"][n] for n in OPENS} == {
        n: {"host": 3, "attributed": 3, "not_attributed": 0, "mib": [f"Tcp.{n}"]}
        for n in OPENS}
    # the Socket group has no MIB counterpart; n/a counters are not reconciled
    assert set(rec["counters"]) == {"ActiveOpens", "PassiveOpens", "AttemptFails",
                                    "EstabResets", "CurrEstab", "RetransSegs"}


@pytest.mark.parametrize("replay", [(SERVER,), (BOTH, "*:7001-*:*")])
def test_what_a_filter_leaves_out_is_the_remainder(replay):
    """The server's end only, filtered by the collector or by the replay: the 3 clients'
    opens are the host's and nobody's in the report."""
    c = _json(*replay)["counters"]
    assert [(c[n]["host"], c[n]["attributed"], c[n]["not_attributed"]) for n in OPENS] == [
        (3, 0, 3), (3, 3, 0)]


def test_the_table_footer():
    status, out, err = run_cli("--from-records", str(SERVER), "index=lport")
    assert status == 0, err
    i = out.index("Host reconciliation (this host's /proc/net counters")
    lines = out[i:].splitlines()
    assert lines[1].split() == ["counter", "host", "attributed", "not", "attributed"]
    assert lines[2].split() == ["ActiveOpens", "3", "0", "3"]
    assert lines[3].split() == ["PassiveOpens", "3", "3", "0"]


def test_the_csv_lines():
    status, out, err = run_cli("--from-records", str(SERVER), "--csv", "index=lport")
    assert status == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["reconciliation"] for r in rows] == ["", "host", "attributed", "not_attributed"]
    assert rows[0]["lport"] == "7001" and rows[0]["PassiveOpens"] == "3"
    assert [(r["ActiveOpens"], r["PassiveOpens"], r["SendBytes"], r["lport"])
            for r in rows[1:]] == [("3", "3", "", ""), ("0", "3", "", ""), ("3", "0", "", "")]


def test_the_csv_of_interval_snapshots_has_the_column_from_its_header():
    """--interval: the header comes with the first snapshot, long before the end: the
    column is there from it on (this host's counters are expected), the host's lines
    under the snapshots' columns."""
    from rich.console import Console

    from tcpipstat.model import Collection
    from tcpipstat.records import Header, parse_text
    from tcpipstat.report import ReportContext
    from tcpipstat.sinks import make_sink
    recs = parse_text((HERE / "native-interval.records").read_text())
    (header,) = [r for r in recs if isinstance(r, Header)]
    ctx = ReportContext(header.counters, reconciling=True)
    out = io.StringIO()
    sink = make_sink("csv", ctx, out, Console(file=io.StringIO()), Console(file=io.StringIO()))
    coll = Collection(on_interval=lambda win: sink.on_window(win, win.rows(), 0, False))
    coll.extend(recs).finish()
    ctx.reconciliation = reconcile.reconcile(coll.snapshots, coll.totals(), ctx.available)
    sink.on_end(None, "")
    lines = list(csv.reader(io.StringIO(out.getvalue())))
    assert lines[0][:3] == ["interval", "time", "final"] and lines[0][-1] == "reconciliation"
    assert {len(x) for x in lines} == {len(lines[0])}
    rows = [dict(zip(lines[0], x)) for x in lines[1:]]
    assert sum(r["interval"] != "" for r in rows) == 6      # the 6 sockets' rows
    assert [(r["reconciliation"], r["ActiveOpens"], r["PassiveOpens"]) for r in rows[-3:]] == [
        ("host", "3", "3"), ("attributed", "3", "3"), ("not_attributed", "0", "0")]


@pytest.mark.parametrize("fmt", [(), ("--json",), ("--csv",)])
def test_recordings_without_snapshots_have_no_reconciliation(fmt):
    status, out, err = run_cli("--from-records", str(FIXTURES / "bookworm-tcpwork-v4.records"),
                               *fmt)
    assert status == 0, err
    assert "reconciliation" not in (out + err).lower()


def test_a_lab_run_reconciles_with_the_guests_counters():
    """The stand-in's snapshots (the guest's), with the stap collector's segment counters."""
    rec = _json(LAB)
    assert rec["source"] == "collector"
    c = rec["counters"]
    assert [(n, c[n]["host"], c[n]["attributed"], c[n]["not_attributed"])
            for n in ("ActiveOpens", "PassiveOpens", "InSegs", "OutSegs", "InReceives")] == [
        ("ActiveOpens", 5, 5, 0), ("PassiveOpens", 5, 5, 0), ("InSegs", 50, 50, 0),
        ("OutSegs", 50, 50, 0), ("InReceives", 50, 50, 0)]
    assert c["InReceives"]["mib"] == ["Ip.InReceives", "Ip6.Ip6InReceives"]
    assert "InNoRoutes" not in c          # (IpExt: not in the guest's snapshots)
    status, out, err = run_cli("--from-records", str(LAB), "index=lport")
    assert "Host reconciliation (the collector's host's /proc/net counters" in out
    status, out, err = run_cli("--from-records", str(LAB), "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["reconciliation"], r["InSegs"]) for r in rows[-3:]] == [
        ("host", "50"), ("attributed", "50"), ("not_attributed", "0")]


def test_bpftrace_ends_collection_at_its_stop_line(monkeypatch):
    """The line the program writes before its exit() (timeout, --count) is where counting
    ends: the end snapshot is taken there, not at END (after the probes' detaching), and
    the line is no record."""
    from tcpipstat import bpftrace
    runner = bpftrace.Runner(["bpftrace"], ("ActiveOpens",), 100, print)
    reads = iter([{"Tcp.ActiveOpens": 1}, {"Tcp.ActiveOpens": 4}])
    monkeypatch.setattr(reconcile, "read_host", lambda root=None: next(reads))
    snaps = reconcile.Snapshots(True)
    runner.on_end = snaps.end
    lines = ["H\ttcpipstat\t3\t0.1.0\t5\t0\t100\tActiveOpens\n", bpftrace.STOP_MARK + "\n",
             bpftrace.END_MARK + "\n", "T\t9\t0\t0\t0\t0\t0\t1\n"]
    out = list(snaps.stream(runner._records(iter(lines))))
    assert [x.split("\t")[0] for x in out] == ["H", "N", "T", "N"]
    assert [out[1], out[3]] == ["N\t1\tstart\tlocal\tTcp.ActiveOpens=1\n",
                                "N\t1\tend\tlocal\tTcp.ActiveOpens=4\n"]
