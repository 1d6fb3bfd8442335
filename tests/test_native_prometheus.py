"""Tier 3n: tcpipstat --serve scraped by a real Prometheus server, and the exporter's
budget and restarts, with the bpftrace collector on this host (tcpipstat/exporter.py).

The Prometheus server is the Debian package's binary (``apt-get install prometheus``;
./run-tests installs it and sets TCPIPSTAT_PROMETHEUS=1, which makes a missing binary a
failure, not a skip), started by the test on a free loopback port with a generated
configuration and a storage folder of its own, and stopped by it. Two exporters stand for
two hosts, each filtered to its own loopback workload (tests/bpf_workload.py) run in a
cgroup shaped like a container; PromQL through Prometheus's HTTP API must give the
workloads' known bytes and opens, per container and summed across both. The queries are
those of docs/prometheus.md, read from it: the cookbook is what this test ran.

The retransmission ratio needs OutSegs, which only the stap collector counts: its query
runs against two exporters replaying lab recordings of the stap collector (the fake
staprun of tier 1), whose ratio the recordings' own reports give; so does the query that
finds exporters whose counts may be low, against a replay whose collector lost a record.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tcpipstat.attribution import cgroup2_root
from tcpipstat.counters import COUNTERS
from tcpipstat.exporter import metric_name

from .test_native_bpftrace import ROOT, WORKLOAD, _free_port, _native
from .test_native_bt_attribution import remove_cgroup
from .test_process_handling import ENDED_RECORDS, FAKES

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

DOC = ROOT / "docs" / "prometheus.md"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONTAINERS = {"a": "cri-containerd-" + "a1" * 32 + ".scope", "b": "docker-" + "b2" * 32 + ".scope"}
# per host: connections, bytes each client sends, bytes each reply
LOADS = {"a": (3, 1500, 150), "b": (2, 4000, 40)}
DEADLINE_S = 90
CATALOGUE = {metric_name(c.name) for c in COUNTERS}     # the counters' families


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("TCPIPSTAT_PROMETHEUS") == "1":
            pytest.fail("TCPIPSTAT_PROMETHEUS=1 but there is no prometheus binary on PATH")
        pytest.skip("no prometheus binary: apt-get install prometheus (./run-tests does), "
                    "then set TCPIPSTAT_PROMETHEUS=1")
    return path


def _until(what: str, probe, timeout: float = DEADLINE_S):
    """Poll ``probe`` (returns (done, what it saw)) until done; fail naming ``what`` and
    the last thing seen once the deadline passes."""
    deadline = time.time() + timeout
    while True:
        done, seen = probe()
        if done:
            return seen
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s; last seen: {seen!r}")
        time.sleep(0.2)



def _terminate(proc: subprocess.Popen) -> int:
    """SIGTERM, a minute to end (then SIGKILL); its exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode

def _replaying(tmp: Path, records: Path, mode: str = "wait-int") -> dict[str, str]:
    """The environment of a run whose stap and staprun are tier 1's fakes, replaying
    ``records`` (tests/fakes; ``mode``: how the fake staprun ends)."""
    return {**os.environ, "TCPIPSTAT_STAP": f"{sys.executable} {FAKES / 'fake_stap.py'}",
            "TCPIPSTAT_STAPRUN": f"{sys.executable} {FAKES / 'fake_staprun.py'}",
            "TCPIPSTAT_CACHE": str(tmp / "cache"), "FAKE_RECORDS": str(records),
            "FAKE_STAPRUN_MODE": mode, "PYTHONPATH": str(ROOT)}


class Exporter:
    """``tcpipstat --serve`` on a free loopback port (its stderr in a file)."""

    def __init__(self, tmp: Path, name: str, args: list[str], fake_records: Path | None = None,
                 mode: str = "wait-int"):
        self.log = tmp / f"{name}.stderr"
        argv = ["--serve", "127.0.0.1:0", "--serve-interval", "1", *args]
        env = None if fake_records is None else _replaying(tmp, fake_records, mode)
        if fake_records is None:
            argv = ["--backend", "bpftrace", *argv]
        else:       # (one replay: a restarted fake collector would replay it again)
            argv = ["--backend", "stap", "-r", "9.9-fake", "--serve-restarts", "0", *argv]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tcpipstat", *argv], cwd=ROOT,
                                         env=env, stderr=log, stdout=subprocess.DEVNULL)
        self.url = _until(f"{name}'s serving line", self._served, 180)
        self.address = self.url.split("/")[2]

    def _served(self):
        text = self.log.read_text()
        m = re.search(r"^tcpipstat: serving (http://\S+/metrics)$", text, re.M)
        if self.proc.poll() is not None:
            pytest.fail(f"tcpipstat --serve ended ({self.proc.returncode}): {text}")
        return bool(m), m.group(1) if m else text

    def scrape(self) -> dict[str, dict[tuple, float]]:
        """{family: {labels as sorted pairs: value}} (counters named without _total)."""
        with urllib.request.urlopen(self.url, timeout=10) as r:
            text = r.read().decode()
        return {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples
                         if not s.name.endswith("_created")}
                for f in text_string_to_metric_families(text)}

    def value(self, family: str) -> float:
        """The sum of a family's samples."""
        return sum(self.scrape().get(family, {}).values())

    def wait_up(self) -> None:
        _until(f"{self.url}: tcpipstat_up 1", lambda: (self.value("tcpipstat_up") == 1, None),
               180)

    def stop(self) -> int:
        return _terminate(self.proc)


class Prometheus:
    """A Prometheus server scraping ``targets`` every second, its data in ``tmp``."""

    def __init__(self, tmp: Path, targets: list[str]):
        port = _free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: tcpipstat\n    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n")
        self.log = tmp / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [_prometheus_binary(), f"--config.file={config}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        self.api = f"http://127.0.0.1:{port}/api/v1"
        self.targets = targets

    def get(self, path: str, **params) -> dict:
        url = f"{self.api}/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def _targets_up(self):
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus ended ({self.proc.returncode}): {self.log.read_text()}")
        try:
            active = self.get("targets")["activeTargets"]
        except OSError as e:
            return False, str(e)
        health = {t["labels"]["instance"]: t["health"] for t in active}
        return health == dict.fromkeys(self.targets, "up"), health

    def wait_targets(self) -> None:
        _until("both targets scraped and up", self._targets_up)

    def query(self, promql: str) -> dict[tuple, float]:
        """An instant query's result: {its labels as sorted pairs: value}."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1])
                for r in self.get("query", query=promql)["result"]}

    def query_until(self, promql: str, want: dict) -> dict:
        return _until(f"PromQL {promql} == {want}",
                      lambda: ((got := self.query(promql)) == want, got))

    def stop(self) -> None:
        _terminate(self.proc)


def cookbook() -> dict[str, str]:
    """docs/prometheus.md's queries by their titles: each ```promql block is a "# title"
    line and the query."""
    blocks = re.findall(r"```promql\n# ([^\n]+)\n(.+?)\n```", DOC.read_text(), re.S)
    assert blocks, f"no ```promql blocks in {DOC}"
    return {title: " ".join(q.split()) for title, q in blocks}


class Containers:
    """Cgroups shaped like containers, below a cgroup of the test's own."""

    def __init__(self):
        mount = cgroup2_root()
        if mount is None:
            pytest.skip("cgroup v2 is not mounted: index=container has nothing to read")
        self.top = os.path.join(mount, f"tcpipstat-prom-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.dirs = {h: os.path.join(self.top, c) for h, c in CONTAINERS.items()}

    def __enter__(self) -> "Containers":
        os.mkdir(self.top)
        for d in self.dirs.values():
            os.mkdir(d)
        return self

    def __exit__(self, *exc) -> None:
        for d in [*self.dirs.values(), self.top]:
            remove_cgroup(d)

    def run(self, host: str, port: int, load: tuple[int, int, int] | None = None) -> None:
        """Host ``host``'s workload (``load``, else LOADS's) on ``port``, in its container's
        cgroup."""
        conns, send, reply = load or LOADS[host]
        shell = (f"echo $$ > {self.dirs[host]}/cgroup.procs && exec {sys.executable} "
                 f"{WORKLOAD} 127.0.0.1 {port} {conns} {send} {reply}")
        subprocess.run(["sh", "-c", shell], check=True, capture_output=True, timeout=120)


def _container_id(host: str) -> str:
    return re.search(r"([0-9a-f]{64})", CONTAINERS[host]).group(1)


def _both_sides(port: int) -> list[str]:
    return [f"*:{port}-*:*", f"*:*-*:{port}"]


@pytest.mark.native
def test_prometheus_sums_the_workloads_of_two_exporters(tmp_path):
    _native()
    _prometheus_binary()
    queries = cookbook()
    ports = {h: _free_port() for h in LOADS}
    with Containers() as places:
        # (--cgroup: a socket of another test that happens to use the port is not counted)
        exporters = {h: Exporter(tmp_path, h, ["index=container", "--cgroup", places.dirs[h],
                                               *_both_sides(ports[h])]) for h in LOADS}
        prom = None
        try:
            for e in exporters.values():
                e.wait_up()
            prom = Prometheus(tmp_path, [e.address for e in exporters.values()])
            prom.wait_targets()
            for h in LOADS:
                places.run(h, ports[h])
            _check_the_cookbook(prom, queries)
        finally:
            if prom is not None:
                prom.stop()
            status = {h: e.stop() for h, e in exporters.items()}
    assert status == dict.fromkeys(LOADS, 0)


def _check_the_cookbook(prom: Prometheus, queries: dict[str, str]) -> None:
    """Every side of every connection: bytes both ways, an active and a passive open."""
    def per_container(f) -> dict:
        return {(("container", _container_id(h)),): float(f(*LOADS[h])) for h in LOADS}
    both_ways = per_container(lambda n, send, reply: 2 * n * (send + reply))
    prom.query_until(queries["bytes per container, across hosts"], both_ways)
    prom.query_until(queries["connections accepted per service (or container)"],
                     per_container(lambda n, send, reply: n))
    prom.query_until(queries["bytes sent by the whole fleet"],
                     {(): float(sum(n * (s + r) for n, s, r in LOADS.values()))})
    prom.query_until(queries["connections opened by the whole fleet"],
                     {(): float(sum(2 * n for n, _, _ in LOADS.values()))})
    prom.query_until(queries["collectors up, of all"], {(): 2.0})
    assert prom.query(queries["exporters whose collector is down"]) == {}
    assert prom.query(queries["exporters whose counts may be low"]) == {}
    # a rate: a series for each container (once it has two samples), at most what the
    # container's total would make in the second or so between the first two samples
    rates = _until("a rate per container", lambda: (
        set(got := prom.query(queries["bytes per second per container, over 5 minutes"]))
        == set(both_ways), got))
    assert all(math.isfinite(v) and 0 <= v <= both_ways[k] for k, v in rates.items())


def test_the_retransmission_ratio_per_remote_network(tmp_path):
    """Two exporters replaying lab recordings of the stap collector (retransmissions made
    by netem in the guests): the ratio of the two hosts' RetransSegs to OutSegs."""
    _prometheus_binary()
    recordings = [FIXTURES / "bookworm-cong-dist.records", FIXTURES / "trixie-cong-dist.records"]
    retrans = out = 0
    for rec in recordings:
        rows = subprocess.run([sys.executable, "-m", "tcpipstat", "--from-records", str(rec),
                               "--json", "index=raddr"], capture_output=True, text=True,
                              check=True, cwd=ROOT, timeout=60).stdout
        for r in map(json.loads, rows.splitlines()):
            assert r["raddr"].startswith("127.0.0.")
            retrans += r["counters"]["RetransSegs"]
            out += r["counters"]["OutSegs"]
    assert retrans > 0
    query = cookbook()["retransmitted segments per segment sent, per remote /24"]
    exporters = [Exporter(tmp_path, rec.stem, ["index=raddr"], rec) for rec in recordings]
    prom = None
    try:
        prom = Prometheus(tmp_path, [e.address for e in exporters])
        prom.wait_targets()
        prom.query_until(query, {(("network", "127.0.0.0/24"),): retrans / out})
    finally:
        if prom is not None:
            prom.stop()
        for e in exporters:
            e.stop()


def test_an_exporter_whose_collector_lost_a_record_is_found(tmp_path):
    """Two exporters replaying a lab recording, both scraped: one whose collector's trailer
    counts a socket record that never arrived. The cookbook's query finds that one alone
    (the other's health counters are there, all 0)."""
    query = cookbook()["exporters whose counts may be low"]
    exporters = [Exporter(tmp_path, mode, ["index=lport"], ENDED_RECORDS, mode)
                 for mode in ("wait-int", "vanish")]
    prom = None
    try:
        prom = Prometheus(tmp_path, [e.address for e in exporters])
        prom.wait_targets()
        prom.query_until(query, {(("instance", exporters[1].address),
                                  ("job", "tcpipstat")): 1.0})
    finally:
        if prom is not None:
            prom.stop()
        for e in exporters:
            e.stop()


@contextmanager
def _accepted(srv: socket.socket, n: int, send: int, reply: int):
    """n loopback connections to ``srv``, all open at once (so their client ports are n
    distinct ones), each sending ``send`` bytes and getting ``reply``; yields the client
    ports while the connections are still open (bpftrace 0.17 can abort when many sockets
    close while it prints its maps: the counts are taken before they close)."""
    port = srv.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    accepted = [srv.accept()[0] for _ in range(n)]
    try:
        for c in clients:
            c.sendall(b"s" * send)
        for a in accepted:
            _recv_all(a, send)
            a.sendall(b"r" * reply)
        for c in clients:
            _recv_all(c, reply)
        yield [c.getsockname()[1] for c in clients]
    finally:
        for s in (*clients, *accepted):
            s.close()


def _recv_all(s: socket.socket, n: int) -> None:
    while n > 0:
        data = s.recv(n)
        assert data, "peer closed early"
        n -= len(data)


@pytest.mark.native
def test_500_remote_ports_through_a_budget_of_50(tmp_path):
    """The server side of 500 connections, index=rport: with --max-series 50 and without a
    budget that binds (the default, 1000), side by side on the same traffic."""
    _native()
    n, send, reply = 500, 200, 20
    with socket.create_server(("127.0.0.1", 0), backlog=n) as srv:
        where = f"*:{srv.getsockname()[1]}-*:*"
        runs = {"folded": Exporter(tmp_path, "folded", ["index=rport", "--max-series", "50",
                                                         where]),
                "unfolded": Exporter(tmp_path, "unfolded", ["index=rport", where])}
        try:
            for e in runs.values():
                e.wait_up()
            with _accepted(srv, n, send, reply) as ports:
                fams = {k: _until(f"{k}: {n} passive opens", lambda e=e: (
                    e.value("tcpipstat_passive_opens") == n, e.scrape()))
                    for k, e in runs.items()}
        finally:
            status = [e.stop() for e in runs.values()]
    assert status == [0, 0] and len(set(ports)) == n
    folded, unfolded = fams["folded"], fams["unfolded"]
    assert folded["tcpipstat_collector_restarts"][()] == 0         # (nothing lost to one)
    assert unfolded["tcpipstat_collector_restarts"][()] == 0
    assert folded["tcpipstat_folded_label_sets"][()] == n - 50
    assert folded["tcpipstat_label_sets"][()] == 50
    assert unfolded["tcpipstat_folded_label_sets"][()] == 0
    counters = [f for f in unfolded if f in CATALOGUE]
    assert len(counters) >= 10
    for family in counters:
        assert len(folded[family]) == 51 and (("rport", "other"),) in folded[family]
        assert len(unfolded[family]) == n
        assert sum(folded[family].values()) == sum(unfolded[family].values()), family
    assert set(unfolded["tcpipstat_recv_bytes"]) == {(("rport", str(p)),) for p in ports}
    assert set(unfolded["tcpipstat_recv_bytes"].values()) == {send}
    assert sum(folded["tcpipstat_send_bytes"].values()) == n * reply
    assert sum(folded["tcpipstat_recv_bytes"].values()) == n * send


def _server_side(e: Exporter, want: tuple[int, int, int]):
    """Wait for the server side's (PassiveOpens, RecvBytes, SendBytes) to be ``want``."""
    def probe():
        fams = e.scrape()
        got = tuple(sum(fams.get(f"tcpipstat_{k}", {}).values())
                    for k in ("passive_opens", "recv_bytes", "send_bytes"))
        return got == want, got
    _until(f"server side (opens, received, sent) == {want}", probe)


def _scrape_until(e: Exporter, done) -> list[float]:
    """Scrape again and again until ``done`` is set: the RecvBytes total of each answer."""
    seen = []
    while not done.is_set():
        seen.append(e.value("tcpipstat_recv_bytes"))
    return seen


@pytest.mark.native
def test_a_killed_bpftrace_is_restarted_and_the_totals_go_on(tmp_path):
    """Workload A, then bpftrace killed (SIGKILL: it writes nothing out), then workload B
    under the new collector: the totals are A's plus B's, and four scrapers scraping all
    the while are all answered, with totals that never go down."""
    _native()
    port = _free_port()
    with Containers() as places:
        _killed_and_restarted(tmp_path, places, port)


def _killed_and_restarted(tmp_path: Path, places: Containers, port: int) -> None:
    e = Exporter(tmp_path, "restart", ["index=lport", "--cgroup", places.dirs["a"],
                                       f"*:{port}-*:*"])
    done = threading.Event()        # (the scrapers' end)
    try:
        e.wait_up()
        places.run("a", port, (2, 1000, 100))
        _server_side(e, (2, 2000, 200))
        (child,) = [c for c in psutil.Process(e.proc.pid).children() if c.name() == "bpftrace"]
        with ThreadPoolExecutor(4) as pool:
            scrapers = [pool.submit(_scrape_until, e, done) for _ in range(4)]
            try:
                child.send_signal(signal.SIGKILL)
                _until("one restart, collector up", lambda: (
                    (e.value("tcpipstat_collector_restarts"), e.value("tcpipstat_up")) == (1, 1),
                    e.scrape()))
                places.run("a", port, (3, 3000, 300))
                _server_side(e, (5, 11000, 1100))
            finally:
                done.set()
            answers = [f.result() for f in scrapers]
    finally:
        status = e.stop()
    assert status == 0
    for seen in answers:
        assert seen and seen == sorted(seen) and 2000 <= seen[0] and seen[-1] <= 11000
    assert ("the collector ended while serving: bpftrace exited with status -9; restarting it"
            in e.log.read_text())
