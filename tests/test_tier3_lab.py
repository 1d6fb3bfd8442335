"""Tier 3: tcpipstat runs for real in the QEMU guest (lab/run), and its numbers are
checked against what the workload did and against the guest's /proc/net/snmp."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tcpipstat.model import INDEXES
from tcpipstat.records import ENDED_BY, Parser, Trailer

from . import lab_workloads as W
from .conftest import LAB, data_connection, lab_kver, run_cli, json_rows

pytestmark = pytest.mark.lab


class LabRun:
    """One tcpipstat run in a lab guest (lab/run): its exit status, output, the guest's log
    (meta) and the run's --outcome-json. A run whose module lost a write is run again, at
    most ``TRIES`` times: stap 4.8's runtime (bookworm) drops a write that finds its relay
    sub-buffer with no room beyond the write's header, by chance, where 5.1's pads the
    sub-buffer and goes on. tcpipstat tells that loss (exit 1: tests/test_process_handling.py);
    the tests here are about the runs, so they get a whole one when there is one."""
    TRIES = 3

    def __init__(self, suite: str, tmp: Path, *args: str, env: dict | None = None):
        lab_kver(suite)
        for _ in range(self.TRIES):
            self._run(suite, tmp, args, env)
            if not self.outcome.get("lost_writes"):
                break

    def _run(self, suite: str, tmp: Path, args: tuple[str, ...], env: dict | None) -> None:
        meta = tmp / f"meta-{len(list(tmp.iterdir()))}"
        cache = os.environ.get("TCPIPSTAT_TEST_CACHE")
        outcome = meta.with_name(meta.name + ".outcome.json")
        e = {**os.environ, **(env or {})}
        if cache:
            e["TCPIPSTAT_CACHE"] = f"{cache}/{suite}"
        self.proc = subprocess.run([str(LAB / "run"), "--kernel", suite, "--meta", str(meta), "--",
                                    "--outcome-json", str(outcome), *args],
                                   capture_output=True, text=True, env=e, timeout=900)
        self.rc = self.proc.returncode
        self.stdout, self.stderr = self.proc.stdout, self.proc.stderr
        self.meta = meta.read_text() if meta.exists() else ""
        # how the run ended, as tcpipstat states it (written once a run has collected)
        self.outcome = json.loads(outcome.read_text()) if outcome.exists() else {}

    def json(self) -> list[dict]:
        return json_rows(self.stdout)

    def snmp_delta(self) -> dict[str, int]:
        out = {}
        for line in self.meta.splitlines():
            if line.startswith("@@SNMP_DELTA "):
                sec, _, rest = line[len("@@SNMP_DELTA "):].partition(": ")
                for kv in rest.split():
                    k, v = kv.split("=")
                    out[f"{sec}.{k}"] = int(v)
        return out

    def skipped(self) -> int:
        return self.outcome["skipped"]

    def faults(self) -> int:
        return self.outcome["faults"]

    def explain(self) -> str:
        """What a failing assertion should show: every row, stderr, the guest's log."""
        rows = "\n".join(f"  {o.get('laddr')}:{o.get('lport')}-{o.get('raddr')}:{o.get('rport')} "
                         f"{ {k: v for k, v in o['counters'].items() if v} }" for o in self.json())
        return f"\nrows:\n{rows}\nstderr:\n{self.stderr}\nmeta:\n{self.meta[-3000:]}"


def ended_by(records: Path) -> str:
    """What ended a run, from its saved records' one trailer, as tcpipstat reads it."""
    p = Parser(str(records))
    trailers = [r for r in p.parse(records.read_text().splitlines()) if isinstance(r, Trailer)]
    assert len(trailers) == 1 and trailers[0].ended in ENDED_BY, trailers
    return ENDED_BY[trailers[0].ended]


def near(value, want, slack):
    """A count stap may have lowered: it reports the probe hits it skipped (slack is
    those hits times the most one hit can add); with none skipped, exact."""
    return want - slack <= value <= want


def clean_run(suite: str, tmp: Path, *args: str, env: dict | None = None,
              tries: int = 3) -> LabRun:
    """A run in which the collector skipped no probe hit, for tests whose checks are exact.
    It runs on one emulated CPU: stap gives up on a global's lock after MAXTRYLOCK tries
    10 us apart (lab/run raises it to 1000: 10 ms) and skips that probe hit, and on two
    emulated CPUs a lock holder is sometimes descheduled for longer (CI: three runs in a row
    with a skip; -t named them: lock timeouts on tis_done, the timer's tick while the run's
    end was written out, and on tis_events, an event's); with one CPU no probe ever waits for
    a lock. A run
    that skipped hits anyway (a kprobe hit in a softirq that ran as another kprobe's handler
    ended) is tried again, at most ``tries`` times; else the last one is returned.
    What a skipped hit loses is not only counts: a skipped fork leaves a process out of the
    -c tree (told in the notes)."""
    one_cpu = {**(env or {}), "LAB_SMP": "1"}
    for _ in range(tries):
        r = LabRun(suite, tmp, *args, env=one_cpu)
        if r.rc != 0 or r.skipped() + r.faults() == 0:
            break
    return r


def _by_ports(objs):
    return {(o["lport"], o["rport"]): o["counters"] for o in objs}


def test_known_workload_exact_and_against_snmp(suite, tmp_path):
    rec = tmp_path / "records"
    # --all-processes: the guest runs nothing but the workload, and the rows are checked
    # against the kernel's own counters; with the -c tree a fork hit stap skipped (CI saw
    # one on trixie) leaves that process's sockets out (told, and tested elsewhere)
    r = LabRun(suite, tmp_path, "--json", "*:*-*:*", "--all-processes", "-c", W.TCPWORK_V4,
               "--save-records", str(rec))
    assert r.rc == 0, r.stderr
    objs = r.json()
    # probe hits stap reports it skipped, and events a probe could not read (both
    # reported to the user): ours may be low by that much
    slack = r.skipped() + r.faults()
    why = r.explain()
    for port, (n, up, down) in W.TCPWORK_V4_PORTS.items():
        server = [o["counters"] for o in objs if o["lport"] == port]
        client = [o["counters"] for o in objs if o["rport"] == port]
        assert len(server) == len(client) == n, why
        if slack:
            assert n * up - slack * up <= sum(c["RecvBytes"] for c in server) <= n * up, why
            continue
        # PassiveOpens counts child sockets created (tcp_create_openreq_child()): when the
        # handshake's last ACK and the first data segment are processed on two CPUs at
        # once, both build a child for the same request and the loser is freed; the
        # kernel's own PassiveOpens counts both (seen in the lab: 6 for 5 connections),
        # so ours must too. The sum is checked against /proc/net/snmp below.
        assert all(c["PassiveOpens"] >= 1 and c["ActiveOpens"] == 0 for c in server), why
        assert all(c["ActiveOpens"] == 1 and c["PassiveOpens"] == 0 for c in client), why
        assert all(c["RecvBytes"] == up and c["SendBytes"] == down for c in server), why
        assert all(c["SendBytes"] == up and c["RecvBytes"] == down for c in client), why
    # the match-everything filter against the kernel's own counters
    d = r.snmp_delta()
    tot = {k: sum(o["counters"][k] for o in objs)
           for k in objs[0]["counters"] if objs[0]["counters"][k] is not None}
    assert d["Tcp.ActiveOpens"] == 5 and d["Tcp.PassiveOpens"] >= 5, why
    assert 5 - slack <= tot["ActiveOpens"] <= 5, why
    assert d["Tcp.PassiveOpens"] - slack <= tot["PassiveOpens"] <= d["Tcp.PassiveOpens"], why
    # segments: exact unless stap skipped probe hits (reported), which can only lower ours
    for ours, theirs in (("InSegs", "Tcp.InSegs"), ("OutSegs", "Tcp.OutSegs"),
                         ("InReceives", "Ip.InReceives"), ("OutRequests", "Ip.OutRequests")):
        assert d[theirs] - slack <= tot[ours] <= d[theirs], (ours, tot[ours], d[theirs], slack, why)
    # index modes regroup the same run: sums agree, row keys are right
    for index in INDEXES:
        status, out, err = run_cli("--from-records", str(rec), f"index={index}", "--json")
        assert status == 0, err
        rows = json_rows(out)
        for k in ("InSegs", "OutSegs", "SendBytes", "RecvBytes", "ActiveOpens", "PassiveOpens"):
            assert sum(o["counters"][k] for o in rows) == tot[k], (index, k)
        if index == "lport":
            lp = {o["lport"]: o for o in rows}
            assert (lp[7001]["sockets"] == 3
                    and near(lp[7001]["counters"]["RecvBytes"], 3000, 5000 * slack))
            assert (lp[7002]["sockets"] == 2
                    and near(lp[7002]["counters"]["RecvBytes"], 10000, 5000 * slack))
        if index == "raddr":
            assert [o["raddr"] for o in rows] == ["127.0.0.1"]


def test_filters_really_filter(suite, tmp_path):
    r = LabRun(suite, tmp_path, "--json", "*.*.*.*:7001-*:*", "*:*-127.0.0.1:7001",
               "-c", W.TCPWORK_V4)
    assert r.rc == 0, r.stderr
    objs = r.json()
    assert objs, r.stderr
    assert all(7001 in (o["lport"], o["rport"]) for o in objs)
    assert not any(7002 in (o["lport"], o["rport"]) for o in objs)
    # PassiveOpens may exceed the connections (a child lost to a race still counts, in
    # the kernel too): bounded by the kernel's total less the two other connections
    passive = sum(o["counters"]["PassiveOpens"] for o in objs)
    assert 3 - r.skipped() <= passive <= r.snmp_delta()["Tcp.PassiveOpens"] - 2, r.explain()
    assert 3 - r.skipped() <= sum(o["counters"]["ActiveOpens"] for o in objs) <= 3, r.explain()
    # prefixes and port ranges select the same sockets
    r2 = LabRun(suite, tmp_path, "--json", "127.0.0.0/8:7000..7001-*:*",
                "*:*-127.0.0.0/8:6990..7001", "-c", W.TCPWORK_V4)
    assert r2.rc == 0, r2.stderr
    def ports(objs):
        return sorted(7001 if 7001 in (o["lport"], o["rport"]) else (o["lport"], o["rport"])
                      for o in objs)
    assert ports(r2.json()) == ports(objs) == [7001] * len(objs), (r.explain(), r2.explain())
    # and a filter that matches nothing counts nothing
    r = LabRun(suite, tmp_path, "--json", "*:9-*:*", "-c", W.TCPWORK_V4)
    assert r.rc == 0 and r.json() == []


def test_ipv6_loopback(suite, tmp_path):
    r = LabRun(suite, tmp_path, "--json", "[::1]:*-*:*", "-c", W.TCPWORK_V6)
    assert r.rc == 0, r.stderr
    objs = r.json()
    assert {o["family"] for o in objs} == {"ipv6"} and {o["laddr"] for o in objs} == {"::1"}
    server = [o["counters"] for o in objs if o["lport"] == 7003]
    client = [o["counters"] for o in objs if o["rport"] == 7003]
    assert len(server) == len(client) == 2
    why = r.explain()
    sk = r.skipped() + r.faults()
    assert all(c["PassiveOpens"] >= 1 and near(c["RecvBytes"], 10, 10 * sk)
               and near(c["SendBytes"], 7, 7 * sk) for c in server), why
    assert all(near(c["ActiveOpens"], 1, sk) and near(c["SendBytes"], 10, 10 * sk)
               and near(c["RecvBytes"], 7, 7 * sk) for c in client), why
    d = r.snmp_delta()
    slack = r.skipped() + r.faults()
    assert (d["Tcp.PassiveOpens"] - slack <= sum(c["PassiveOpens"] for c in server)
            <= d["Tcp.PassiveOpens"]), why
    # The workload is all IPv6: the IP-layer counters have IPv6 probes of their own
    # (ip6_rcv_core, ip6_xmit) and are checked against /proc/net/snmp6, the segments
    # (tcp_v6_rcv, __tcp_transmit_skb, tcp_v6_send_response) against /proc/net/snmp.
    def tot(k):
        return sum(o["counters"][k] for o in objs)
    for ours, theirs in (("InSegs", "Tcp.InSegs"), ("OutSegs", "Tcp.OutSegs"),
                         ("InReceives", "Ip6.Ip6InReceives"),
                         ("OutRequests", "Ip6.Ip6OutRequests")):
        assert d[theirs] - slack <= tot(ours) <= d[theirs], (ours, tot(ours), d[theirs], slack, why)
    if not slack:
        # on the right tuples: here every datagram carries one segment (retransmissions
        # are datagrams too, but not OutSegs)
        c = [o["counters"] for o in objs]
        assert all(x["InReceives"] == x["InSegs"] for x in c), why
        assert all(x["OutRequests"] == x["OutSegs"] + x["RetransSegs"] for x in c), why


def test_ipv6_reset_without_socket(suite, tmp_path):
    """A reset the kernel sends for a closed IPv6 port (no socket: tcp_v6_send_reset() ->
    tcp_v6_send_response()) counts for the refused tuple, like the IPv4 ones."""
    port, n = W.TCPWORK_V6_REFUSED_PORT, W.TCPWORK_V6_REFUSED_N
    # the answering tuple belongs to no process: --all-processes keeps it in the report
    r = LabRun(suite, tmp_path, "--json", "--all-processes", "[::1]:*-*:*",
               "-c", W.TCPWORK_V6_REFUSED)
    assert r.rc == 0, r.stderr
    objs, why, d = r.json(), r.explain(), r.snmp_delta()
    slack = r.skipped() + r.faults()
    assert d["Tcp.OutRsts"] == n and d["Tcp.AttemptFails"] == n, why
    refused = [o["counters"] for o in objs if o["lport"] == port]
    clients = [o["counters"] for o in objs if o["rport"] == port]
    def tot(k):
        return sum(o["counters"][k] for o in objs)
    assert d["Tcp.OutRsts"] - slack <= sum(c["OutRsts"] for c in refused) <= d["Tcp.OutRsts"], why
    # none charged to the clients
    assert tot("OutRsts") == sum(c["OutRsts"] for c in refused), why
    for ours, theirs in (("OutSegs", "Tcp.OutSegs"), ("InSegs", "Tcp.InSegs"),
                         ("InReceives", "Ip6.Ip6InReceives"),
                         ("OutRequests", "Ip6.Ip6OutRequests")):
        assert d[theirs] - slack <= tot(ours) <= d[theirs], (ours, tot(ours), d[theirs], slack, why)
    if not slack:
        assert len(refused) == len(clients) == n, why
        assert all(c["OutRsts"] == c["OutSegs"] == c["OutRequests"] == c["InSegs"] == 1
                   for c in refused), why
        assert all(c["ActiveOpens"] == c["AttemptFails"] == 1 and c["OutRsts"] == 0
                   for c in clients), why


def test_onclose_reports_each_socket_once(suite, tmp_path):
    r = LabRun(suite, tmp_path, "--json", "onclose=1", "*:7001-*:*", "*:*-*:7001",
               "-c", W.TCPWORK_V4)
    assert r.rc == 0, r.stderr
    objs = r.json()
    keys = [(o["lport"], o["rport"]) for o in objs]
    assert len(keys) == len(set(keys)) == 6
    assert all(o["closed"] == 1 for o in objs)
    assert near(sum(o["counters"]["RecvBytes"] for o in objs if o["lport"] == 7001), 3000,
                1000 * (r.skipped() + r.faults())), r.explain()


def test_many_sockets_one_run(suite, tmp_path):
    """300 sockets (150 connections, one after the other) through a collector that holds
    128: the tables are emptied and reused during the run, and nothing is lost.
    (64 is too small here: a 10 ms tick delayed under emulation while ~40 connections
    come and go fills it, and the lost events are told: test_full_tables_are_counted_and_told.)"""
    rec = tmp_path / "records"
    r = clean_run(suite, tmp_path, "--json", "--max-sockets", "128", "--save-records", str(rec),
                  "*:7005-*:*", "*:*-*:7005", "-c",
                  "tcpwork server 127.0.0.1 7005 10 150 & tcpwork client 127.0.0.1 7005 150 100; "
                  "wait")
    why = r.explain()
    assert r.rc == 0, why
    objs = r.json()
    slack = r.skipped()
    def tot(k):
        return sum(o["counters"][k] for o in objs)
    d = r.snmp_delta()
    assert len(objs) > 128, why             # more sockets than the tables hold: they were reused
    assert d["Tcp.ActiveOpens"] == 150 and d["Tcp.PassiveOpens"] >= 150, why
    assert 150 - slack <= tot("ActiveOpens") <= 150, why
    assert d["Tcp.PassiveOpens"] - slack <= tot("PassiveOpens") <= d["Tcp.PassiveOpens"], why
    assert 16500 - 100 * slack <= tot("SendBytes") <= 16500, why     # 150 x (100 up + 10 down)
    assert d["Tcp.InSegs"] - slack <= tot("InSegs") <= d["Tcp.InSegs"], why
    # the lab's lock wait keeps skipped hits rare: none in one of three runs, or (a host so
    # loaded that all three skipped some: CI saw 11) a few in a hundred segments
    assert slack <= d["Tcp.InSegs"] // 50, r.stderr
    trailer = [line.split("\t") for line in rec.read_text().splitlines()
               if line.startswith("T\t")]
    assert len(trailer) == 1 and trailer[0][4] == "0", why                      # no event lost
    # the -c command's shell told the module to finish: the 128 rows were written before
    # stapio was asked to stop (on stap < 5.1 what the end probe writes can be lost)
    assert ended_by(rec) == "request", why


def test_full_tables_are_counted_and_told(suite, tmp_path):
    """162 sockets busy at once through a collector that holds 64. Whether a table fills
    depends on how many of them are active within one 10 ms check, which the emulated
    guest does not make deterministic; either way nothing may go missing unsaid: lost
    events are counted, told (exit 1) and account for the whole shortfall, or there are
    none and the sums are exact. (Writes that stap 4.8's transport dropped, where LabRun's
    tries all met one, are told too, but hold an unknown number of records.)"""
    r = LabRun(suite, tmp_path, "--json", "--max-sockets", "64", "--all-processes",
               "-c", W.TABLE_TOO_SMALL)
    why = r.explain()
    drops, slack = r.outcome["dropped"], r.skipped()
    lost = r.outcome["lost_writes"]        # how many records each held is not known
    objs = r.json()
    d = r.snmp_delta()
    tot = sum(o["counters"]["InSegs"] for o in objs)
    if drops:
        assert r.rc == 1 and "raise --max-sockets (now 64)" in r.stderr, why
    if lost:
        assert r.rc == 1 and f"transport lost {lost} of the module's writes" in r.stderr, why
    if not drops and not lost:
        assert r.rc == 0 and "lost" not in r.stderr, why
    # every InSegs the kernel counted is either in the report or among the lost/skipped
    assert 0 < tot <= d["Tcp.InSegs"], why
    assert lost or d["Tcp.InSegs"] <= tot + drops + slack, why
    assert sum(o["counters"]["ActiveOpens"] for o in objs) <= d["Tcp.ActiveOpens"], why


def test_a_full_table_always_ends_in_a_told_loss(suite, tmp_path):
    """Deterministic: the -c command's 100 live children do not fit the process-tree
    table of --max-sockets 64 (it holds live processes only); each one left out is a
    lost event, told with the fix, exit 1."""
    r = LabRun(suite, tmp_path, "--json", "--max-sockets", "64", "-c", W.HUNDRED_CHILDREN)
    why = r.explain()
    assert r.rc == 1 and f"{r.outcome['dropped']} events were lost" in r.stderr, why
    assert 100 - 64 <= r.outcome["dropped"] <= 100, why
    assert "raise --max-sockets (now 64)" in r.stderr, why


def _congestion_run(suite, tmp_path, *extra):
    """netem delay + loss on loopback: the sending socket leaves Open; its times in the
    states cover its life; the stays in Recovery are the kernel's own count of recoveries
    (TcpExt TCPSackRecovery + TCPRenoRecovery, which tcp_enter_recovery() counts).
    Returns how the states were seen."""
    rec = tmp_path / "records"
    r = LabRun(suite, tmp_path, "--json", "--cong", "--dist", "--all-processes",
               "--save-records", str(rec), *extra, "*:5201-*:*", "*:*-*:5201", "-c", W.CONG_IPERF3)
    why = r.explain()
    assert r.rc == 0, why
    how = re.match(r"(tracepoint|kprobes)", r.outcome["cong"])
    assert how, why
    objs = r.json()
    d = r.snmp_delta()
    assert d.get("Tcp.RetransSegs", 0) > 0, why        # netem's loss really happened
    def times(o):
        return sum(o["counters"][f"Ca{s}Us"]
                   for s in ("Open", "Disorder", "Cwr", "Recovery", "Loss"))
    sender = max(objs, key=lambda o: o["counters"]["SendBytes"])
    assert sender["counters"]["CaChanges"] >= 2, why    # left Open and came back at least once
    # iperf3 -t 2: the data connection lives 2 s and more, and no longer than the run
    lines = rec.read_text().splitlines()
    start = int(next(line for line in lines if line.startswith("H\t")).split("\t")[4])
    end = int(next(line for line in lines if line.startswith("T\t")).split("\t")[1])
    assert 2_000_000 <= times(sender) <= (end - start) * 1000, why
    recoveries = d.get("TcpExt.TCPSackRecovery", 0) + d.get("TcpExt.TCPRenoRecovery", 0)
    stays = sum(sum(o.get("dist_us", {}).get("Recovery", {}).values()) for o in objs)
    # Only tcp_enter_recovery() enters Recovery, and counts it: never more stays than
    # that. A probe hit stap skipped (the report says how many) can hide one: with the
    # fallback, a skipped tcp_ack return that went Recovery -> Open -> Recovery is one
    # stay. (Seen in CI on 6.12: 457 skipped hits, 20 stays for 21 recoveries.)
    assert recoveries > 0 and recoveries - r.skipped() <= stays <= recoveries, why
    # every row's time in Recovery is made of its stays: none without a stay, and back
    assert all((o["counters"]["CaRecoveryUs"] > 0) == bool(o.get("dist_us", {}).get("Recovery"))
               for o in objs), why
    return how.group(1)


def test_congestion_states_against_the_kernel(suite, tmp_path):
    how = _congestion_run(suite, tmp_path)
    assert how == ("tracepoint" if suite == "bookworm" else "kprobes")


def test_congestion_fallback_where_the_tracepoint_exists(suite, tmp_path):
    """--kprobes-only: the fallback on a kernel that has the tracepoint (with stap 4.8 it
    read icsk_ca_state, a bitfield, as 0: every stay was Open)."""
    if suite != "bookworm":
        pytest.skip("no tracepoint here: the test above already ran the fallback")
    assert _congestion_run(suite, tmp_path, "--kprobes-only") == "kprobes"


def _ss_fields(line: str) -> dict[str, str]:
    """`ss -tin` key:value items (bytes_sent:347200, retrans:0/1, minrtt:11.203, ...)."""
    return dict(m.groups() for m in re.finditer(r"\b([a-z_]+):([0-9][0-9./]*)", line))


def test_rfc4898_at_close_against_ss_and_the_workload(suite, tmp_path):
    """300000 bytes under netem loss; `ss -tin` in the guest once they are all
    acknowledged, then the client closes: the variables at close equal ss's where nothing
    can change after the snapshot, and the workload's totals."""
    r = clean_run(suite, tmp_path, "--json", "--rfc4898", "--groups", "tcp", "--all-processes",
                  "*:7012-*:*", "*:*-*:7012", "-c", W.RFC4898_HOLD)
    why = r.explain()
    assert r.rc == 0, why
    ss_line = next((line for line in r.meta.splitlines()
                    if line.startswith("@@SS ") and "bytes_acked:" in line), None)
    assert ss_line, why
    ss = _ss_fields(ss_line)
    objs = r.json()
    assert all(o["rport"] for o in objs if "rfc4898" in o), why   # no listener rows
    client = next(o for o in objs if o["rport"] == 7012)
    server = next(o for o in objs if o["lport"] == 7012)
    # the workload waits (at most 30 s) until both sockets have left every state but
    # TIME-WAIT; one still closing after that has no variables, and the report says so
    for o in (client, server):
        if "rfc4898" not in o:
            assert "still open at the end: RFC 4898 variables" in " ".join(r.stderr.split()), why
            # the workload waited until it closed: its close was among the probe hits stap
            # skipped (in three runs on one CPU), and none skipped means a real loss
            assert r.skipped(), why
            pytest.skip(f"{o['lport']}->{o['rport']}: its close was not seen (stap skipped "
                        f"{r.skipped()} probe hits)")
    e, es = client["rfc4898"], server["rfc4898"]
    retrans_octets = int(ss.get("bytes_retrans", 0))
    # the client's data: nothing is sent after the snapshot but its FIN
    assert e["DataOctetsOut"] == int(ss["bytes_sent"]) == 300000 + retrans_octets, (ss, e)
    assert (e["OctetsRetrans"] == retrans_octets
            and e["DataSegsOut"] == int(ss["data_segs_out"])), (ss, e)
    # (a lost FIN is retransmitted after the snapshot: segments, not octets)
    assert e["SegsRetrans"] >= int(ss.get("retrans", "0/0").split("/")[1]), (ss, e)
    assert e["ThruOctetsAcked"] == int(ss["bytes_acked"]) + 1 == 300002, (ss, e)      # + its FIN
    assert e["SegsOut"] > int(ss["segs_out"]), (ss, e)
    # mss_cache is bounded by half the largest window the peer offered (tcp_bound_to_half_wnd):
    # when the server's window grows after the snapshot (it reads, then replies), the FIN's
    # tcp_current_mss() raises it (seen in CI: ss 32741, at close 32768 = 65536 / 2)
    assert (e["CurMSS"] == int(ss["mss"])
            or int(ss["mss"]) < e["CurMSS"] == e["MaxRwinRcvd"] // 2), (ss, e)
    assert e["MinRTT"] <= round(float(ss["minrtt"]) * 1000) + 1, (ss, e)
    # what the server sent: 1000 bytes and a FIN, received in sequence
    assert e["ThruOctetsReceived"] == 1001 and es["DataOctetsOut"] >= 1000, (e, es)
    assert es["ThruOctetsReceived"] == 300001 and es["ThruOctetsAcked"] == 1001, es
    assert e["SACK"] == 1 and e["TimeStamps"] == 1 and e["WinScaleSent"] == 7, e
    # tcp_sock has total_rto from Linux 6.7: a number on 6.12, n/a (null) on 6.1
    assert (e["Timeouts"] is None) == (suite == "bookworm"), e
    # the kernel's own retransmission count (the only retransmitting socket is the client's)
    assert e["SegsRetrans"] + es["SegsRetrans"] == r.snmp_delta().get("Tcp.RetransSegs", 0), why


def _csv_samples(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_samples_after_every_ack_against_ss(suite, tmp_path):
    """--sample 0 on the held connection: the sample of the ACK that acknowledged the
    last of the 300000 bytes is what `ss -tin` shows of the idle connection afterwards."""
    series, picture = tmp_path / "s.csv", tmp_path / "s.png"
    # (a run in which stap skipped a probe hit may miss the samples checked here: CI on a
    # loaded host saw two emulated CPUs skip 16 and 21)
    r = clean_run(suite, tmp_path, "--json", "--sample", "0", "--series", str(series),
                  "--plot", str(picture), "--groups", "tcp", "--all-processes",
                  "*:7012-*:*", "*:*-*:7012", "-c", W.RFC4898_HOLD)
    why = r.explain()
    assert r.rc == 0, why
    ss_line = next((line for line in r.meta.splitlines()
                    if line.startswith("@@SS ") and "bytes_acked:" in line), None)
    assert ss_line, why
    ss = _ss_fields(ss_line)
    rows = _csv_samples(series)
    client = [x for x in rows if x["rport"] == "7012"]
    ends = [x["event"] for x in client].count("end")
    if client and not ends and r.skipped():
        # the workload waits until the socket has closed; a close the collector did not
        # see is one of the probe hits stap skipped (and said so), in three runs
        pytest.skip(f"no end sample; stap skipped {r.skipped()} probe hits")
    assert client and client[-1]["event"] == "end" and ends == 1, (r.outcome, rows[-4:])
    first = int(client[0]["snd_una"])
    done = [x for x in client
            if x["event"] == "ack" and (int(x["snd_una"]) - first) % (1 << 32) == 300000]
    if not done and r.skipped():
        # that ACK's tcp_ack return may be one of the hits stap skipped (and said so)
        pytest.skip(f"no sample of the last ACK; stap skipped {r.skipped()} probe hits")
    assert done, client                     # the workload's 300000 bytes, acknowledged
    s = done[-1]
    rtt, rttvar = (float(v) for v in ss["rtt"].split("/"))
    assert int(s["cwnd"]) == int(ss["cwnd"]) and int(s["mss"]) == int(ss["mss"]), (ss, s)
    assert (abs(int(s["srtt_us"]) / 1000 - rtt) <= 0.001
            and abs(int(s["rttvar_us"]) / 1000 - rttvar) <= 0.001), (ss, s)
    assert int(s["snd_wnd"]) == int(ss["snd_wnd"]) and int(s["rto_ms"]) == int(ss["rto"]), (ss, s)
    assert int(s["total_retrans"]) == int(ss.get("retrans", "0/0").split("/")[1]), (ss, s)
    assert s["ssthresh"] == ss.get("ssthresh", ""), (ss, s)        # both empty while infinite
    assert s["inflight"] == s["wqueue"] == "0" and s["snd_nxt"] == s["snd_una"], s
    png = picture.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    assert "cwnd and srtt of 2 connections drawn" in r.stderr, why


@pytest.mark.parametrize("mode", ["period", "cwnd"])
def test_sampling_modes(suite, tmp_path, mode):
    """iperf3 under netem: with --sample 50 a connection's samples are >= 50 ms apart
    (delay alone: ACKs all along); with --on-cwnd-change too (delay and loss), each differs
    from the previous one in cwnd."""
    series = tmp_path / "s.ndjson"
    extra = ["--on-cwnd-change"] if mode == "cwnd" else []
    r = LabRun(suite, tmp_path, "--json", "--sample", "50", *extra, "--series", str(series),
               "--groups", "tcp", "--all-processes", "*:5201-*:*", "*:*-*:5201",
               "-c", W.CONG_IPERF3 if mode == "cwnd" else W.DELAY_IPERF3)
    why = r.explain()
    assert r.rc == 0, why
    samples = [json.loads(line) for line in series.read_text().splitlines()]
    by_conn = {}
    for x in samples:
        by_conn.setdefault((x["lport"], x["rport"]), []).append(x)
    sender = by_conn[data_connection(by_conn, 5201)]
    acks = [x for x in sender if x["event"] == "ack"]
    assert len(acks) >= (3 if mode == "cwnd" else 10), why     # a 2 s transfer
    # (in whole microseconds, as they were taken: t_s 3.390012 - 3.340012 is 0.0499999...)
    us = [round(x["t_s"] * 1e6) for x in acks]
    assert all(b - a >= 50_000 for a, b in zip(us, us[1:])), acks
    if mode == "cwnd":
        assert all(a["cwnd"] != b["cwnd"] for a, b in zip(acks, acks[1:])), acks
    # the end marker comes last (connections still open when collection stops have none)
    assert all(x["event"] != "end" for c in by_conn.values() for x in c[:-1]), why
    # the data connection closed (iperf3 resets it): its end sample, unless its close was
    # among the probe hits stap skipped, and said so. (Under netem, even on one CPU, stap
    # skips some: a packet netem releases in a softirq that runs as a kprobe handler ends
    # hits tcp_v4_rcv's kprobe while the first is still marked running, and kprobes skip it.)
    assert sender[-1]["event"] == "end" or r.skipped(), why
    row = next(o for o in r.json()
               if (o["lport"], o["rport"]) == (sender[0]["lport"], sender[0]["rport"]))
    assert (row["series"]["samples"] == len(acks)
            and row["series"]["cwnd"]["last"] == acks[-1]["cwnd"]), row


def test_timeout_ends_the_run_on_time(suite, tmp_path):
    rec = tmp_path / "records"
    r = LabRun(suite, tmp_path, "timeout=2", "--save-records", str(rec))
    assert r.rc == 0, r.stderr
    # the module's timer finishes the run at the deadline (a tick may come late under
    # emulation), and exits after that
    assert 1.9 <= r.outcome["duration_s"] <= 3.8, r.outcome
    assert f", {r.outcome['duration_s']:.1f} s" in r.stdout.splitlines()[0]
    assert ended_by(rec) == r.outcome["ended_by"] == "timeout"


def test_command_ends_the_run(suite, tmp_path):
    rec = tmp_path / "records"
    r = LabRun(suite, tmp_path, "timeout=60", "-c", "sleep 1", "--save-records", str(rec))
    assert r.rc == 0, r.stderr
    assert r.outcome["duration_s"] < 5, r.outcome
    # the command's shell, through the control file
    assert ended_by(rec) == r.outcome["ended_by"] == "request"


def test_stap_warnings_are_surfaced(suite, tmp_path):
    """When stap's overhead guard stops collection, the tool must say so in one line with
    the fix, keep what it collected, and exit non-zero. The guard is kept (no
    --no-overload-guard) with a threshold low enough that a busy loopback always trips
    it: a million cycles a second, where each probe hit costs tens of thousands here."""
    r = LabRun(suite, tmp_path, "--stap-arg=-DSTP_OVERLOAD_THRESHOLD=1000000LL", "-c", W.IPERF3,
               env={"LAB_OVERLOAD_GUARD": "1"})
    assert r.rc == 1, r.stderr
    assert "overhead guard" in r.stderr and "--no-overload-guard" in r.stderr
    # the report of what was collected, and the run said to be cut short
    assert re.search(r"^tcpipstat: \d+ rows", r.stdout, re.M), r.stdout
    assert not r.outcome["finished"] and "did not finish normally" in r.stdout


def test_interval_snapshots_add_up_to_the_run(suite, tmp_path):
    rec = tmp_path / "records"
    r = LabRun(suite, tmp_path, "--json", "--interval", "1", "*:7007-*:*", "*:*-*:7007",
               "-c", W.TCPWORK_PERIODIC, "--save-records", str(rec))
    assert r.rc == 0, r.stderr
    why = r.explain()
    objs = r.json()
    marks = [line for line in rec.read_text().splitlines() if line.startswith("I\t")]
    assert len(marks) >= 3, why             # ~4.5 s of workload, 1 s intervals
    assert [int(m.split("\t")[1]) for m in marks] == list(range(1, len(marks) + 1)), why
    full = sorted({o["interval"] for o in objs if not o["final"]})
    # the workload connects every 0.4 s for ~4.5 s (its start may miss the first second
    # on a slow guest): rows in at least three intervals, all numbered as the marks
    assert len(full) >= 3 and set(full) <= set(range(1, len(marks) + 1)), (full, why)
    assert {o["interval"] for o in objs if o["final"]} <= {len(marks) + 1}
    times = [o["time"] for o in objs if not o["final"]]
    assert times == sorted(times)
    # the deltas add up: to the workload's known totals and to the whole-run report
    def tot(rows, k):
        return sum(o["counters"][k] for o in rows)
    slack = r.skipped() + r.faults()
    assert 20 - slack <= tot(objs, "ActiveOpens") <= 20, why
    assert 20 * 330 - slack * 300 <= tot(objs, "SendBytes") <= 20 * 330, why
    status, out, err = run_cli("--from-records", str(rec), "--json")
    assert status == 0, err
    whole = json_rows(out)
    for k in ("SendBytes", "RecvBytes", "InSegs", "OutSegs", "ActiveOpens", "PassiveOpens",
              "OutRequests"):
        assert tot(objs, k) == tot(whole, k), (k, why)
    d = r.snmp_delta()
    assert d["Tcp.InSegs"] - slack <= tot(objs, "InSegs") <= d["Tcp.InSegs"], why


def test_interval_count_stops_after_k_snapshots(suite, tmp_path):
    rec = tmp_path / "records"
    r = LabRun(suite, tmp_path, "-T", "--interval", "0.5", "--count", "3", "--zeros", "*:7007-*:*",
               "-c", W.TCPWORK_PERIODIC, "--save-records", str(rec))
    assert r.rc == 0, r.stderr
    heads = re.findall(r"^(\d\d:\d\d:\d\d)  interval (\d+)", r.stdout, re.M)
    assert [int(n) for _, n in heads] == [1, 2, 3], r.stdout + r.stderr
    assert ended_by(rec) == "count"


def test_index_comm_separates_programs(suite, tmp_path):
    r = LabRun(suite, tmp_path, "--json", "index=comm", "*:*-*:*", "-c", W.TCPWORK_AND_IPERF3)
    assert r.rc == 0, r.stderr
    why = r.explain()
    rows = {o["comm"]: o for o in r.json()}
    assert {"tcpwork", "iperf3"} <= set(rows), why
    tw = rows["tcpwork"]["counters"]
    # both ends of three connections: 3 x 1000 up and 3 x 100 down, each counted as
    # sent by one tcpwork socket and received by another; a probe hit stap reports it
    # skipped may lower a byte count by one message (at most 1000 bytes here)
    slack = 1000 * (r.skipped() + r.faults())
    assert 3300 - slack <= tw["SendBytes"] <= 3300 and 3300 - slack <= tw["RecvBytes"] <= 3300, why
    assert near(tw["ActiveOpens"], 3, slack // 1000) and rows["tcpwork"]["sockets"] == 6, why
    ip = rows["iperf3"]["counters"]
    assert ip["SendBytes"] > 100_000 and ip["ActiveOpens"] >= 2, why   # control + data connection
    # index=pid splits the same run by process: the two tcpwork processes
    r2 = LabRun(suite, tmp_path, "--json", "index=pid", "*:7008-*:*", "*:*-*:7008",
                "-c", W.TCPWORK_V4.replace("7001", "7008"))
    assert r2.rc == 0, r2.stderr
    pids = [o for o in r2.json() if o.get("pid")]
    assert len(pids) == 2 and {p["processes"][0]["comm"] for p in pids} == {"tcpwork"}, r2.explain()
    got = sorted(p["counters"]["RecvBytes"] for p in pids)      # client 300, server 3000
    slack2 = 1000 * (r2.skipped() + r2.faults())
    assert all(want - slack2 <= g <= want for g, want in zip(got, (300, 3000))), (got, r2.explain())
    if not slack2:
        assert got == [300, 3000], r2.explain()


def test_command_tree_is_the_default_selection(suite, tmp_path):
    env = {"LAB_BACKGROUND": W.OUTSIDE_SERVER}
    flt = ["*:7009-*:*", "*:*-*:7009", "*:7011-*:*", "*:*-*:7011"]
    r = clean_run(suite, tmp_path, "--json", *flt, "-c", W.TREE_CLIENT, env=env)
    assert r.rc == 0, r.stderr
    objs = r.json()
    # the clients' four sockets and the :7011 server the command started (re-parented
    # to init, still its own); not the :7009 server that was running before it
    servers = (7009, 7011)
    keys = sorted((o["lport"] if o["lport"] in servers else o["rport"], o["lport"] in servers)
                  for o in objs)
    want = [(7009, False)] * 2 + [(7011, False)] * 2 + [(7011, True)] * 2
    if r.skipped() + r.faults():      # (three runs with skips: fewer rows, never others)
        assert set(keys) <= set(want) and "skipped" in r.stderr, r.explain()
    else:
        assert keys == want, r.explain()
    sk = r.skipped() + r.faults()
    assert all(near(o["counters"]["SendBytes"], 100, 100 * sk)
               for o in objs if o["rport"] in (7009, 7011)), r.explain()
    assert "not used by the command's processes" in r.stderr, r.stderr
    r = LabRun(suite, tmp_path, "--json", "--all-processes", *flt, "-c", W.TREE_CLIENT, env=env)
    assert r.rc == 0, r.stderr
    objs = r.json()
    assert (sorted(o["lport"] for o in objs if o["lport"] in (7009, 7011))
            == [7009, 7009, 7011, 7011]), r.explain()
    assert near(sum(o["counters"]["RecvBytes"] for o in objs if o["lport"] == 7009), 200,
                100 * (r.skipped() + r.faults())), r.explain()
