"""--serve, the Prometheus exporter: real lab recordings replayed by the fake staprun,
/metrics scraped over HTTP in both formats and held to the report of the same records."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tcpipstat.counters import COUNTERS
from tcpipstat.exporter import Exporter, metric_name
from tcpipstat.model import Collection
from tcpipstat.plan import build_plan
from tcpipstat.records import IntervalMark, Parser

from .conftest import FIXTURES, run_cli
from .test_process_handling import ENDED_RECORDS, tcpipstat

pytest.importorskip("prometheus_client")
from prometheus_client.openmetrics.parser import (  # noqa: E402
    text_string_to_metric_families as parse_openmetrics)
from prometheus_client.parser import text_string_to_metric_families as parse_text  # noqa: E402

PERIODIC = FIXTURES / "bookworm-periodic-interval.records"     # 5 one-second windows
CONG = FIXTURES / "bookworm-cong-dist.records"      # segments after a close, from softirq
V6 = FIXTURES / "trixie-tcpwork-v6.records"
V4 = FIXTURES / "bookworm-tcpwork-v4.records"
OPENMETRICS = "application/openmetrics-text"
BY_METRIC = {metric_name(c.name): c for c in COUNTERS}


def start(args, tmp_path, records, addr="127.0.0.1", **env):
    """tcpipstat --serve on a port the kernel picks; (process, URL of /metrics)."""
    host = f"[{addr}]" if ":" in addr else addr
    p = tcpipstat(["--serve", f"{host}:0", *args], tmp_path, FAKE_RECORDS=str(records), **env)
    seen = ""
    for line in p.stderr:                   # (after the lines of preparing the collector)
        seen += line
        m = re.match(rf"tcpipstat: serving (http://{re.escape(host)}:\d+/metrics)$", line.strip())
        if m:
            return p, m.group(1)
    p.kill()
    pytest.fail(f"no serving line: {seen + p.communicate(timeout=30)[1]}")


def scrape(url: str, openmetrics: bool = False) -> dict:
    """{family name: {labels as a sorted tuple of pairs: value}} of one scrape (a counter
    family named without _total, as OpenMetrics names it)."""
    req = urllib.request.Request(url, headers={"Accept": OPENMETRICS} if openmetrics else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        kind, body = r.headers["Content-Type"], r.read().decode()
    assert kind.startswith(OPENMETRICS if openmetrics else "text/plain"), kind
    parse = parse_openmetrics if openmetrics else parse_text
    return {f.name.removesuffix("_total"): {tuple(sorted(s.labels.items())): s.value
                                            for s in f.samples if not s.name.endswith("_created")}
            for f in parse(body)}


def one(families: dict, name: str) -> float:
    return families[name][()]


def scrape_when(url: str, done, timeout: float = 30.0, openmetrics: bool = False) -> dict:
    deadline = time.time() + timeout
    while True:
        fams = scrape(url, openmetrics)
        if done(fams) or time.time() > deadline:
            return fams
        time.sleep(0.1)


def ended(fams: dict) -> bool:
    """Has the collector ended (before it starts, tcpipstat_up is 0 too)?"""
    return one(fams, "tcpipstat_collector_failed") == 1


def counter_families(fams: dict) -> dict:
    """The families of the catalogue's counters, by counter name."""
    return {BY_METRIC[name].name: samples for name, samples in fams.items() if name in BY_METRIC}


def report(args, tmp_path, records, **env) -> list[dict]:
    p = tcpipstat(["--json", "--zeros", *args], tmp_path, FAKE_RECORDS=str(records), **env)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def labels_of(row: dict, index_fields) -> tuple:
    return tuple(sorted((f, str(row[f])) for f in index_fields))


def stop(p, sig=signal.SIGTERM) -> tuple[int, str]:
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert "Traceback" not in err, err
    return p.returncode, err


@pytest.mark.parametrize("records,index,extra", [
    (PERIODIC, "lport", ()),
    (CONG, "pid", ("--cong",)),
    (V6, "tuple", ("--max-series", "100")),
    (V4, "raddr", ()),
])
def test_totals_per_label_set_equal_the_report(tmp_path, records, index, extra):
    # RetransSegs made unavailable: null in the report, absent from /metrics (never 0)
    env = {"FAKE_STAP_MISSING": "tcp_retransmit_skb"}
    rows = report([f"index={index}", *(a for a in extra if a == "--cong")], tmp_path, records,
                  **env)
    assert all(r["counters"]["RetransSegs"] is None for r in rows)
    fields = [f for f in rows[0] if f in ("family", "laddr", "lport", "raddr", "rport", "pid",
                                          "comm")]
    # the collector ends after the records: /metrics then holds every window, with up 0
    p, url = start([f"index={index}", "--serve-restarts", "0", *extra], tmp_path, records,
                   FAKE_STAPRUN_MODE="end", **env)
    try:
        for om in (False, True):
            fams = scrape_when(url, ended, openmetrics=om)
            assert one(fams, "tcpipstat_up") == 0
            counters = counter_families(fams)
            # (the report lists the groups' counters, available or not)
            assert set(counters) == set(rows[0]["counters"]) - {"RetransSegs"}
            for name, samples in counters.items():
                want = {labels_of(r, fields): r["counters"][name] for r in rows
                        if r["counters"][name] is not None}
                assert samples == want, name
    finally:
        status, err = stop(p)
    assert status == 1
    assert "the collector ended while serving: staprun exited with status 0" in err


def test_ipv4_only_counters_are_absent_for_ipv6_label_sets(tmp_path):
    p, url = start(["index=tuple", "--max-series", "10", "--serve-restarts", "0"], tmp_path, V6,
                   FAKE_STAPRUN_MODE="end")
    try:
        fams = scrape_when(url, ended)
    finally:
        stop(p)
    counters = counter_families(fams)
    assert counters["FragOKs"] == {}             # the family is there, with no IPv6 sample
    assert len(counters["InSegs"]) == 4
    assert {dict(k)["family"] for k in counters["InSegs"]} == {"ipv6"}


def _many_ports(tmp_path, sockets: int):
    """The periodic recording repeated, each socket given a remote port of its own
    (20000, 20001, ... in the order they appear) until ``sockets`` sockets."""
    lines = [ln for ln in PERIODIC.read_text().splitlines(keepends=True)
             if not ln.startswith("#")]
    head, body, trailer = lines[0], lines[1:-1], lines[-1]
    out, ports = [head], {}
    while len(ports) < sockets:
        for ln in body:
            f = ln.split("\t")
            if f[0] == "R" and f[8] != "0":
                if len(ports) == sockets:
                    continue
                f[8] = str(ports.setdefault((len(out), ln), 20000 + len(ports)))
            out.append("\t".join(f))
    path = tmp_path / "many-ports.records"
    path.write_text("".join(out) + trailer)
    return path


def test_the_budget_folds_the_rest_into_other_and_keeps_the_totals(tmp_path):
    records = _many_ports(tmp_path, 500)
    rows = report(["index=rport"], tmp_path, records)
    assert len(rows) == 500
    p, url = start(["index=rport", "--max-series", "50", "--serve-restarts", "0"], tmp_path,
                   records, FAKE_STAPRUN_MODE="end")
    try:
        text = scrape_when(url, ended)
        om = scrape(url, openmetrics=True)
    finally:
        stop(p)
    for fams in (text, om):
        assert one(fams, "tcpipstat_folded_label_sets") == 450
        assert one(fams, "tcpipstat_label_sets") == 50
        counters = counter_families(fams)
        assert counters and all(len(s) == 51 for s in counters.values())
        for name, samples in counters.items():
            assert sum(samples.values()) == sum(r["counters"][name] for r in rows), name
        # the first 50 (all as busy) kept their series, exactly as reported
        own = {k: v for k, v in counters["SendBytes"].items() if k != (("rport", "other"),)}
        assert own == {(("rport", str(r["rport"])),): r["counters"]["SendBytes"]
                       for r in rows if r["rport"] < 20050}


def test_within_a_window_the_busiest_label_sets_are_admitted_first(tmp_path):
    # one window (no marks): port 7002 received 10,000 bytes, more than any other
    rows = report(["index=lport"], tmp_path, V4)
    p, url = start(["index=lport", "--max-series", "1", "--serve-restarts", "0"], tmp_path, V4,
                   FAKE_STAPRUN_MODE="end")
    try:
        fams = scrape_when(url, ended)
    finally:
        stop(p)
    assert set(counter_families(fams)["RecvBytes"]) == {(("lport", "7002"),), (("lport", "other"),)}
    assert one(fams, "tcpipstat_folded_label_sets") == len(rows) - 1 == 6


def test_counters_only_grow_across_scrapes_and_sigterm_exits_0(tmp_path):
    # windows arrive every 0.4 s; 5 label sets have their own series, the rest fold
    p, url = start(["index=lport", "--max-series", "5"], tmp_path, PERIODIC,
                   FAKE_STAPRUN_MODE="wait-int", FAKE_STAPRUN_MARK_S="0.4")
    scrapes = []
    try:
        while not scrapes or one(scrapes[-1], "tcpipstat_windows") < 5:
            scrapes.append(scrape(url, openmetrics=len(scrapes) % 2 == 1))
            time.sleep(0.05)
            assert len(scrapes) < 1000
    finally:
        status, err = stop(p)
    assert status == 0, err
    assert len({one(s, "tcpipstat_windows") for s in scrapes}) >= 4
    for before, after in zip(scrapes, scrapes[1:]):
        for name, samples in counter_families(before).items():
            later = counter_families(after)[name]
            assert set(samples) <= set(later), name          # a series, once there, stays
            if not BY_METRIC[metric_name(name)].gauge:
                assert all(later[k] >= v for k, v in samples.items()), name
    last = counter_families(scrapes[-1])["SendBytes"]
    assert len(last) == 6 and (("lport", "other"),) in last
    # 5 windows of 4 connections: 18 accepted on 7007 by then, 300 bytes from each client
    assert sum(last.values()) == 18 * 30 + 18 * 300


def test_sigint_exits_0_too_and_ipv6_serves(tmp_path):
    p, url = start(["index=comm"], tmp_path, PERIODIC, addr="::1", FAKE_STAPRUN_MODE="wait-int")
    fams = scrape_when(url, lambda f: one(f, "tcpipstat_windows") == 5)
    assert one(fams, "tcpipstat_up") == 1
    assert counter_families(fams)["ActiveOpens"] == {(("comm", "tcpwork"),): 18}
    status, _ = stop(p, signal.SIGINT)
    assert status == 0


def test_a_collector_that_fails_is_a_metric_and_the_exit_status(tmp_path):
    p, url = start(["index=lport", "--serve-restarts", "0"], tmp_path, V4,
                   FAKE_STAPRUN_MODE="die")
    try:
        fams = scrape_when(url, ended)
        assert one(fams, "tcpipstat_up") == 0
        # what it wrote before it failed is served
        assert counter_families(fams)["PassiveOpens"][(("lport", "7001"),)] == 3
    finally:
        status, err = stop(p)
    assert status == 1
    assert "the collector ended while serving: stap stopped collection" in err
    assert "fix: run again with --no-overload-guard" in err


@pytest.mark.parametrize("mode", ["transport", "vanish"])
def test_a_record_that_never_came_is_a_health_count(tmp_path, mode):
    """What a report tells as lost (records its trailer counts that never arrived; the
    writes stap's transport dropped, which it says as it ends) is a health counter here."""
    p, url = start(["index=lport", "--serve-restarts", "0"], tmp_path, ENDED_RECORDS,
                   FAKE_STAPRUN_MODE=mode)
    try:
        fams = scrape_when(url, ended)
        health = {name: one(fams, f"tcpipstat_{name}") for name in (
            "lost_records", "lost_writes", "lost_events", "unreadable_lines")}
        assert health == {"lost_records": 1, "lost_writes": 1 if mode == "transport" else 0,
                          "lost_events": 0, "unreadable_lines": 0}
        served = {labels for samples in counter_families(fams).values() for labels in samples}
        assert len(served) == 6         # the rest: the 7 ports less the one whose record was lost
    finally:
        stop(p)


def test_a_collector_that_ends_is_restarted_and_the_counters_keep_growing(tmp_path):
    # each collector replays the recording and ends: three collectors, then tcpipstat gives up
    rows = report(["index=lport"], tmp_path, V4)
    p, url = start(["index=lport", "--serve-restarts", "2"], tmp_path, V4,
                   FAKE_STAPRUN_MODE="end")
    try:
        fams = scrape_when(url, ended)
        assert one(fams, "tcpipstat_up") == 0
        assert one(fams, "tcpipstat_collector_restarts") == 2
        assert one(fams, "tcpipstat_windows") == 3
        for name, samples in counter_families(fams).items():
            want = {(("lport", str(r["lport"])),): 3 * r["counters"][name] for r in rows}
            assert samples == want, name
    finally:
        status, err = stop(p)
    assert status == 1
    assert err.count("the collector ended while serving: staprun exited with status 0; "
                     "restarting it (at most 2 times in 10 minutes)") == 2
    assert "serves tcpipstat_up 0 and the last totals until tcpipstat is stopped" in err


def _snapshots() -> dict[int, dict]:
    """What /metrics must hold of the catalogue's counters after each window of the
    periodic recording (index=lport, --max-series 5): the same records fed in-process."""
    exporter, collection = _serving(["index=lport", "--max-series", "5"])
    exporter.available = tuple(c.name for c in COUNTERS)
    parser, out = Parser("periodic"), {}

    def snapshot() -> None:
        fams = {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
                for f in exporter.collect()}
        out[exporter.windows] = counter_families(fams)
    snapshot()
    for n, line in enumerate(PERIODIC.read_text().splitlines(), 1):
        rec = parser.parse_line(line, n)
        if rec is not None:
            collection.add(rec)
            snapshot()
    return out


def test_concurrent_scrapes_are_all_answered_each_with_one_windows_totals(tmp_path):
    # 8 scrapers, 50 scrapes each, while the windows arrive; every answer must be whole:
    # the counters of exactly the windows it counts (health and totals read at once)
    want = _snapshots()
    p, url = start(["index=lport", "--max-series", "5"], tmp_path, PERIODIC,
                   FAKE_STAPRUN_MODE="wait-int", FAKE_STAPRUN_MARK_S="0.3")

    def scraper(n: int) -> list[dict]:
        return [scrape(url, openmetrics=(n + i) % 2 == 1) for i in range(50)]
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = [a for got in pool.map(scraper, range(8)) for a in got]
    finally:
        status, err = stop(p)
    assert status == 0, err
    assert len(answers) == 400
    seen = set()
    for fams in answers:
        windows = one(fams, "tcpipstat_windows")
        seen.add(windows)
        got = counter_families(fams)
        assert "SendBytes" in got and got == {k: want[windows][k] for k in got}, windows
    assert len(seen) >= 3


def test_a_port_in_use_is_refused_before_anything_runs(tmp_path):
    log = tmp_path / "stap.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = tcpipstat(["--serve", f"127.0.0.1:{port}", "index=lport"], tmp_path,
                      FAKE_STAP_LOG=str(log))
        out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and out == ""
    assert err == f"tcpipstat: cannot serve on '127.0.0.1:{port}': Address already in use\n"
    assert not log.exists()                             # stap never ran


@pytest.mark.parametrize("argv,message", [
    (["--serve", "localhost:9100"], "bad --serve 'localhost:9100': expected [ADDR:]PORT"),
    (["--serve", "::1:9100"], "bad --serve '::1:9100'"),
    (["--serve", "127.0.0.1:65536"], "bad --serve '127.0.0.1:65536'"),
    (["--serve", "[127.0.0.1]:80"], "bad --serve '[127.0.0.1]:80'"),
    (["--serve", "\x1b[31m:80"], "bad --serve '\\x1b[31m:80'"),
    (["--serve", "9100"], "index=tuple with --serve makes a series per socket: give --max-series"),
    (["--serve", "9100", "index=lport", "--max-series", "0"], "bad --max-series '0'"),
    (["--serve", "9100", "index=lport", "--serve-interval", "0"], "bad --serve-interval '0'"),
    (["--serve", "9100", "index=lport", "--json"], "it cannot be combined with --json"),
    (["--serve", "9100", "index=lport", "timeout=5"], "it cannot be combined with timeout"),
    (["--serve", "9100", "index=lport", "-c", "true"], "it cannot be combined with -c"),
    (["--serve", "9100", "index=lport", "--dist"], "it cannot be combined with --dist"),
    (["--max-series", "5", "index=lport"], "--max-series needs --serve"),
    (["--serve-interval", "1"], "--serve-interval needs --serve"),
    (["--serve-restarts", "1"], "--serve-restarts needs --serve"),
    (["--serve", "9100", "index=lport", "--serve-restarts", "-1"], "bad --serve-restarts '-1'"),
    (["--read", "x.pcap", "--serve", "9100"], "cannot be combined with --serve"),
])
def test_refusals_name_the_bad_value(argv, message):
    status, out, err = run_cli(*argv)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err


def test_without_prometheus_client_serve_says_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "prometheus_client"
                        else find_spec(name, *a))
    status, _, err = run_cli("--serve", "9100", "index=lport")
    assert status == 2 and "pip install 'tcpipstat[serve]'" in err


def test_metric_names():
    assert [metric_name(n) for n in ("RecvBytes", "InSegs", "DelayedACKs", "TCPMemoryPressures",
                                     "CaOpenUs", "FragOKs", "CurrEstab")] == [
        "tcpipstat_recv_bytes", "tcpipstat_in_segs", "tcpipstat_delayed_acks",
        "tcpipstat_tcp_memory_pressures", "tcpipstat_ca_open_us", "tcpipstat_frag_oks",
        "tcpipstat_curr_estab"]
    names = [metric_name(c.name) for c in COUNTERS]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[a-z_]+", n) for n in names)
    assert [c.name for c in COUNTERS if c.gauge] == ["CurrEstab"]


def _serving(argv: list[str]):
    """An Exporter fed by a Collection in-process, as --serve wires them."""
    plan = build_plan(["--serve", "0", *argv])
    exporter, collection = Exporter(plan), Collection()
    collection.on_interval = lambda win: exporter.on_window(win, win.rows(plan.index), 0, False)
    return exporter, collection


def test_memory_stays_flat_through_churn(tmp_path):
    # 100 times the recording, each time with new remote ports: 4,000 sockets come and go
    exporter, collection = _serving(["index=rport", "--max-series", "50"])
    parser = Parser("churn")
    lines = _many_ports(tmp_path, 4000).read_text().splitlines()
    windows = "".join("I" if ln.startswith("I") else "R" for ln in lines[:-1]).split("I")
    busiest = max(len(w) for w in windows)          # (sockets in the busiest window: 12)
    for n, line in enumerate(lines[:-1], 1):
        rec = parser.parse_line(line, n)
        collection.add(rec)
        assert len(collection.sockets) <= busiest and len(collection.marks) <= 1
    collection.finish()                                 # (the last, partial window)
    assert exporter.windows == 100 * 5 + 1 and exporter.folded == 4000 - 50
    assert collection.sockets == {}
    assert len(exporter._series) == 50 and exporter._folded == set()


def test_a_closed_sockets_process_is_kept_for_segments_after_its_close():
    # the server socket of :5201 closes (pid 111); a segment reaches it later in softirq
    exporter, collection = _serving(["index=pid", "--serve-interval", "60"])
    parser = Parser(CONG.name)
    records = [parser.parse_line(ln, n) for n, ln in enumerate(CONG.read_text().splitlines(), 1)]
    late = next(r for r in records if getattr(r, "reason", "") == "end")
    for rec in filter(None, records):
        if rec is late:
            collection.add(IntervalMark(1, 0))        # the late segment in the next window
        collection.add(rec)
    collection.add(IntervalMark(2, 0))
    assert late.tuple in collection.sockets            # kept: 2 windows of 60 s < 120 s
    assert {k.pid: c["InSegs"] for k, c in exporter._series.items()} == {111: 1560 + 16 + 1,
                                                                         112: 572 + 13}
    for seq in range(3, 3 + math.ceil(120 / 60)):
        collection.add(IntervalMark(seq, 0))
    assert collection.sockets == {}
