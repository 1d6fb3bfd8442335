"""--cong and --dist with the bpftrace collector (tcpipstat/bpftrace.py).

Tier 1 (no kernel): the congestion code is in the program only where the kernel has the
tracepoint, and the records are made right from real bpftrace printouts
(tests/fixtures/bpftrace/cong.stdout, tests/fixtures/bpftrace/cong-dist.stdout: recorded
on Linux 6.18 with bpftrace 0.17 by ``tcpipstat --backend bpftrace --cong [--dist]
198.18.0.1:*-*:*``, bpftrace's stdout copied by a TCPIPSTAT_BPFTRACE wrapper, around the
lossy namespace below: one connection that sends 300,000 bytes and closes, one that sends
as much and is still open at the end).

Tier "3n" (``@pytest.mark.native``, as tests/test_native_bpftrace.py; one run with
--interval): real runs in a network namespace of the test's own whose loopback drops every
25th data segment sent to the test's server ports (nftables: the machine's loopback, which
other suites use, is not touched). The oracle is the kernel's own record of the same
tracepoints (tcp_cong_state_set, inet_sock_set_state), read through a tracefs instance of
the test's own.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from tcpipstat import bpftrace
from tcpipstat.bt_points import KernelPoints, choose, list_points
from tcpipstat.counters import CA_COUNTERS, CA_STATES, CA_TIME_COUNTERS
from tcpipstat.errors import UsageError
from tcpipstat.plan import build_plan
from tcpipstat.records import SocketRecord, hist_key, parse_text

from .conftest import FIXTURES, json_rows
from .test_native_bpftrace import ROOT, WORKLOAD, _native

PRINTOUTS = FIXTURES / "bpftrace"


# ---- tier 1 ----
def test_cong_code_only_where_the_tracepoint_is():
    plan = build_plan(["--backend", "bpftrace", "--cong", "--dist"])
    assert "tracepoint:tcp:tcp_cong_state_set" in bpftrace.render_program(plan)
    none = choose(KernelPoints({}))
    without = bpftrace.render_program(plan, none)
    assert "tcp_cong_state_set" not in without and "@cs" not in without
    assert "CaOpenUs" not in without and bpftrace.CA_LINES not in without
    available, unavailable = bpftrace.counters(plan.groups, none.missing)
    assert "CaChanges" not in available and "CaOpenUs" in unavailable
    assert set(bpftrace.counters(plan.groups)[0]) >= {"CaOpenUs", "CaLossUs", "CaChanges"}


def test_a_kernel_without_the_tracepoint_leaves_the_counters_unavailable(monkeypatch):
    """prepare() asks bpftrace for the tracepoint: without it the congestion counters are
    n/a (never 0), the report does not claim how states were seen, and the program has no
    congestion code to fail on."""
    monkeypatch.setenv("TCPIPSTAT_BPFTRACE", "bpftrace")
    monkeypatch.setattr(bpftrace.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bpftrace, "ensure_tracefs", lambda: None)
    monkeypatch.setattr(bpftrace, "list_points", lambda cmd: KernelPoints({}))
    monkeypatch.setattr(bpftrace, "bpftrace_version", lambda cmd: ("0.17.0", ""))
    said = []
    be = bpftrace.BpftraceBackend(build_plan(["--backend", "bpftrace", "--cong", "--dist"]),
                                  print)
    try:
        prepared = be.prepare(said.append)
        program = Path(be._runner.cmd[2]).read_text()
    finally:
        be._tmp.cleanup()
    assert set(CA_COUNTERS) <= set(prepared.unavailable) and prepared.cong == ""
    assert not set(CA_COUNTERS) & set(prepared.available)
    assert "tcp_cong_state_set" not in program and "CaChanges" not in program
    assert any("no tracepoint tcp:tcp_cong_state_set" in s for s in said), said


def test_kprobes_only_with_cong_is_refused():
    plan = build_plan(["--backend", "bpftrace", "--cong", "--kprobes-only"])
    with pytest.raises(UsageError, match="--kprobes-only with --cong"):
        bpftrace.BpftraceBackend(plan, print).prepare(lambda msg: None)


def test_records_print_64_bits():
    """bpftrace 0.17's %d and %x print 32 bits: every number goes out as %lld or %llx."""
    program = bpftrace.render_program(build_plan(["--backend", "bpftrace", "--cong"]))
    for fmt in re.findall(r'printf\("([^"]*)"', program):
        assert not re.search(r"%[dx]", fmt), fmt


def test_a_birth_clears_what_the_address_held_before_it_is_counted():
    """On a busy host new sockets were found with an earlier socket's rejected verdict
    (@no) at their address, and went unreported (the lossy test below, now and then on
    a loaded host). At connect() and at a child's cloning the maps' entries of the address go
    (a record first, if they make one), in a probe attached before the one that counts
    the birth: bpftrace attaches in the program's order."""
    program = bpftrace.render_program(build_plan(["--backend", "bpftrace", "--cong", "--dist"]))
    births = ("tracepoint:sock:inet_sock_set_state /args->protocol == 6 && "
              "((args->oldstate == 7 && args->newstate == 2) || "
              "(args->oldstate == 10 && args->newstate == 3))/ {")
    counting = "tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {"
    assert program.count(births) == 1 and program.count(counting) == 1
    birth = program[program.index(births):program.index(counting)]
    for m in ("no", "ok", "miss", "n", "tup", "cs", "c_SendBytes"):
        assert f"delete(@{m}[$k]);" in birth, m
    assert bpftrace.CA_CLOSE in birth               # (the earlier socket's record, if any)


def _records(name: str, dist: bool) -> list[SocketRecord]:
    """The records tcpipstat makes of a recorded printout, by port pair."""
    plan = build_plan(["--backend", "bpftrace", "--cong", *(["--dist"] if dist else [])])
    available, _ = bpftrace.counters(plan.groups)
    runner = bpftrace.Runner(["bpftrace"], available, plan.max_sockets, print, dist)
    lines = (PRINTOUTS / name).read_text().splitlines(keepends=True)
    text = "".join(runner._records(iter(lines)))
    assert bpftrace.CA_LINES not in text and "@" not in text
    return [r for r in parse_text(text) if isinstance(r, SocketRecord)]


def _by_ports(recs) -> dict[tuple[int, int], SocketRecord]:
    return {(r.tuple.lport, r.tuple.rport): r for r in recs}


def test_recorded_printout_with_dist():
    recs = _by_ports(_records("cong-dist.stdout", dist=True))
    assert sorted(recs) == [(34116, 50833), (36782, 41013), (41013, 36782), (50833, 34116)]
    sender = recs[36782, 41013].counters            # closed: its own lines, keyed
    assert (sender["SendBytes"], sender["CaOpenUs"], sender["CaDisorderUs"],
            sender["CaRecoveryUs"], sender["CaChanges"]) == (300000, 2850, 81, 195, 27)
    assert {k: v for k, v in sender.items() if hist_key(k)} == {
        "h.0.6": 3, "h.0.7": 5, "h.0.8": 1, "h.0.10": 1, "h.1.2": 6, "h.1.3": 1, "h.1.4": 2,
        "h.3.2": 3, "h.3.3": 1, "h.3.4": 3, "h.3.5": 2}
    # open at the end: @cs says Open since 103324732944 >> 3 us; END ran at 12916312737 us
    held = recs[34116, 50833]
    assert held.reason == "end" and held.counters["CaOpenUs"] == 1413 + 12916312737 - 12915591618
    assert held.counters["CaChanges"] == 16 and held.counters["CaRecoveryUs"] == 178
    stays = {k: v for k, v in held.counters.items() if hist_key(k)}
    # the stay cut by the end (721,119 us: bucket 19) joins END's @cd
    assert stays == {"h.0.4": 1, "h.0.5": 1, "h.0.6": 2, "h.0.7": 2, "h.0.9": 1, "h.0.19": 1,
                     "h.1.5": 2, "h.3.3": 2, "h.3.4": 4, "h.3.6": 1}
    assert sum(stays.values()) == held.counters["CaChanges"] + 1
    for r in recs.values():            # every stay ends in one change or the end
        n = sum(v for k, v in r.counters.items() if hist_key(k))
        assert n == r.counters["CaChanges"] + 1


def test_recorded_printout_without_dist():
    recs = _by_ports(_records("cong.stdout", dist=False))
    server = recs[41013, 40502].counters
    assert (server["RecvBytes"], server["CaOpenUs"], server["CaChanges"]) == (300000, 6304, 0)
    sender = recs[35768, 50833].counters
    # still open, in Open since 103446560880 >> 3 us; END at 12931396693 us
    assert sender["CaOpenUs"] == 1291 + 12931396693 - 12930820110
    assert (sender["CaDisorderUs"], sender["CaRecoveryUs"], sender["CaChanges"]) == (407, 229, 18)
    assert not any(hist_key(k) for r in recs.values() for k in r.counters)


def test_a_close_finds_its_lines_among_other_sockets():
    """Lines from other CPUs come between a socket's lines and its record."""
    lines = (PRINTOUTS / "cong-dist.stdout").read_text().splitlines(keepends=True)
    mine = [x for x in lines if x.startswith(bpftrace.CA_LINES) and "-131387251441472" in x]
    rest = [x for x in lines if x not in mine]
    mixed = [rest[0], *mine[:3], *rest[1:4], *mine[3:], *rest[4:]]   # (theirs in between)
    plan = build_plan(["--backend", "bpftrace", "--cong", "--dist"])
    runner = bpftrace.Runner(["bpftrace"], bpftrace.counters(plan.groups)[0], 8192, print, True)
    got = _by_ports(r for r in parse_text("".join(runner._records(iter(mixed))))
                    if isinstance(r, SocketRecord))
    assert got[36782, 41013].counters == _by_ports(_records("cong-dist.stdout", True))[
        36782, 41013].counters


# ---- tier 3n: real runs in a lossy namespace of the test's own ----
TRACEFS = Path("/sys/kernel/tracing")
ADDRS = ("198.18.0.1", "2001:db8::1")    # (benchmarking and documentation ranges)


def _own(addr: str) -> str:
    """This test process's address in ``addr``'s range. Another suite's copy of these
    tests, in a namespace of its own, may use the same port (taken free before this one
    held it), and the kernel's events by port come from both: the address tells."""
    n = os.getpid() % 65000 + 2
    return f"2001:db8::{n:x}:1" if ":" in addr else f"198.18.{n >> 8}.{n & 255}"
EVERY = 25                                # every 25th data segment to a server port is lost
TOLERANCE_US = 500     # the program's clock read vs the trace's timestamp, per state


def _need_tools() -> None:
    _native()
    for tool in ("ip", "nft"):
        if not shutil.which(tool):
            pytest.skip(f"native cong tier: needs {tool}")


@contextmanager
def _lossy_netns(ports: list[int]):
    """A network namespace whose loopback (one MSS a packet: no 64 KB GSO packets) drops
    every EVERY-th data segment (over 200 bytes) sent to ``ports``. Yields its name."""
    name = f"tcpipstat-cong-{os.getpid()}"
    ip = shutil.which("ip")
    subprocess.run([ip, "netns", "add", name], check=True)
    try:
        for args in (["link", "set", "lo", "up", "mtu", "1500", "gso_max_segs", "1"],
                     ["addr", "add", f"{_own(ADDRS[0])}/32", "dev", "lo"],
                     ["addr", "add", f"{_own(ADDRS[1])}/128", "dev", "lo", "nodad"]):
            subprocess.run([ip, "-n", name, *args], check=True)
        rule = (f"tcp dport {{ {', '.join(map(str, ports))} }} meta length > 200 "
                f"numgen inc mod {EVERY} == 0 drop")
        ruleset = ("table inet tcpipstat_test {\n chain in {\n"
                   f"  type filter hook input priority 0;\n  {rule}\n }}\n}}\n")
        subprocess.run([ip, "netns", "exec", name, "nft", "-f", "-"], input=ruleset,
                       text=True, check=True)
        yield name
    finally:
        subprocess.run([ip, "netns", "del", name], check=True)


_EVENTS = ("tcp/tcp_cong_state_set", "sock/inet_sock_set_state", "tcp/tcp_destroy_sock")
_TRACE_LINE = re.compile(r" (\d+)\.(\d{6}): (tcp_cong_state_set|inet_sock_set_state): (.*)")


@contextmanager
def _kernel_events(ports: list[int]):
    """The tracepoints' events for ``ports`` and the test's own addresses (_own) as the
    kernel records them, in a tracefs
    instance of the test's own (its own buffer, filter and clock: CLOCK_MONOTONIC, as
    bpftrace's nsecs; tcp_destroy_sock too, which the oracle does not read: _DESTROYED
    waits for it). Yields a function that reads them: [(us, event, fields)], and the
    instance's trace file."""
    inst, mine = TRACEFS / "instances" / f"tcpipstat-cong-{os.getpid()}", set(map(_own, ADDRS))
    inst.mkdir()
    try:
        (inst / "trace_clock").write_text("mono")
        (inst / "buffer_size_kb").write_text("2048")
        match = " || ".join(f"sport == {p} || dport == {p}" for p in ports)
        for event in _EVENTS:
            (inst / "events" / event / "filter").write_text(match)
            (inst / "events" / event / "enable").write_text("1")

        def read() -> list[tuple[int, str, dict[str, str]]]:
            out = []
            for m in _TRACE_LINE.finditer((inst / "trace").read_text()):
                f = dict(re.findall(r"(\w+)=(\S+)", m.group(4)))
                if {f.get("saddr"), f.get("saddrv6")} & mine:     # (the test's sockets)
                    out.append((int(m.group(1)) * 1_000_000 + int(m.group(2)), m.group(3), f))
            return out
        yield read, inst / "trace"
    finally:
        for event in _EVENTS:
            (inst / "events" / event / "enable").write_text("0")
        inst.rmdir()


class Oracle:
    """One socket's congestion states, from the kernel's events: each event that names a
    state other than the current one (the first: other than Open, which the kernel sets
    as a connection starts) is a change; ESTABLISHED means Open; the close ends the last
    stay."""

    def __init__(self):
        self.first = self.state = self.closed = None
        self.since = self.changes = self.events = 0
        self.us = [0] * len(CA_STATES)
        self.stays: Counter = Counter()

    def see(self, us: int, state: int, tracepoint: bool) -> None:
        if self.closed is not None:
            return                     # (tcp_disconnect() sets Open after the close)
        self.events += tracepoint
        if self.state is None:
            self.first, self.changes = us, int(tracepoint and state != 0)
        elif state != self.state:
            self.end(us)
            self.changes += 1
        else:
            return
        self.state, self.since = state, us

    def end(self, us: int) -> None:
        self.us[self.state] += us - self.since
        self.stays[CA_STATES[self.state]] += 1


# The -c command's end: until the kernel has destroyed N connected sockets (not the
# listener: it has no remote port) of the test's address (the instance's trace file says
# so). The collector writes a socket's record there, and a socket may be destroyed after
# its program ended: a LAST-ACK socket when the peer's ACK comes, in a softirq that a
# loaded host can defer to ksoftirqd.
_DESTROYED = """import re, sys, time
trace, addr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mine = re.compile(r" tcp_destroy_sock: .* dport=[1-9][0-9]* .*saddr(v6)?=%s " % re.escape(addr))
for _ in range(600):
    if len(mine.findall(open(trace).read())) >= n:
        sys.exit(0)
    time.sleep(0.1)
sys.exit("the kernel destroyed fewer than %d sockets of %s in 60 s" % (n, addr))
"""


@contextmanager
def _held_port():
    """A port no other socket of this host's network namespace can take while the test
    runs (bound, not listening: neither bind(0) nor connect() hands it out), so that
    the filters and the kernel's events by port are the test's sockets only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def _oracles(events, until_us: int | None = None) -> dict[tuple[int, int], Oracle]:
    """Each socket's Oracle, by (local port, remote port); until_us: the run's end."""
    socks: dict[tuple[int, int], Oracle] = {}
    for us, name, f in events:
        if until_us is not None and us > until_us:
            break
        o = socks.setdefault((int(f["sport"]), int(f["dport"])), Oracle())
        if name == "tcp_cong_state_set":
            o.see(us, int(f["cong_state"]), True)
        elif f["newstate"] == "TCP_ESTABLISHED":
            o.see(us, 0, False)
        elif f["newstate"] == "TCP_CLOSE" and o.state is not None and o.closed is None:
            o.end(us)
            o.closed = us
    return socks


def _check_row(row: dict, o: Oracle, end_us: int, skipped: int, end_slack_us: int = 0) -> None:
    """A row against the kernel's events: its stays add up to the socket's whole life
    and each change ends one; the same changes, the same stays in each state and each
    state's time within TOLERANCE_US (the state at the end: end_slack_us more) unless the
    kernel skipped some of our programs' runs (then one skipped hit can hide two changes:
    A -> B -> A reads as no change)."""
    c = row["counters"]
    times = [c[name] for name in CA_TIME_COUNTERS]
    stays = {state: sum(b.values()) for state, b in row.get("dist_us", {}).items()}
    why = (row, o.__dict__, skipped)
    assert sum(stays.values()) == c["CaChanges"] + 1, why
    assert abs(sum(times) - (end_us - o.first)) <= TOLERANCE_US + end_slack_us, why
    assert o.changes - 2 * skipped <= c["CaChanges"] <= o.changes, why
    if skipped:
        return
    assert c["CaChanges"] == o.changes and stays == dict(o.stays), why
    for i, (got, want) in enumerate(zip(times, o.us)):
        assert abs(got - want) <= TOLERANCE_US + (end_slack_us if i == o.state else 0), why


def _tcpipstat(args: list[str], tmp_path: Path) -> tuple[list[dict], int, dict]:
    """tcpipstat --backend bpftrace --cong --dist --json ARGS: its rows, the ms its run
    ended on the kernel's clock (the trailer's END_MS is wall-clock time: tcpipstat shifts
    bpftrace's boot-clock ms by boot_to_wall_ms(), the same number for every call of a boot,
    which this takes back) and its --outcome-json."""
    saved, outcome = tmp_path / "records", tmp_path / "outcome.json"
    res = subprocess.run([sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--cong",
                          "--dist", "--json", "--save-records", str(saved), "--outcome-json",
                          str(outcome), *args],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    trailer = next(x for x in saved.read_text().splitlines() if x.startswith("T\t"))
    rows = json_rows(res.stdout)
    end_ms = int(trailer.split("\t")[1]) - bpftrace.boot_to_wall_ms()
    return rows, end_ms, json.loads(outcome.read_text())


@pytest.mark.native
@pytest.mark.parametrize("addr", ADDRS)
def test_cong_states_against_the_kernels_events(addr, tmp_path):
    """Two connections send 2 MB each through the lossy loopback and close: each
    sender's changes, stays and times are the kernel's; the servers, whose replies
    are not dropped, spent their whole lives in Open."""
    _need_tools()
    send, waiter, addr = 2_000_000, tmp_path / "destroyed.py", _own(addr)
    waiter.write_text(_DESTROYED)
    with _held_port() as port, _lossy_netns([port]) as ns, \
            _kernel_events([port]) as (events, trace):
        workload = f"{shutil.which('ip')} netns exec {ns} {sys.executable} {WORKLOAD}"
        rows, _, outcome = _tcpipstat(
            [f"{_bracket(addr)}:{port}-*:*", f"*:*-{_bracket(addr)}:{port}", "-c",
             f"{workload} {addr} {port} 2 {send} 1000"
             f" && {sys.executable} {waiter} {trace} {addr} 4"], tmp_path)
        oracles = _oracles(events())
    assert outcome["cong"] == "tracepoint tcp:tcp_cong_state_set"
    # the four sockets that were ESTABLISHED (not the listener, not the connect()s
    # before a port was taken), each destroyed before the run ended
    made = sorted(k for k, o in oracles.items() if o.first is not None and k[1] != 0)
    got = sorted((r["lport"], r["rport"]) for r in rows)
    assert len(made) == 4 and got == made, (made, rows, outcome)
    assert all(r["closed"] == 1 and r["laddr"] == addr for r in rows), rows
    for row in rows:
        o = oracles[row["lport"], row["rport"]]
        _check_row(row, o, o.closed, outcome["skipped"])
        c = row["counters"]
        if row["lport"] != port:
            assert c["SendBytes"] == send and c["RetransSegs"] > 0 and c["CaChanges"] > 0
        elif o.changes == 0:        # a server (its replies are not dropped): as the kernel
            assert c["CaOpenUs"] == sum(c[n] for n in CA_TIME_COUNTERS)
            assert row["dist_us"] == {"Open": {str(1 << (c["CaOpenUs"].bit_length() - 1)): 1}}


HOLD = """import os, socket, sys, threading, time
addr, port, send, go, made, release = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
def wait(path):
    for _ in range(1200):
        if os.path.exists(path):
            return
        time.sleep(0.1)
wait(go)
srv = socket.create_server((addr, port), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)
c = socket.create_connection((addr, port))
a, _ = srv.accept()
def drain(n=send):
    while n > 0:
        n -= len(a.recv(n))
t = threading.Thread(target=drain)
t.start()
c.sendall(b"h" * send)
t.join()
open(made, "w").close()
wait(release)
"""


@pytest.mark.native
def test_cong_states_of_a_connection_open_at_the_end(tmp_path):
    """A connection sends 300,000 bytes through the lossy loopback and stays open (held by
    a process the test starts, made once bpftrace runs the -c command): its stays go on
    until the end of the run, the last cut there."""
    _need_tools()
    go, made, release = (tmp_path / n for n in ("go", "made", "release"))
    (tmp_path / "hold.py").write_text(HOLD)
    command = (f"touch {go}; i=0; while [ ! -e {made} ] && [ $i -lt 600 ]; do sleep 0.1; "
               "i=$((i + 1)); done")
    with _held_port() as port, _lossy_netns([port]) as ns, \
            _kernel_events([port]) as (events, _):
        holder = subprocess.Popen([shutil.which("ip"), "netns", "exec", ns, sys.executable,
                                   str(tmp_path / "hold.py"), _own(ADDRS[0]), str(port),
                                   "300000",
                                   str(go), str(made), str(release)])
        try:
            args = ["--all-processes", f"*:{port}-*:*", f"*:*-*:{port}", "-c", command]
            rows, end_ms, outcome = _tcpipstat(args, tmp_path)
        finally:
            release.touch()
            holder.wait(timeout=30)
        oracles = _oracles(events(), until_us=end_ms * 1000 + 1999)
    assert len(rows) == 2 and all(r["closed"] == 0 for r in rows)
    for row in rows:
        o = oracles[row["lport"], row["rport"]]
        assert o.state is not None and o.closed is None
        o.end(end_ms * 1000 + 500)    # (the trailer's end, a ms: its middle)
        _check_row(row, o, end_ms * 1000 + 500, outcome["skipped"], end_slack_us=1500)
    sender = next(r for r in rows if r["rport"] == port)["counters"]
    assert sender["SendBytes"] == 300000 and sender["CaChanges"] > 0


@pytest.mark.native
def test_programs_are_held_for_their_misses(tmp_path):
    """The kernel's count of the hits it skipped is read from copies of bpftrace's
    program descriptors, taken as the header comes: every attached program's. (That the
    count is right shows above: a lossy run whose changes differ from the kernel's
    events fails unless skipped hits explain it.)"""
    _native()
    plan = build_plan(["--backend", "bpftrace", "--cong", "--dist", "-c", "true"])
    program = tmp_path / "p.bt"
    here = choose(list_points([shutil.which("bpftrace")]))     # (this host's points)
    program.write_text(bpftrace.render_program(plan, here))
    cmd = [shutil.which("bpftrace"), "-q", str(program), *bpftrace.program_args([], None),
           "-c", "/bin/sleep 1"]
    runner = bpftrace.Runner(cmd, bpftrace.counters(plan.groups)[0], 64, print, True)
    held = []
    for line in runner.lines():
        if line.startswith("H\t"):
            held = list(runner._misses.fds)
    # the 100 ms timer, the -c command's fork and exit, send, receive, retransmit, reset
    # sent, the congestion state, the TCP state twice (a new socket's stale state first,
    # then the counts) and the socket's destruction (BEGIN's and END's programs are not
    # open then)
    assert len(held) == 11 and runner._misses.fds == []      # (closed again after the run)


PACED = """import socket, sys, threading, time
addr, port, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
srv = socket.create_server((addr, port), family=fam)
def serve():
    a, _ = srv.accept()
    with a:
        while a.recv(65536):
            pass
threading.Thread(target=serve).start()
with socket.create_connection((addr, port)) as c:
    for _ in range(chunks):            # (spread over several snapshots)
        c.sendall(b"p" * 100000)
        time.sleep(0.15)
srv.close()
"""


def _stay_overlap(events, key: tuple[int, int], lo: int, hi: int) -> int:
    """The us of the socket's life (its first state to its close) within [lo, hi]."""
    o = _oracles(events)[key]
    return max(0, min(hi, o.closed) - max(lo, o.first))


@pytest.mark.native
def test_cong_states_per_snapshot_against_the_kernels_events(tmp_path):
    """--interval with --cong --dist: a connection sends 600,000 bytes through the lossy
    loopback over about a second and closes, across several snapshots. Over the
    snapshots, its changes, stays and times add up to the kernel's; up to each mark,
    the times add up to its life until then (a snapshot printed while the state changed
    leaves that socket's congestion counts to the next one: one mark later at most)."""
    _need_tools()
    (tmp_path / "paced.py").write_text(PACED)
    (tmp_path / "destroyed.py").write_text(_DESTROYED)
    addr = _own(ADDRS[0])
    with _held_port() as port, _lossy_netns([port]) as ns, \
            _kernel_events([port]) as (events, trace):
        workload = (f"{shutil.which('ip')} netns exec {ns} {sys.executable} "
                    f"{tmp_path / 'paced.py'} {addr} {port} 6 && {sys.executable} "
                    f"{tmp_path / 'destroyed.py'} {trace} {addr} 2")
        rows, _, outcome = _tcpipstat(["--interval", "0.25", f"{addr}:{port}-*:*",
                                       f"*:*-{addr}:{port}", "-c", workload], tmp_path)
        evs = events()
    wall = bpftrace.boot_to_wall_ms()
    marks = [(int(x.split("\t")[2]) - wall) * 1000 for x in
             (tmp_path / "records").read_text().splitlines() if x.startswith("I\t")]
    oracles = _oracles(evs)
    for key in sorted({(r["lport"], r["rport"]) for r in rows}):
        mine = sorted((r for r in rows if (r["lport"], r["rport"]) == key),
                      key=lambda r: r["interval"])
        o = oracles[key]
        total = {"counters": {n: sum(r["counters"][n] for r in mine) for n in CA_COUNTERS},
                 "dist_us": {}}
        for r in mine:
            for state, buckets in r.get("dist_us", {}).items():
                for b, n in buckets.items():
                    into = total["dist_us"].setdefault(state, {})
                    into[b] = into.get(b, 0) + n
        _check_row(total, o, o.closed, outcome["skipped"])
        assert len([r for r in mine if r["counters"]["CaOpenUs"]]) >= 2, mine   # (spread)
        done = 0
        for r in mine:
            done += sum(r["counters"][n] for n in CA_TIME_COUNTERS)
            k = r["interval"]
            until = marks[k - 1] if k <= len(marks) else o.closed
            before = marks[k - 2] if 2 <= k <= len(marks) + 1 else o.first
            slack = 2000 + TOLERANCE_US      # (a mark's ms vs the program's us: a ms each)
            assert _stay_overlap(evs, key, 0, before) - slack <= done, (r, marks)
            assert done <= _stay_overlap(evs, key, 0, until) + slack, (r, marks)
    assert len(rows) >= 4 and {r["lport"] for r in rows} >= {port}, rows
