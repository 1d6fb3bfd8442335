"""Process attribution (index=pid/comm, -x, the -c process tree), interval snapshots,
sorting and --top, on records recorded in the lab (tests/fixtures/refresh.sh)."""
import json
import re

import pytest

from tcpipstat.errors import ExitStatus
from tcpipstat.model import Collection, sort_rows
from tcpipstat.plan import build_plan
from tcpipstat.records import Parser

from .conftest import FIXTURES, run_cli

PERIODIC = FIXTURES / "bookworm-periodic-interval.records"   # --interval 1, 20 connections to :7007
ORPHAN = FIXTURES / "bookworm-orphan-tree.records"           # -c; the :7009 server outside the tree
TWO_PROGRAMS = FIXTURES / "trixie-tcpwork-iperf3.records"    # tcpwork (:7008) beside iperf3
FORMAT1 = FIXTURES / "bookworm-tcpwork-v4.format1.records"   # as tcpipstat 0.1 wrote it
TOO_SMALL = FIXTURES / "bookworm-table-too-small.records"    # --max-sockets 64, 162 busy sockets


def load(path, **kw) -> Collection:
    return Collection(**kw).extend(Parser(path.name).parse(path.read_text().splitlines()))


def test_format_1_records_still_read():
    c = load(FORMAT1)
    assert c.header.format == 1 and c.trailer is not None
    assert sum(s.counters.get("PassiveOpens", 0) for s in c.sockets.values()) == 5
    assert not any(s.in_tree for s in c.sockets.values())


def test_lost_events_are_told_and_the_rest_reported():
    """A real run whose tables were too small: the trailer's lost events make a note,
    a one-line error with the fix and exit 1; everything received is still reported."""
    c = load(TOO_SMALL)
    tr = c.trailer
    assert tr.dropped > 0 and tr.faults == 0
    status, out, err = run_cli("--from-records", str(TOO_SMALL), "--json")
    assert status == ExitStatus.ERROR
    assert f"tcpipstat: {tr.dropped} events were lost to full tables" in err
    assert "fix: raise --max-sockets (now 64)" in err
    assert re.search(rf"{tr.dropped} events were not counted: the collector's tables"
                     r"\s+\(--max-sockets 64\)", err)
    rows = [json.loads(line) for line in out.splitlines()]
    assert sum(r["counters"]["InSegs"] for r in rows) == sum(
        s.counters.get("InSegs", 0) for s in c.sockets.values()) > 0


def test_trailers_before_the_process_table_count_read_as_zero():
    c = load(ORPHAN)        # recorded before the trailer had its 7th field
    assert c.trailer is not None and c.trailer.pfull == 0 and c.trailer.dropped == 0


def test_windows_add_up_to_the_whole_run():
    windows = []
    c = load(PERIODIC, on_interval=windows.append)
    c.finish()
    marks = [line for line in PERIODIC.read_text().splitlines() if line.startswith("I\t")]
    assert [w.seq for w in windows if not w.final] == list(range(1, len(marks) + 1))
    # marks come from a 0.1 s timer, on the start + k * interval grid: no drift
    assert all(abs(w.end_ms - w.start_ms - 1000) <= 150 for w in windows[1:len(marks)])
    assert abs(windows[len(marks) - 1].end_ms - c.header.start_ms - 1000 * len(marks)) <= 150
    for k in ("SendBytes", "RecvBytes", "ActiveOpens", "InSegs", "OutSegs"):
        in_windows = sum(r.counters.get(k, 0) for w in windows for r in w.rows("tuple"))
        assert in_windows == c.totals()[k], k
    assert c.totals()["ActiveOpens"] == 20 and c.totals()["SendBytes"] == 20 * 330


def test_interval_output_through_the_whole_tool(tmp_path):
    # the recorded run replayed by the scripted staprun stand-in, through the real CLI path
    from .test_process_handling import tcpipstat
    p = tcpipstat(["--json", "--interval", "1", "*:7007-*:*"], tmp_path, FAKE_RECORDS=str(PERIODIC))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and all({"interval", "time", "final"} <= set(r) for r in rows)
    assert sum(r["counters"]["SendBytes"] for r in rows) == 20 * 330
    p = tcpipstat(["-T", "--interval", "1", "*:7007-*:*"], tmp_path, FAKE_RECORDS=str(PERIODIC))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    marks = sum(1 for line in PERIODIC.read_text().splitlines() if line.startswith("I\t"))
    assert len(re.findall(r"^\d\d:\d\d:\d\d  interval \d+, ", out, re.M)) >= marks, out
    p = tcpipstat(["--csv", "--interval", "1", "*:7007-*:*"], tmp_path, FAKE_RECORDS=str(PERIODIC))
    out, err = p.communicate(timeout=60)
    lines = out.splitlines()
    assert lines[0].startswith("interval,time,final,index,")
    assert sum(line.startswith("interval,") for line in lines) == 1


def test_command_tree_selection():
    c = load(ORPHAN, keep=lambda st: st.in_tree)
    rows = c.rows("tuple")
    assert [r.key.rport for r in rows] == [7009, 7009]           # the client's sockets only
    assert c.totals()["SendBytes"] == 200 and "PassiveOpens" not in c.totals()
    # replaying a -c run keeps its selection (the file says tree=1)
    status, out, err = run_cli("--from-records", str(ORPHAN), "--json")
    assert status == 0, err
    assert [json.loads(line)["rport"] for line in out.splitlines()] == [7009, 7009]
    assert "2 sockets active meanwhile were not used by the command's processes" in err


def test_pid_selection_and_process_indexes():
    procs = {s.pid: s.comm for s in load(TWO_PROGRAMS).sockets.values() if s.pid}
    tw_server = next(p for p, c in procs.items() if c == "tcpwork"
                     and any(s.pid == p and s.tuple.lport == 7008
                             for s in load(TWO_PROGRAMS).sockets.values()))
    status, out, err = run_cli("--from-records", str(TWO_PROGRAMS), "--json", "-x", str(tw_server))
    assert status == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3 and all(r["lport"] == 7008 for r in rows)
    assert sum(r["counters"]["RecvBytes"] for r in rows) == 3000
    status, out, err = run_cli("--from-records", str(TWO_PROGRAMS), "--json", "index=comm")
    by = {json.loads(line)["comm"]: json.loads(line) for line in out.splitlines()}
    assert set(by) == {"tcpwork", "iperf3"}
    assert by["tcpwork"]["sockets"] == 6 and by["tcpwork"]["counters"]["SendBytes"] == 3300
    status, out, err = run_cli("--from-records", str(TWO_PROGRAMS), "--json", "index=pid")
    pids = [json.loads(line) for line in out.splitlines()]
    assert len(pids) == 4 and all(p["pid"] in procs for p in pids)
    status, out, err = run_cli("--from-records", str(TWO_PROGRAMS), "index=comm")
    assert "Command: iperf3" in out and "Command: tcpwork" in out


def test_unknown_process_is_its_own_row():
    # the same run as if no probe had ever run in process context: PID 0, COMM "", FLAGS 0
    lines = [line if not line.startswith("R\t")
             else "\t".join(line.split("\t")[:9] + ["0", "", "0"] + line.split("\t")[12:])
             for line in PERIODIC.read_text().splitlines()]
    c = Collection().extend(Parser("x").parse(lines))
    rows = c.rows("pid")
    assert [r.key.pid for r in rows] == [0]
    assert rows[0].sockets == 40


def test_sort_and_top():
    c = load(TWO_PROGRAMS)
    rows, hidden = sort_rows(c.rows("tuple"), "bytes", 2)
    assert hidden == len(c.rows("tuple")) - 2
    assert [r.counters.get("SendBytes", 0) + r.counters.get("RecvBytes", 0)
            for r in rows] == [201850917] * 2
    rows, _ = sort_rows(c.rows("tuple"), "InSegs", None)
    segs = [r.counters.get("InSegs", 0) for r in rows]
    assert segs == sorted(segs, reverse=True)
    status, out, err = run_cli("--from-records", str(TWO_PROGRAMS), "--json",
                               "--top", "1", "--sort", "sendbytes")
    assert status == 0 and len(out.splitlines()) == 1 and json.loads(out)["rport"] == 5201
    assert "more rows not shown (--top 1, by SendBytes)" in err


@pytest.mark.parametrize("argv, token", [
    (["interval=0"], "interval '0'"),
    (["--interval", "x1"], "interval 'x1'"),
    (["--interval", "0.01"], "interval '0.01'"),
    (["--count", "3"], "--count needs --interval"),
    (["--interval", "1", "--count", "0"], "--count '0'"),
    (["--interval", "1", "--count", "-2"], "--count '-2'"),
    (["-T"], "-T/--timestamp needs --interval"),
    (["--interval", "1", "onclose=1"], "interval and onclose"),
    (["--sort", "Bogus"], "--sort 'Bogus'"),
    (["--top", "0"], "--top '0'"),
    (["--top", "1e3"], "--top '1e3'"),
    (["-x", "abc"], "pid 'abc'"),
    (["-x", "0"], "pid '0'"),
    (["--pid", "99999999"], "pid '99999999'"),
    (["--all-processes"], "--all-processes only makes sense with -c"),
    (["-c", "true", "--all-processes", "-x", "5"], "contradict"),
    (["index=pid", "--groups", "tcp"], "index=pid needs the socket group"),
    (["-c", "true", "--groups", "ip"], "-c (its process tree) needs the socket group"),
    (["-x", "5", "--groups", "tcp,ip"], "-x/--pid needs the socket group"),
    (["index=process"], "index 'process'"),
    (["interval=1;exit()"], "interval '1;exit()'"),
])
def test_bad_new_options_are_named(argv, token):
    status, out, err = run_cli(*argv)
    assert status == ExitStatus.USAGE, err
    assert token in err and out == ""


def test_new_options_reach_the_plan_and_module_args_only_as_numbers():
    from tcpipstat.render import module_args
    p = build_plan(["interval=2.5", "--count", "4", "-T", "--top", "5", "-c", "true"])
    assert ((p.interval_s, p.count, p.timestamp, p.top, p.sort, p.tree)
            == (2.5, 4, True, 5, "bytes", True))
    assert module_args([], None, p.interval_s, p.count) == [
        "tis_nfilters=0", "tis_interval_ms=2500", "tis_count=4"]
    assert build_plan(["-c", "true", "--all-processes"]).tree is False
    assert build_plan(["-c", "true", "-x", "7"]).tree is False and build_plan(["-x", "7"]).pid == 7
    assert build_plan(["--sort", "retranssegs"]).sort == "RetransSegs"


def test_windows_add_up_under_the_command_tree_selection():
    """A handshake in one interval and its accept() in the next: the earlier window must
    keep the socket whose process is not known yet, or the snapshots lose what the whole
    run counts. Here: the recorded run, with a process-less first record (two segments)
    put in the first interval for a socket whose process shows up in the second."""
    lines = PERIODIC.read_text().splitlines()
    first_mark = next(i for i, line in enumerate(lines) if line.startswith("I\t"))
    later = next(line for line in lines[first_mark:]
                 if line.startswith("R\t") and line.split("\t")[11] == "1")
    f = later.split("\t")
    early = "\t".join(["R", "spill"] + f[2:9] + ["0", "", "0", "InSegs=2"])
    edited = lines[:first_mark] + [early] + lines[first_mark:]
    windows = []
    c = Collection(keep=lambda st: st.in_tree, selection="tree", on_interval=windows.append)
    c.extend(Parser("x").parse(edited))
    c.finish()
    whole = c.totals()
    assert whole["SendBytes"] > 0
    for k in ("SendBytes", "InSegs", "ActiveOpens"):
        assert sum(r.counters.get(k, 0) for w in windows for r in w.rows("tuple")) == whole[k], k
