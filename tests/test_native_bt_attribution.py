"""Tier 3n: index=cgroup, index=container, index=netns, --cgroup and --netns on a real
bpftrace run on this host (tcpipstat/attribution.py; the records' CGROUP and NETNS).

The test makes its own places: a cgroup T under the cgroup v2 mount with children a and b
(and a/cri-containerd-<id>.scope, a container's shape, below a), and two network
namespaces n1 and n2 (``ip netns add``). In each namespace a loopback server and client
run (tests/bpf_place_workload.py), each moved into its cgroup through cgroup.procs before
it starts: in n1 the server is in a and the client in b; in n2 the server is in b and the
client in the container below a. The server's socket is first seen in softirq context
while the client's task runs (its handshake completes there, and the client's bytes
arrive there: the server reads them only once all have arrived), so only attribution
through the socket puts it in the server's cgroup. Every byte must land in its socket's
cgroup and namespace.

``python3 -m tests.test_native_bt_attribution`` (root) records the same run as the tier-1
fixture tests/fixtures/bpftrace/attribution-native.records (tests/test_attribution.py),
with the names of its cgroups and namespaces beside it (.names.json).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tcpipstat.attribution import cgroup2_root
from tcpipstat.records import SOCKET
from tcpipstat.reconcile import parse_tables

from .test_native_bpftrace import ROOT, _native
from .conftest import json_rows

WORKLOAD = Path(__file__).resolve().parent / "bpf_place_workload.py"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bpftrace" / "attribution-native.records"
CONTAINER = "cri-containerd-" + "5eed" * 16 + ".scope"
# per namespace: loopback address, connections, bytes each client sends, bytes each reply
LOADS = {"n1": ("127.0.0.1", 3, 1500, 150), "n2": ("127.0.0.2", 2, 4000, 40)}
# where each side of each namespace's workload runs (cgroups below T)
SIDES = {("n1", "server"): "a", ("n1", "client"): "b",
         ("n2", "server"): "b", ("n2", "client"): f"a/{CONTAINER}"}


def _expected(passive: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
    """Per cgroup (below T) and per namespace: sockets, bytes sent and received, opens.
    ``passive``: each namespace's own Tcp.PassiveOpens, where the kernel's count is the
    truth. It counts each child socket built (tcp_create_openreq_child()); when the
    handshake's last ACK and the first data segment are processed on two CPUs at once, both
    build one for the same connection, and the loser is freed (seen in the lab). That
    child is the server's, in the server's cgroup, and shares its connection's tuple."""
    out: dict[str, dict[str, int]] = {}
    for (ns, side), cg in SIDES.items():
        _, conns, send, reply = LOADS[ns]
        sent, got = (send, reply) if side == "client" else (reply, send)
        opens = "ActiveOpens" if side == "client" else "PassiveOpens"
        for place in (cg, ns):
            e = out.setdefault(place, {"sockets": 0, "SendBytes": 0, "RecvBytes": 0,
                                       "ActiveOpens": 0, "PassiveOpens": 0})
            e["sockets"] += conns
            e["SendBytes"] += conns * sent
            e["RecvBytes"] += conns * got
            e[opens] += conns
    for ns, count in (passive or {}).items():
        extra = count - out[ns]["PassiveOpens"]
        assert extra >= 0, (ns, count, "fewer passive opens than connections")
        for place in (ns, SIDES[(ns, "server")]):
            out[place]["PassiveOpens"] += extra
    return out


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)



def remove_cgroup(d) -> None:
    """Remove cgroup directory ``d`` (gone already: fine); it can be removed once its last
    process is reaped, which can take a moment after that process was killed."""
    for _ in range(500):
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)

class Places:
    """The test's cgroups (self.cgroup[name]: its folder) and namespaces (self.netns[name]:
    its ip netns name; self.inode[name]: its inode), and a process held in n1."""

    def __init__(self, mount: str):
        tag = f"tcpipstat-place-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.top = f"/{tag}"
        self.cgroup = {c: os.path.join(mount, tag, c) for c in ("a", "b", f"a/{CONTAINER}")}
        self.netns = {n: f"{tag}-{n}" for n in LOADS}
        self.inode: dict[str, int] = {}
        self.holder: subprocess.Popen | None = None
        self._dirs = [os.path.join(mount, tag), *self.cgroup.values()]

    def __enter__(self) -> "Places":
        for d in self._dirs:
            os.mkdir(d)
        for n, name in self.netns.items():
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
            self.inode[n] = os.stat(f"/run/netns/{name}").st_ino
        self.holder = subprocess.Popen(["ip", "netns", "exec", self.netns["n1"], "sleep", "600"])
        for _ in range(3000):       # (it enters n1 as it starts)
            if os.stat(f"/proc/{self.holder.pid}/ns/net").st_ino == self.inode["n1"]:
                break
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        if self.holder is not None:
            self.holder.send_signal(signal.SIGKILL)
            self.holder.wait()
        for name in self.netns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        for d in reversed(self._dirs):
            remove_cgroup(d)

    def passive_opens(self) -> dict[str, int]:
        """Each namespace's own Tcp.PassiveOpens (from 0: the namespaces are new)."""
        return {n: parse_tables(subprocess.run(
            ["ip", "netns", "exec", name, "cat", "/proc/net/snmp"], check=True,
            capture_output=True, text=True, timeout=30).stdout.splitlines())["Tcp.PassiveOpens"]
            for n, name in self.netns.items()}

    def script(self, tmp: Path) -> str:
        """The -c command: every side in its cgroup and namespace, then wait for them."""
        lines = []
        for (n, side), cg in SIDES.items():
            host, conns, send, reply = LOADS[n]
            run = (f"{sys.executable} {WORKLOAD} {side} {host} {tmp / (n + '.port')} "
                   f"{conns} {send} {reply}")
            # (into the cgroup first: ip netns exec remounts /sys, hiding the cgroup mount)
            lines.append(f"sh -c 'echo $$ > {self.cgroup[cg]}/cgroup.procs && exec ip netns "
                         f"exec {self.netns[n]} {run}' &")
        path = tmp / "scenario.sh"
        path.write_text("\n".join([*lines, "wait"]) + "\n")
        return f"/bin/sh {path}"


def _needs_places() -> str:
    """The cgroup v2 mount, or skip saying what is missing."""
    mount = cgroup2_root()
    if mount is None:
        pytest.skip("cgroup v2 is not mounted (no cgroup2 in /proc/self/mounts): "
                    "index=cgroup has nothing to resolve")
    if shutil.which("ip") is None:
        pytest.skip("no ip command (iproute2): the test makes its namespaces with ip netns")
    return mount


def _tcpipstat(args: list[str]) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "tcpipstat", "--json", *args],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json_rows(res.stdout)


def _live_run(places: Places, tmp: Path, saved: Path) -> list[dict]:
    """The collection: index=cgroup of T's sockets, its records saved."""
    return _tcpipstat(["--backend", "bpftrace", "--all-processes", "index=cgroup",
                       "--cgroup", places.top, "--save-records", str(saved),
                       "-c", places.script(tmp)])


def _sums(rows: list[dict]) -> dict[str, int]:
    out = {"sockets": 0, "SendBytes": 0, "RecvBytes": 0, "ActiveOpens": 0, "PassiveOpens": 0}
    for r in rows:
        out["sockets"] += r["sockets"]
        for k in list(out)[1:]:
            out[k] += r["counters"][k]
    return out


@contextmanager
def _run(tmp: Path):
    places = Places(_needs_places())
    with places:
        saved = tmp / "run.records"
        rows = _live_run(places, tmp, saved)
        yield places, rows, saved


@pytest.mark.native
def test_each_byte_in_its_sockets_cgroup_and_namespace(tmp_path):
    _native()
    with _run(tmp_path) as (places, rows, saved):
        want, top = _expected(places.passive_opens()), places.top
        by_cgroup = {r["cgroup"]: r for r in rows}
        assert set(by_cgroup) == {f"{top}/{c}" for c in ("a", "b", f"a/{CONTAINER}")}
        for cg in ("a", "b", f"a/{CONTAINER}"):
            r = by_cgroup[f"{top}/{cg}"]
            assert r["cgroup_id"] == os.stat(places.cgroup[cg]).st_ino
            assert {"sockets": r["sockets"], **{k: r["counters"][k] for k in list(want[cg])[1:]}} \
                == want[cg], cg
        replay = ["--from-records", str(saved)]
        by_ns = {r["netns"]: r for r in _tcpipstat([*replay, "index=netns", "--cgroup", top])}
        assert set(by_ns) == set(places.inode.values())
        for n, inode in places.inode.items():
            assert by_ns[inode]["netns_name"] == places.netns[n]
            assert _sums([by_ns[inode]]) == want[n], n
        # --cgroup: a cgroup and those below it; --netns: an inode, or a process's namespace
        below_a = _sums(_tcpipstat([*replay, "--cgroup", f"{top}/a"]))
        assert below_a == {k: want["a"][k] + want[f"a/{CONTAINER}"][k] for k in below_a}
        assert _sums(_tcpipstat([*replay, "--cgroup", places.cgroup["b"]])) == want["b"]
        n2 = _tcpipstat([*replay, "--netns", str(places.inode["n2"])])
        assert _sums(n2) == want["n2"]
        assert all("127.0.0.2" in (r["laddr"], r["raddr"]) for r in n2)
        assert _sums(_tcpipstat([*replay, "--netns", str(places.holder.pid)])) == want["n1"]
        containers = {r["container"]: r for r in _tcpipstat([*replay, "index=container",
                                                             "--cgroup", top])}
        assert set(containers) == {"5eed" * 16, "-"}
        assert containers["5eed" * 16]["runtime"] == "containerd"
        assert _sums([containers["5eed" * 16]]) == want[f"a/{CONTAINER}"]


def record_fixture() -> None:
    """Record the tier-1 fixture from a real run (see the module's docstring): its records
    of the workload's sockets (the run saw the whole host's), and the names of their
    cgroups (T standing for the test's top cgroup) and namespaces."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, _run(Path(tmp)) as (places, _, saved):
        ids = {os.stat(places.cgroup[c]).st_ino: f"/T/{c}" for c in places.cgroup}
        at = SOCKET.at("CGROUP")
        lines = [x for x in saved.read_text().splitlines(keepends=True)
                 if not x.startswith("R\t") or int(x.split("\t")[at]) in ids]
        FIXTURE.write_text("".join(lines))
        names = {"cgroups": {str(k): v for k, v in ids.items()},
                 "netns": {str(places.inode[n]): n for n in places.inode}}
        FIXTURE.with_suffix(".names.json").write_text(json.dumps(names, indent=1) + "\n")


if __name__ == "__main__":
    record_fixture()
