"""Tier 3: index=cgroup, index=container, index=netns, --cgroup and --netns in the lab's
guests (Linux 6.1 and 6.12), with the stap collector and with the bpftrace collector.

The guest's workload (busybox sh, -c) makes the places: cgroup v2 mounted, a cgroup T with
children a and b and a container-shaped a/cri-containerd-<id>.scope, and two network
namespaces n1 and n2 (busybox unshare --net=/run/netns/NAME, loopback up in each). In each
namespace a tcpwork server and client run, each moved into its cgroup first, as the native
test's (tests/test_native_bt_attribution.py: same counts, same sides): in n1 the server is
in a and the client in b; in n2 the server in b and the client in the container. On
loopback the server's socket is established in softirq context while the client's task
runs, and the client's bytes arrive there: only attribution through the socket puts them
in the server's cgroup and namespace.

tcpipstat runs on this host: the ids in the records are the guest's, named by the tables
the guest sends after the run (lab.sh, "# tcpipstat-place" lines; tcpipstat/attribution.py).
One guest run per kernel and collector: index=container over the -c tree, its records
saved, then read again here with each index and selection.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tcpipstat.reconcile import parse_tables
from tcpipstat.records import SaveHeader

from .conftest import ROOT, json_rows, lab_kver
from .test_native_bt_attribution import CONTAINER, LOADS, SIDES, _expected, _sums
from .test_tier3_lab import LabRun, clean_run

pytestmark = pytest.mark.lab

CG = "/sys/fs/cgroup"
PORTS = {"n1": 7101, "n2": 7102}
PLACE = "@@PLACE"               # the workload's "@@PLACE PID CGROUP NETNS" lines (meta)
NSTCP = "@@NSTCP"               # "@@NSTCP NETNS Tcp: ..." lines: its own Tcp table at the end


def _side(ns: str, side: str, cgroup: str) -> str:
    """One side of the workload: into its namespace, then its cgroup, then tcpwork (exec:
    the pid told is tcpwork's)."""
    host, conns, send, reply = LOADS[ns]
    work = (f"tcpwork server {host} {PORTS[ns]} {reply} {conns}" if side == "server"
            else f"tcpwork client {host} {PORTS[ns]} {conns} {send}")
    inner = (f"echo $$ > {CG}/T/{cgroup}/cgroup.procs && echo \"{PLACE} $$ {cgroup} {ns}\" "
             f"&& exec {work}")
    return f"nsenter --net=/run/netns/{ns} sh -c '{inner}' &"


WORKLOAD = "\n".join([
    f"mkdir -p {CG}", f"grep -q ' {CG} cgroup2 ' /proc/mounts || mount -t cgroup2 none {CG}",
    *(f"mkdir -p {CG}/T/{c}" for c in ("a", "b", f"a/{CONTAINER}")),
    "mkdir -p /run/netns",
    *(f"touch /run/netns/{n} && unshare --net=/run/netns/{n} true && "
      f"nsenter --net=/run/netns/{n} ip link set lo up" for n in LOADS),
    *(_side(ns, side, cg) for (ns, side), cg in SIDES.items()),
    "wait",
    *(f"nsenter --net=/run/netns/{n} grep ^Tcp: /proc/net/snmp | sed 's/^/{NSTCP} {n} /'"
      for n in LOADS)])


def _tcpipstat(*args: str) -> list[dict]:
    """A replay here (a subprocess: the collector host's tables it installs stay there)."""
    res = subprocess.run([sys.executable, "-m", "tcpipstat", "--json", *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json_rows(res.stdout)


def _added(*places: dict[str, int]) -> dict[str, int]:
    return {k: sum(p[k] for p in places) for k in places[0]}


def _sent(saved: Path, kind: str) -> dict[str, int]:
    """The guest's table of ``kind`` (cgroup, netns) as the saved records carry it:
    name -> number."""
    head = f"# tcpipstat-place {kind} "
    return {w[2]: int(w[1]) for w in (x[len("# tcpipstat-place "):].rstrip("\n").split(" ", 2)
                                      for x in saved.read_text().splitlines(keepends=True)
                                      if x.startswith(head))}


def _passive_opens(meta: str) -> dict[str, int]:
    """Each namespace's own Tcp.PassiveOpens, as the workload read it at its end."""
    lines: dict[str, list[str]] = {}
    for x in meta.splitlines():
        if x.startswith(NSTCP + " "):
            ns, _, table = x[len(NSTCP) + 1:].partition(" ")
            lines.setdefault(ns, []).append(table)
    return {ns: parse_tables(t)["Tcp.PassiveOpens"] for ns, t in lines.items()}


def _placed_pids(meta: str) -> dict[int, tuple[str, str]]:
    """The workload's processes: pid -> (cgroup below T, namespace)."""
    return {int(w[1]): (w[2], w[3]) for w in (x.split() for x in meta.splitlines())
            if w[:1] == [PLACE]}


@pytest.mark.parametrize("backend", ["stap", "bpftrace"])
def test_sockets_in_their_cgroups_and_namespaces(suite, backend, tmp_path):
    saved = tmp_path / "run.records"
    args = ("--json", "index=container", "--save-records", str(saved), "-c", WORKLOAD)
    run = (clean_run(suite, tmp_path, *args) if backend == "stap"
           else LabRun(suite, tmp_path, "--backend", "bpftrace", *args))
    assert run.rc == 0, run.explain()
    assert run.outcome["skipped"] + run.outcome["faults"] == 0, run.explain()
    why = run.explain()
    passive = _passive_opens(run.meta)
    assert set(passive) == set(LOADS), why
    want = _expected(passive)
    # the live report: the -c tree's sockets by container (the client in n2's, the host's)
    live = {r["container"]: r for r in run.json()}
    assert set(live) == {"5eed" * 16, "-"}, why
    assert live["5eed" * 16]["runtime"] == "containerd"
    assert _sums([live["5eed" * 16]]) == want[f"a/{CONTAINER}"], why
    assert _sums([live["-"]]) == _added(want["a"], want["b"]), why
    # the guest's snapshots still follow its place lines; they are its first namespace's
    # counters, which count none of the workload's connections (all in n1 and n2)
    rec = json.loads(run.stdout.splitlines()[-1])["reconciliation"]
    assert rec["source"] == "collector", why
    assert (rec["counters"]["ActiveOpens"]["host"],
            rec["counters"]["ActiveOpens"]["attributed"]) == (0, 5), why
    # the same records by cgroup and by namespace, named by the guest's tables; their header
    # names the guest's kernel (stap's: its -r; bpftrace's: the stand-in's --info)
    replay = ("--from-records", str(saved))
    assert SaveHeader.read(saved.read_text().splitlines()[0]).kernel == lab_kver(suite), why
    cgroups, netns = _sent(saved, "cgroup"), _sent(saved, "netns")
    assert set(netns) == set(LOADS) and "/T/a" in cgroups, why
    by_cgroup = {r["cgroup"]: r for r in _tcpipstat(*replay, "index=cgroup")}
    assert set(by_cgroup) == {f"/T/{c}" for c in ("a", "b", f"a/{CONTAINER}")}, why
    for c in ("a", "b", f"a/{CONTAINER}"):
        assert by_cgroup[f"/T/{c}"]["cgroup_id"] == cgroups[f"/T/{c}"]
        assert _sums([by_cgroup[f"/T/{c}"]]) == want[c], (c, why)
    by_ns = {r["netns_name"]: r for r in _tcpipstat(*replay, "index=netns")}
    assert set(by_ns) == set(LOADS), why
    for n in LOADS:
        assert by_ns[n]["netns"] == netns[n] and _sums([by_ns[n]]) == want[n], (n, why)
    # --cgroup: the cgroup and those below it; --netns: one namespace
    assert _sums(_tcpipstat(*replay, "--cgroup", "/T/a")) == _added(want["a"],
                                                                    want[f"a/{CONTAINER}"])
    assert _sums(_tcpipstat(*replay, "--cgroup", f"{CG}/T/b")) == want["b"]
    n2 = _tcpipstat(*replay, "--netns", str(netns["n2"]))
    assert _sums(n2) == want["n2"], why
    assert all(LOADS["n2"][0] in (r["laddr"], r["raddr"]) for r in n2), why
    # the -c tree by process agrees with index=container: each process is in one place
    pids = _placed_pids(run.meta)
    assert sorted(pids.values()) == sorted((c, n) for (n, _), c in SIDES.items()), why
    by_pid = _tcpipstat(*replay, "index=pid")
    assert {r["pid"] for r in by_pid} == set(pids), why
    by_comm = _tcpipstat(*replay, "index=comm")
    assert [r["comm"] for r in by_comm] == ["tcpwork"], why
    assert _sums(by_comm) == _added(*(_sums([r]) for r in live.values())), why
    inside = [r for r in by_pid if pids[r["pid"]][0] == f"a/{CONTAINER}"]
    assert _sums(inside) == _sums([live["5eed" * 16]]), why
    assert _sums([r for r in by_pid if r not in inside]) == _sums([live["-"]]), why
