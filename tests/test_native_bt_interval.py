"""The bpftrace collector's interval snapshots, full tables and version check
(tcpipstat/bpftrace.py, tcpipstat/bt_templates/tcpipstat.bt.j2).

Tier 1 (no kernel): the program's formats print 64 bits. Tier "3n" (``@pytest.mark.native``,
gated as in tests/test_native_bpftrace.py): real runs on this host's kernel against
loopback workloads whose bytes and sockets are known.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcpipstat import bpftrace
from tcpipstat.model import Collection
from tcpipstat.outcome import Outcome, run_notes
from tcpipstat.plan import build_plan
from tcpipstat.records import Header, IntervalMark, SocketRecord, Trailer, parse_text

from .conftest import run_cli, json_rows
from .test_native_bpftrace import ROOT, _free_port, _ipv6, _native, _run, _workload


# ---- tier 1 ----
def test_formats_print_64_bits():
    """bpftrace's %d and %x print 32 bits: a byte count past 4 GiB or an IPv6 half would
    be cut. Every number the program prints is %ld or %lx."""
    program = bpftrace.render_program(build_plan(["--backend", "bpftrace", "-c", "true"]))
    formats = re.findall(r'printf\("((?:[^"\\]|\\.)*)"', program)
    assert len(formats) >= 3
    for f in formats:
        assert not re.search(r"%[dx]", f), f
    assert any("%lx" in f for f in formats) and any("%ld" in f for f in formats)


def test_times_move_to_the_wall_clock():
    offset = bpftrace.boot_to_wall_ms()
    assert abs(time.time() * 1000 - (time.clock_gettime(time.CLOCK_BOOTTIME) * 1000 + offset)) < 50
    # the same offset whenever it is asked, within a ms's phase or not (so a test can take
    # a run's shift back exactly): 200 calls spread over about 20 ms
    seen = set()
    for _ in range(200):
        seen.add(bpftrace.boot_to_wall_ms())
        time.sleep(0.0001)
    assert seen == {offset}
    line = "H\ttcpipstat\t2\t0.3\t1500\t0\t64\tSendBytes\n"
    assert bpftrace.shift_ms(line, 4, 1000) == line.replace("1500", "2500")
    assert bpftrace.shift_ms("H\tx\n", 4, 1000) == "H\tx\n"     # (the parser names it)


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bpftrace"
# bpftrace's own stdout for --interval 1 --count 3 around PHASED (below), recorded on this
# host's kernel: the server listens on 40057, A's client is 47746, B's 47760
PHASED_OUT = FIXTURES / "interval-phased.out"
SERVER, A, B = 40057, 47746, 47760
A_KEY, A_SERVER_KEY = "-131387298283520", "-131387298262208"    # their struct sock addresses


def _records(lines: list[str]) -> list:
    """What the backend makes of the program's lines (at boot-clock times)."""
    head = next(x for x in lines if x.startswith("H\t"))
    available = tuple(head.rstrip("\n").split("\t")[-1].split(","))
    runner = bpftrace.Runner(["bpftrace"], available, 8192, print)
    runner._wall = 0
    return parse_text("".join(runner._records(iter(lines))))


def _windows(recs) -> list[dict[tuple[int, int], int]]:
    """Each window's SendBytes by (lport, rport)."""
    windows = []
    Collection(on_interval=windows.append).extend(recs).finish()
    return [{(st.tuple.lport, st.tuple.rport): st.counters["SendBytes"]
             for st in w.sockets.values()} for w in windows]


def test_snapshots_become_deltas_of_each_window():
    """The real printouts: each window holds what each socket sent in it (A 1000, 2000,
    then 4000 in its close record; B, opened and closed in the second, once), the marks
    are at the program's times, and the trailer counts the records written here."""
    lines = PHASED_OUT.read_text().splitlines(keepends=True)
    recs = _records(lines)
    assert _windows(recs) == [{(A, SERVER): 1000, (SERVER, A): 100},
                              {(A, SERVER): 2000, (SERVER, A): 200, (B, SERVER): 3000,
                               (SERVER, B): 300},
                              {(A, SERVER): 4000, (SERVER, A): 400}]
    marks = [r for r in recs if isinstance(r, IntervalMark)]
    assert [(m.seq, m.ms) for m in marks] == [(1, 13281958), (2, 13282958), (3, 13283958)]
    (trailer,) = [r for r in recs if isinstance(r, Trailer)]
    assert trailer.ended == 2 and trailer.ids == sum(isinstance(r, SocketRecord) for r in recs)
    assert all(r.in_tree and r.pid == 15147 for r in recs if isinstance(r, SocketRecord))


def _moved(lines: list[str], what: str, before: str, nth: int = 1) -> list[str]:
    """The lines with the first starting ``what`` moved before the ``nth`` one
    starting ``before``."""
    line = next(x for x in lines if x.startswith(what))
    rest = [x for x in lines if x is not line]
    at = [i for i, x in enumerate(rest) if x.startswith(before)][nth - 1]
    return rest[:at] + [line] + rest[at:]


A_CLOSE = "tcpipstat-bpftrace-close\t13281138786632"


def test_a_close_read_during_a_printout_waits_for_its_end():
    """A's close record read amid the second printout (its values were read before it):
    the window gets 2000, the close the remaining 4000, as when it came after."""
    lines = PHASED_OUT.read_text().splitlines(keepends=True)
    moved = _moved(lines, A_CLOSE, "tcpipstat-bpftrace-check", nth=2)
    assert _windows(_records(moved)) == _windows(_records(lines))


def test_a_socket_closed_before_a_printout_is_left_to_its_close_record():
    """A's close record read before the second printout that still shows A (bpftrace read
    its maps before the deletes were done): the printout's A is not written again, the
    close record holds everything since the first window."""
    lines = PHASED_OUT.read_text().splitlines(keepends=True)
    windows = _windows(_records(_moved(lines, A_CLOSE, "tcpipstat-bpftrace-interval\t2")))
    assert windows[1][(A, SERVER)] == 6000 and (A, SERVER) not in windows[2]
    assert sum(w.get((A, SERVER), 0) for w in windows) == 7000


def test_a_socket_whose_serial_changed_is_left_to_its_close_record():
    """A's address taken by another socket while the second printout was read (its serial
    printed again differs): A's values there are not written; its close record holds them."""
    lines = PHASED_OUT.read_text().splitlines(keepends=True)
    at = [i for i, x in enumerate(lines) if x.startswith(f"@sn[{A_KEY}]")][3]
    lines[at] = lines[at].replace("13281138786632", "13282900000000")
    windows = _windows(_records(lines))
    assert (A, SERVER) not in windows[1] and windows[2][(A, SERVER)] == 6000


def test_sockets_closed_as_the_run_finished_are_closed_in_the_end_records():
    """Sockets that close after the run began to finish are marked (@closed), not written
    (bpftrace drops what it reads after exit()): END's records of them are close records.
    Here the second printout's maps are END's, A's two sockets marked closed."""
    lines = PHASED_OUT.read_text().splitlines(keepends=True)
    second = lines.index("tcpipstat-bpftrace-interval\t2\t13282958\n")
    printout = lines[second + 1:lines.index("tcpipstat-bpftrace-check\n", second)]
    trailer = next(x for x in lines if x.startswith("T\t")).replace("\t2\n", "\t1\n")
    end = ["tcpipstat-bpftrace-end\n", *printout,
           *(f"@closed[{k}]: 1\n" for k in (A_KEY, A_SERVER_KEY)), trailer]
    recs = _records(lines[:lines.index("tcpipstat-bpftrace-snapshot\n") + 1] + end)
    assert _windows(recs) == [{(A, SERVER): 1000, (SERVER, A): 100},
                              {(A, SERVER): 2000, (SERVER, A): 200}]
    closes = {(r.tuple.lport, r.tuple.rport) for r in recs
              if isinstance(r, SocketRecord) and r.reason == "close"}
    assert closes == {(A, SERVER), (SERVER, A)}


# bpftrace's own stdout for --max-sockets 64 around HOLD (below) with 50 connections,
# recorded on this host's kernel: 64 sockets tracked (the listener and 63), 37 not
FULL_OUT = FIXTURES / "full-table.out"


def test_a_full_table_is_counted_from_ends_printout():
    """END prints how many sockets the full tables left out; bpftrace prints its count()
    maps again as it exits, after the trailer: those lines are not records."""
    lines = FULL_OUT.read_text().splitlines(keepends=True)
    head = lines[0].rstrip("\n").split("\t")
    runner = bpftrace.Runner(["bpftrace"], tuple(head[-1].split(",")), 64, print)
    out = list(runner._records(iter(lines)))
    recs = parse_text("".join(out))
    assert sum(isinstance(r, SocketRecord) for r in recs) == 63 and out[-1].startswith("T\t")
    assert (runner.outcome.untracked, runner.outcome.untracked_events) == (37, 0)


def test_full_tables_are_told():
    notes = run_notes(Outcome(untracked=37, untracked_events=5, max_sockets=64))
    assert notes == [
        "37 sockets were not counted, or not wholly: bpftrace's tables (--max-sockets 64) "
        "were full; they hold 64 sockets at once",
        "5 more events were lost to bpftrace's full tables (--max-sockets 64): of more "
        "sockets left out at once than they hold, or of a -c command's process they could "
        "not follow"]


def _fake_bpftrace(tmp_path, monkeypatch, says: str) -> Path:
    """TCPIPSTAT_BPFTRACE: a bpftrace whose --version says ``says``; every call's words
    go to the file returned."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bpftrace"
    fake.write_text(f'echo "$@" >> {calls}\necho "{says}"\n')
    monkeypatch.setenv("TCPIPSTAT_BPFTRACE", f"/bin/sh {fake}")
    return calls


def test_an_old_bpftrace_is_refused_before_anything_runs(tmp_path, monkeypatch):
    calls = _fake_bpftrace(tmp_path, monkeypatch, "bpftrace v0.11.4")
    status, out, err = run_cli("--backend", "bpftrace", "timeout=1")
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        "tcpipstat: bpftrace v0.11.4 is too old: tcpipstat needs 0.12.0 or later",
        "tcpipstat: fix: install bpftrace 0.12.0 or later"]
    assert calls.read_text() == "--version\n"          # the program was never started


@pytest.mark.parametrize("says, ok, detail", [
    ("bpftrace v0.11.4", False, "bpftrace v0.11.4 is too old: tcpipstat needs 0.12.0 or later"),
    ("bpftrace v0.9.4", False, "bpftrace v0.9.4 is too old: tcpipstat needs 0.12.0 or later"),
    ("bpftrace v0.12.0", True, "v0.12.0 (0.12.0 or later needed)"),
    ("bpftrace v0.17.0", True, "v0.17.0 (0.12.0 or later needed)"),
    ("bpftrace (devel)", False, "cannot tell the bpftrace version from 'bpftrace (devel)' "
                                "(tcpipstat needs 0.12.0 or later)")])
def test_check_names_the_bpftrace_version(tmp_path, monkeypatch, says, ok, detail):
    _fake_bpftrace(tmp_path, monkeypatch, says)
    status, out, err = run_cli("--check", "--json")
    (bpf,) = [b for b in json.loads(out)["backends"] if b["backend"] == "bpftrace"]
    (finding,) = [c for c in bpf["checks"] if c["check"] == "bpftrace version"]
    assert (finding["ok"], finding["detail"]) == (ok, detail)
    assert (finding["fix"] or {}).get("debian") == (None if ok else
                                                    "install bpftrace 0.12.0 or later")
    if not ok:
        assert bpf["ready"] is False and status == (0 if json.loads(out)["ready"] else 1)


# What bpftrace 0.17 wrote when a key left a map that print() walked (recorded on this host
# by fixtures/bpftrace/refresh-print-race.sh): a snapshot meeting a closing socket
PRINT_RACE_ERR = FIXTURES / "print-race-0.17.0.stderr"


def test_a_snapshot_bpftrace_could_not_print_is_the_runs_problem():
    """bpftrace 0.17's own words for it become the run's problem, with the fix; the C++
    abort's lines and the memlock warning are not echoed, other errors still are."""
    echoed: list[str] = []
    r = bpftrace.Runner(["true"], ("SendBytes",), 10, echoed.append)
    text = PRINT_RACE_ERR.read_text()
    r._read_stderr(io.StringIO(text + "ERROR: something else\n"))
    assert "failed to look up elem" in text and "Could not print map" in text
    assert echoed == ["ERROR: something else"]
    assert r.outcome.problem == bpftrace.PRINT_RACE
    assert "before 0.19" in r.outcome.problem[0] and "0.19 or later" in r.outcome.problem[1]
    r = bpftrace.Runner(["true"], ("SendBytes",), 10, echoed.append)
    r._read_stderr(io.StringIO(text.replace("failed to look up elem: -2", "other")))
    assert r.outcome.problem is None            # (the abort's lines alone say nothing)


@pytest.mark.parametrize("args, version, warned", [
    (["--interval", "1"], "v0.17.0", True), (["--interval", "1"], "0.18.1", True),
    (["--interval", "1"], "v0.19.0", False), (["--interval", "1"], "v0.23.2", False),
    (["timeout=1"], "v0.17.0", False), (["--serve", "9999", "index=lport"], "v0.17.0", True)])
def test_a_snapshot_run_on_an_old_bpftrace_is_told_of_the_risk(args, version, warned):
    note = bpftrace.print_race_note(build_plan(["--backend", "bpftrace", *args]), version)
    assert bool(note) == warned and (not note or version in note and "0.19" in note)


# ---- tier 3n: real runs on this kernel ----
@pytest.mark.native
def test_ipv4_mapped_addresses_and_wall_clock_times(tmp_path):
    """An IPv6 socket talking to ::ffff:127.0.0.1 (v4-mapped) is keyed as IPv4, like the
    segments it exchanges (as the stap collector keys it): its counts by segment join its
    row. The run's start and end are times of day."""
    _native()
    if not _ipv6():
        pytest.skip("no IPv6 here")
    host, port, saved = "::ffff:127.0.0.1", _free_port(), tmp_path / "run.records"
    began = time.time() * 1000
    rows = _run([f"*:*-*:{port}", f"*:{port}-*:*", "--save-records", str(saved),
                 "-c", _workload(host, port, 2, 1000, 100)])
    ended = time.time() * 1000
    assert len(rows) == 4
    for r in rows:
        assert r["family"] == "ipv4" and {r["laddr"], r["raddr"]} == {"127.0.0.1"}, r
        assert r["counters"]["SendBytes"] in (1000, 100)
    recs = parse_text(saved.read_text())
    (head,) = [x for x in recs if isinstance(x, Header)]
    (trailer,) = [x for x in recs if isinstance(x, Trailer)]
    assert began - 1000 <= head.start_ms <= trailer.end_ms <= ended + 1000, (began, ended)
    assert sum(isinstance(x, SocketRecord) for x in recs) == 4


# A workload in three phases PERIOD seconds apart (argv[2]; the fixture above was recorded
# with 1), each phase's bytes known: connection A lives
# through all three (sends 1000, then 2000, then 4000 bytes; the server answers each with
# a tenth); connection B opens, sends 3000 bytes and closes in the second phase. It prints
# the client ports (to stderr: -c's output), and lives on until the run has ended.
PHASED = '''
import json, socket, sys, time
port, period = int(sys.argv[1]), float(sys.argv[2])
srv = socket.create_server(("127.0.0.1", port))
def exchange(c, s, n):
    c.sendall(b"a" * n)
    got = 0
    while got < n:
        got += len(s.recv(n - got))
    s.sendall(b"r" * (n // 10))
    got = 0
    while got < n // 10:
        got += len(c.recv(n // 10 - got))
t0 = time.monotonic()
a = socket.create_connection(("127.0.0.1", port)); sa, _ = srv.accept()
ports = {"a": a.getsockname()[1]}
for phase, n in enumerate((1000, 2000, 4000)):
    time.sleep(max(0.0, t0 + 0.3 + phase * period - time.monotonic()))
    exchange(a, sa, n)
    if phase == 1:
        b = socket.create_connection(("127.0.0.1", port)); sb, _ = srv.accept()
        ports["b"] = b.getsockname()[1]
        exchange(b, sb, 3000)
        b.close(); sb.close()
a.close(); sa.close()
print(json.dumps(ports), file=sys.stderr, flush=True)
time.sleep(max(0.0, t0 + 3 * period + 1.5 - time.monotonic()))   # (past the third window)
'''


def _tcpipstat(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.native
def test_interval_windows_add_up_to_the_workload(tmp_path):
    """--interval 2 --count 3 around the phased workload: each socket's per-window bytes
    are what its phases sent, in order, each once (B's, which closed inside a window,
    too), they add up to the workload's totals and to the whole run's, and the run ends
    after the third window. (Windows count from the collector's start and the phases from
    the workload's, which bpftrace starts once its probes are attached: a phase stays in
    its window while that start comes less than 1.7 s late. With 1 s windows, 0.7 s was
    not always enough on a loaded host: a phase then fell in a fourth window.)"""
    _native()
    port, script = _free_port(), tmp_path / "phased.py"
    script.write_text(PHASED)
    saved, outcome = tmp_path / "run.records", tmp_path / "outcome.json"
    res = _tcpipstat(["--json", "--interval", "2", "--count", "3", "--all-processes",
                      "--save-records", str(saved), "--outcome-json", str(outcome),
                      f"*:{port}-*:*", f"*:*-*:{port}",
                      "-c", f"{sys.executable} {script} {port} 2"])
    assert res.returncode == 0, res.stderr
    ports = json.loads(re.search(r"^\{.*\}$", res.stderr, re.M).group())
    o = json.loads(outcome.read_text())
    assert o["ended_by"] == "count" and o["finished"], o
    rows = json_rows(res.stdout)
    assert {r["interval"] for r in rows} <= {1, 2, 3} and not any(r["final"] for r in rows)
    windows: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for r in rows:
        c = r["counters"]
        windows.setdefault((r["lport"], r["rport"]), []).append(
            (r["interval"], c["SendBytes"], c["RecvBytes"]))
    sent = {("a", "client"): [1000, 2000, 4000], ("a", "server"): [100, 200, 400],
            ("b", "client"): [3000], ("b", "server"): [300]}
    whole = _whole_run(saved)
    assert len(windows) == 4 == len(whole)
    for (name, side), chunks in sent.items():
        key = (ports[name], port) if side == "client" else (port, ports[name])
        got = sorted(windows[key])
        assert [w for w, _, _ in got] == sorted({w for w, _, _ in got})   # once a window
        # each window holds whole phases, in order: the running sums are the phases'
        running = [sum(s for _, s, _ in got[:i + 1]) for i in range(len(got))]
        assert set(running) <= {sum(chunks[:i + 1]) for i in range(len(chunks))}, got
        assert running[-1] == sum(chunks) == whole[key]["SendBytes"]
        assert sum(r for _, _, r in got) == whole[key]["RecvBytes"]
    assert len(windows[(ports["a"], port)]) == 3           # a phase in each window
    assert whole[(ports["a"], port)]["RecvBytes"] == 700


def _whole_run(saved) -> dict[tuple[int, int], dict[str, int]]:
    """Each socket's totals over the saved run's records, by (lport, rport)."""
    totals: dict[tuple[int, int], dict[str, int]] = {}
    for rec in parse_text(saved.read_text()):
        if isinstance(rec, SocketRecord):
            t = totals.setdefault((rec.tuple.lport, rec.tuple.rport), {})
            for k, v in rec.counters.items():
                t[k] = t.get(k, 0) + v
    return totals


# M connections held open at once, each client sending SEND bytes its server reads, then
# all closed: python3 - PORT M SEND
HOLD = '''
import socket, sys
port, conns, send = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
srv = socket.create_server(("127.0.0.1", port), backlog=conns)
pairs = []
for _ in range(conns):
    c = socket.create_connection(("127.0.0.1", port))
    pairs.append((c, srv.accept()[0]))
for c, s in pairs:
    c.sendall(b"x" * send)
    got = 0
    while got < send:
        got += len(s.recv(send - got))
for c, s in pairs:
    c.close(); s.close()
srv.close()
'''


@pytest.mark.native
def test_full_tables_count_the_sockets_left_out(tmp_path):
    """--max-sockets 64 and 50 connections held at once: the listener and the first 63
    sockets (31 connections and the 32nd's client) fill the table, so the other 37 are
    counted as left out, once each; the run says so and exits 1; what was kept is exact."""
    _native()
    port, script, outcome = _free_port(), tmp_path / "hold.py", tmp_path / "outcome.json"
    script.write_text(HOLD)
    res = _tcpipstat(["--json", "--max-sockets", "64", "--outcome-json", str(outcome),
                      f"*:{port}-*:*", f"*:*-*:{port}", "-c",
                      f"{sys.executable} {script} {port} 50 1000"])
    o = json.loads(outcome.read_text())
    assert (o["untracked"], o["untracked_events"]) == (37, 0), o
    assert res.returncode == 1 and "37 sockets and 0 more events were lost to full tables" \
        in res.stderr and "raise --max-sockets (now 64)" in res.stderr, res.stderr
    rows = json_rows(res.stdout)
    clients = [r for r in rows if r["rport"] == port]
    servers = [r for r in rows if r["lport"] == port]
    assert (len(clients), len(servers), len(rows)) == (32, 31, 63)
    assert all(r["counters"]["SendBytes"] == 1000 and r["counters"]["ActiveOpens"] == 1
               for r in clients)
    assert all(r["counters"]["RecvBytes"] == 1000 and r["counters"]["PassiveOpens"] == 1
               for r in servers)


# A bpftrace that runs the real one and, after the program's second snapshot, ends it as
# bpftrace before 0.19 ends a run whose print lost a key: its recorded words, SIGABRT
ABORTING = """case " $* " in *".bt "*) ;; *) exec bpftrace "$@" ;; esac
fifo={fifo}; rm -f $fifo; mkfifo $fifo
bpftrace "$@" > $fifo & pid=$!
n=0
while IFS= read -r line; do
  printf '%s\\n' "$line"
  case $line in {snapshot}) n=$((n + 1))
    if [ $n = 2 ]; then cat {err} >&2; kill -ABRT $pid; wait $pid; exit 134; fi ;; esac
done < $fifo
wait $pid
"""


@pytest.mark.native
def test_a_run_bpftrace_ends_at_a_snapshot_keeps_its_windows(tmp_path):
    """Ended at the second snapshot as bpftrace 0.17 ends one that met a closing socket:
    both windows are reported, the exit status is 1, and the last words name the cause
    and the fix, in place of bpftrace's C++ abort."""
    _native()
    wrapper = tmp_path / "bpftrace"
    wrapper.write_text(ABORTING.format(fifo=tmp_path / "out", err=PRINT_RACE_ERR,
                                       snapshot=bpftrace.MARKS["end"]))
    res = subprocess.run([sys.executable, "-m", "tcpipstat", "--backend", "bpftrace",
                          "--interval", "1", "--count", "5", f"*:{_free_port()}-*:*"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "TCPIPSTAT_BPFTRACE": f"/bin/sh {wrapper}"})
    assert res.returncode == 1, res.stderr
    assert re.findall(r"^interval (\d+),", res.stdout, re.M) == ["1", "2"], res.stdout
    err = res.stderr.splitlines()
    assert err[-2].startswith("tcpipstat: collection ended abnormally: bpftrace stopped as it "
                              "printed a snapshot"), err
    assert err[-1].startswith("tcpipstat: fix: bpftrace 0.19 or later reads past it"), err
    assert not [x for x in err if "terminate called" in x or "look up elem" in x]
    version = bpftrace.bpftrace_version(["bpftrace"])[0]
    old = bpftrace.version_tuple(version) < bpftrace.PRINT_RACE_FIXED
    assert any("can stop this run" in x for x in err) == old
