"""Where sockets belong (tcpipstat/attribution.py, the records' CGROUP and NETNS fields,
index=cgroup, index=container, index=netns, --cgroup, --netns), without a kernel.

The grouping is checked on records of a real bpftrace run on the CI host
(tests/fixtures/bpftrace/attribution-native.records, recorded by
``python3 -m tests.test_native_bt_attribution``): its cgroup ids and namespace inodes are
mapped onto folders and files made here, so that the real lookups (a walk of a cgroup
tree, the inodes of ip netns files) name them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tcpipstat import attribution, bpftrace
from tcpipstat.attribution import CgroupPaths, NetnsNames, cgroup2_root, container_of
from tcpipstat.errors import UsageError
from tcpipstat.indexes import csv_key_fields
from tcpipstat.model import Collection
from tcpipstat.plan import PID_MAX_LIMIT, build_plan
from tcpipstat.records import SOCKET, SocketRecord, parse_text
from tcpipstat.stap import dump_script

from .conftest import FIXTURES, run_cli
from .test_native_bt_attribution import CONTAINER, _expected

NATIVE = FIXTURES / "bpftrace" / "attribution-native.records"
HEX = "3f1ba79c" * 8
HEX2 = "0123456789abcdef" * 4
UID = "7c8d0e2a-6d2f-4bbd-9d9b-8f8f2c2c2e2e"
UID_ = UID.replace("-", "_")       # (kubelet's systemd names escape - as _)

# Real-world cgroup paths and what each names; where each shape comes from:
SHAPES = [
    # docs.docker.com, "Runtime metrics" (Find the cgroup for a given container): cgroup v2
    # with the systemd driver, and the cgroupfs driver; falcosecurity/libs
    # container_engine/docker/docker_linux.cpp (DOCKER_CGROUP_LAYOUT)
    (f"/system.slice/docker-{HEX}.scope", (HEX, "docker")),
    (f"/docker/{HEX}", (HEX, "docker")),
    # kubernetes pkg/kubelet/cm/cgroup_manager_linux.go, ToSystemd() ("kubepods-burstable-
    # pod1234_abcd...slice") with containerd and CRI-O's scopes: falcosecurity/libs
    # container_engine/cri.cpp (CRI_CGROUP_LAYOUT: "/cri-containerd-", "/crio-", ".scope")
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"cri-containerd-{HEX}.scope", (HEX, "containerd")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{HEX}.scope", (HEX, "crio")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{HEX}.scope", (HEX, "crio")),
    # the same file: containerd without SystemdCgroup (":cri-containerd:"), and CRI-O with
    # cgroupfs ("/crio-", "")
    (f"/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{HEX}", (HEX, "containerd")),
    (f"/kubepods/besteffort/pod{UID}/crio-{HEX}", (HEX, "crio")),
    # kubelet's cgroupfs names (ToCgroupfs(); pod_container_manager_linux.go: "pod" + UID)
    # and a runtime's bare container id below the pod ("/", "" in CRI_CGROUP_LAYOUT)
    (f"/kubepods/burstable/pod{UID}/{HEX}", (HEX, "kubepods")),
    (f"/kubepods/pod{UID}/{HEX}", (HEX, "kubepods")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice",
     ("pod" + UID, "kubepods")),
    # falcosecurity/libs container_engine/docker/podman.cpp ("/libpod-", ".scope"), and
    # sysflow-telemetry/sf-collector src/libs/utils.cpp (".scope/container", and "" for
    # podman without systemd); rootless podman lives under the user's user@UID.service
    (f"/machine.slice/libpod-{HEX}.scope", (HEX, "podman")),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{HEX}.scope/container",
     (HEX, "podman")),
    (f"/machine.slice/libpod-conmon-{HEX}.scope", (HEX, "podman")),
    (f"/libpod_parent/libpod-{HEX}", (HEX, "podman")),
    # nested: the innermost container; a container's own services are the container's
    (f"/system.slice/docker-{HEX}.scope/docker/{HEX2}", (HEX2, "docker")),
    (f"/system.slice/docker-{HEX}.scope/system.slice/nginx.service", (HEX, "docker")),
    # systemd services (systemd.unit(5) names), the container daemons' own among them
    ("/system.slice/nginx.service", ("nginx.service", "systemd")),
    ("/system.slice/docker.service", ("docker.service", "systemd")),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-x.service",
     ("app-gnome-x.service", "systemd")),
    # the host: the root, session scopes, init; names that are not quite a container's
    ("/", ("-", "")),
    ("/user.slice/user-1000.slice/session-3.scope", ("-", "")),
    ("/init.scope", ("-", "")),
    (f"/system.slice/docker-{HEX[:63]}.scope", ("-", "")),
    (f"/{HEX}", ("-", "")),
    (None, ("", "")),
]


@pytest.mark.parametrize("path, found", SHAPES, ids=lambda x: str(x)[:40])
def test_container_of_real_cgroup_paths(path, found):
    assert container_of(path) == found


# ---- the record format ----

@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.records")), ids=lambda p: p.name)
def test_recordings_of_earlier_formats_have_no_place(path):
    """Formats 1 and 2 stay readable: their sockets' places are 0, unknown, and a place
    index puts all of them in one unknown row."""
    recs = parse_text(path.read_text(), path.name)
    assert recs[0].format in (1, 2)
    sockets = [r for r in recs if isinstance(r, SocketRecord)]
    assert all(r.cgroup == 0 and r.netns == 0 for r in sockets)
    c = Collection().extend(recs)
    for index in ("cgroup", "netns", "container"):
        rows = c.rows(index)
        assert len(rows) <= 1 and sum(r.sockets for r in rows) == len(c.rows("tuple"))


def test_format_3_socket_records_carry_cgroup_and_netns():
    head = "H\ttcpipstat\t3\tv\t1\t0\t64\tSendBytes\n"
    fields = ["R", "close", "2", "0", "7f000001", "80", "0", "7f000001", "4000", "7", "x",
              "0", str(2 ** 40 + 5), "4026532178", "SendBytes=9"]
    (r,) = [x for x in parse_text(head + "\t".join(fields) + "\n")
            if isinstance(x, SocketRecord)]
    assert (r.cgroup, r.netns, r.pid, r.counters) == (2 ** 40 + 5, 4026532178, 7,
                                                      {"SendBytes": 9})
    fields[SOCKET.at("CGROUP")] = "-1"
    with pytest.raises(Exception, match="bad number"):
        parse_text(head + "\t".join(fields) + "\n")


def test_the_place_of_a_tuple_is_its_last_known_one():
    """A record without the socket at hand (0) leaves the place the tuple had."""
    head = "H\ttcpipstat\t3\tv\t1\t0\t64\tSendBytes\n"
    line = "R\t{}\t2\t0\t1\t80\t0\t2\t90\t0\t\t0\t{}\t{}\tSendBytes=1\n"
    recs = parse_text(head + line.format("spill", 11, 22) + line.format("close", 0, 0))
    (st,) = Collection().extend(recs).sockets.values()
    assert (st.cgroup, st.netns, st.counters["SendBytes"]) == (11, 22, 2)


def test_an_interval_window_groups_by_the_place_the_run_knows():
    """stap writes a tuple's place with the records of an interval in which its socket was
    seen; a later window whose records lack it (0) is still grouped by it."""
    head = "H\ttcpipstat\t3\tv\t1\t0\t64\tSendBytes\n"
    line = "R\tinterval\t2\t0\t1\t80\t0\t2\t90\t0\t\t0\t{}\t{}\tSendBytes={}\n"
    windows = []
    c = Collection(on_interval=windows.append)
    c.extend(parse_text(head + line.format(11, 22, 5) + "I\t1\t2\n" + line.format(0, 0, 7)
                        + "I\t2\t3\n"))
    keys = [[(r.key.netns, r.counters["SendBytes"]) for r in w.rows("netns")] for w in windows]
    assert keys == [[(22, 5)], [(22, 7)]]
    assert [r.key.cgroup_id for r in windows[1].rows("cgroup")] == [11]


# ---- the native run, its ids named here ----

@pytest.fixture
def native(tmp_path, monkeypatch):
    """The fixture's records with its cgroup ids replaced by those of a cgroup tree (T/a,
    T/b, T/a/<container>) made in tmp_path, which tcpipstat.attribution walks; its
    namespaces named as they were (a namespace's inode cannot be made here: the ip netns
    lookup itself is test_netns_names_are_the_nsfs_files_only's)."""
    names = json.loads(NATIVE.with_suffix(".names.json").read_text())
    root = tmp_path / "cgroup"
    ids = {}
    root.mkdir()
    (root / "cgroup.procs").touch()
    for cgid, path in names["cgroups"].items():
        folder = root / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cgroup.procs").touch()
        ids[cgid] = str(folder.stat().st_ino)
    lines = []
    for line in NATIVE.read_text().splitlines(keepends=True):
        f = line.split("\t")
        if f[0] == "R":
            f[SOCKET.at("CGROUP")] = ids[f[SOCKET.at("CGROUP")]]
        lines.append("\t".join(f))
    records = tmp_path / "native.records"
    records.write_text("".join(lines))
    monkeypatch.setattr(attribution, "_cgroups", CgroupPaths(str(root)))
    netns = {int(i): n for i, n in names["netns"].items()}
    monkeypatch.setattr(attribution, "_netns", SimpleNamespace(name=lambda i: netns.get(i, "")))
    return records, root, {n: i for i, n in netns.items()}


def _json(*argv: str) -> list[dict]:
    status, out, err = run_cli(*argv, "--json")
    assert status == 0, err
    return [json.loads(x) for x in out.splitlines()]


def _sums(rows) -> dict[str, int]:
    keys = ("ActiveOpens", "PassiveOpens", "RecvBytes", "SendBytes")
    return {"sockets": sum(r["sockets"] for r in rows),
            **{k: sum(r["counters"][k] for r in rows) for k in keys}}


def test_index_cgroup_groups_the_native_run(native):
    records, _, _ = native
    want = _expected()
    rows = _json("--from-records", str(records), "index=cgroup")
    assert [r["cgroup"] for r in rows] == ["/T/a", f"/T/a/{CONTAINER}", "/T/b"]
    for r in rows:
        assert _sums([r]) == want[r["cgroup"].removeprefix("/T/")]
        assert r["cgroup_id"] > 0 and list(r)[:3] == ["index", "cgroup", "cgroup_id"]


def test_index_netns_and_container_group_the_native_run(native):
    records, _, inodes = native
    want = _expected()
    rows = _json("--from-records", str(records), "index=netns")
    assert [(r["netns"], r["netns_name"]) for r in rows] == sorted(
        (inodes[n], n) for n in ("n1", "n2"))
    for r in rows:
        assert _sums([r]) == want[r["netns_name"]]
    rows = {r["container"]: r for r in _json("--from-records", str(records), "index=container")}
    assert set(rows) == {"-", "5eed" * 16} and rows["5eed" * 16]["runtime"] == "containerd"
    assert _sums([rows["5eed" * 16]]) == want[f"a/{CONTAINER}"]
    assert _sums([rows["-"]]) == {k: want["a"][k] + want["b"][k] for k in want["a"]}
    assert rows["-"]["runtime"] is None


def test_cgroup_and_netns_select_the_native_runs_sockets(native):
    records, root, inodes = native
    want = _expected()
    below_a = _sums(_json("--from-records", str(records), "--cgroup", "/T/a"))
    assert below_a == {k: want["a"][k] + want[f"a/{CONTAINER}"][k] for k in below_a}
    # a folder under the mount names the same cgroup; / is every known one
    assert _sums(_json("--from-records", str(records), "--cgroup", f"{root}/T/b")) == want["b"]
    assert _sums(_json("--from-records", str(records), "--cgroup", "/"))["sockets"] == 10
    for n in ("n1", "n2"):
        rows = _json("--from-records", str(records), "--netns", str(inodes[n]))
        assert _sums(rows) == want[n]
    rows = _json("--from-records", str(records), "--netns", str(inodes["n2"]), "--cgroup", "/T/b")
    assert _sums(rows) == {"sockets": 2, "ActiveOpens": 0, "PassiveOpens": 2,
                           "RecvBytes": 8000, "SendBytes": 80}


def test_place_reports_in_tables_and_csv(native):
    records, _, inodes = native
    status, out, err = run_cli("--from-records", str(records), "index=cgroup")
    assert status == 0 and "Cgroup: /T/a  python3" in out and "(3 sockets)" in out, err
    status, out, err = run_cli("--from-records", str(records), "index=netns")
    assert f"Network namespace: {inodes['n2']} (n2)" in out
    status, out, _ = run_cli("--from-records", str(records), "index=container", "--csv")
    head, *lines = out.splitlines()
    assert csv_key_fields("container") == ("index", "family", "laddr", "lport", "raddr",
                                            "rport", "pid", "comm", "container", "runtime")
    assert head.split(",")[:12] == [*csv_key_fields("container"), "sockets", "closed"]
    assert sorted(x.split(",")[8:11] for x in lines) == [["-", "", "8"],
                                                         ["5eed" * 16, "containerd", "2"]]


def test_a_cgroup_no_walk_finds_is_shown_by_its_id(native, monkeypatch):
    records, _, _ = native
    monkeypatch.setattr(attribution, "_cgroups", CgroupPaths(None))
    status, out, _ = run_cli("--from-records", str(records), "index=cgroup")
    assert status == 0 and "(no such cgroup now)" in out
    rows = _json("--from-records", str(records), "index=cgroup")
    assert all(r["cgroup"] is None and r["cgroup_id"] > 0 for r in rows) and len(rows) == 3
    (row,) = _json("--from-records", str(records), "index=container")
    assert row["container"] is None and row["sockets"] == 10


# ---- a collector on another host (the lab's): its stand-in's tables name its places ----

@pytest.fixture
def sent(tmp_path, monkeypatch):
    """The native run's records as a stand-in passes them on: its sockets live on another
    host, which sends its cgroup v2 mount, cgroup ids with paths and named namespaces as
    place lines after them. This host's tables must not be read."""
    names = json.loads(NATIVE.with_suffix(".names.json").read_text())
    head = "# tcpipstat-place"
    lines = [f"{head} cgroup2 /sys/fs/cgroup\n", f"{head} cgroup 1 /\n",
             f"{head} cgroup x7 /bad\n", f"{head} ipc 5 /bad\n", f"{head} netns 9\n"]
    lines += [f"{head} cgroup {i} {p}\n" for i, p in names["cgroups"].items()]
    lines += [f"{head} netns {i} {n}\n" for i, n in names["netns"].items()]
    records = tmp_path / "sent.records"
    records.write_text(NATIVE.read_text() + "".join(lines))
    monkeypatch.setattr(attribution, "_cgroups", None)
    monkeypatch.setattr(attribution, "_netns", None)
    monkeypatch.setattr(attribution, "cgroup2_root", lambda *a: pytest.fail("host's cgroups"))
    monkeypatch.setattr(NetnsNames, "_list", lambda *a: pytest.fail("host's namespaces"))
    return records, {n: int(i) for i, n in names["netns"].items()}


def test_the_collector_hosts_tables_name_its_places(sent):
    records, inodes = sent
    want = _expected()
    rows = _json("--from-records", str(records), "index=cgroup")
    assert [r["cgroup"] for r in rows] == ["/T/a", f"/T/a/{CONTAINER}", "/T/b"]
    assert [_sums([r]) for r in rows] == [want["a"], want[f"a/{CONTAINER}"], want["b"]]
    rows = _json("--from-records", str(records), "index=netns")
    assert [(r["netns"], r["netns_name"]) for r in rows] == sorted(
        (inodes[n], n) for n in ("n1", "n2"))
    rows = {r["container"]: r for r in _json("--from-records", str(records), "index=container")}
    assert _sums([rows["5eed" * 16]]) == want[f"a/{CONTAINER}"]
    assert attribution.cgroups().path(1) == "/" and attribution.cgroups().path(7) is None


def test_cgroup_and_netns_are_checked_against_the_collector_hosts_tables(sent):
    records, inodes = sent
    want = _expected()
    # /T/a is no cgroup on this host: the collector's host says it is one there
    below_a = _sums(_json("--from-records", str(records), "--cgroup", "/T/a"))
    assert below_a == {k: want["a"][k] + want[f"a/{CONTAINER}"][k] for k in below_a}
    assert _sums(_json("--from-records", str(records), "--cgroup",
                       "/sys/fs/cgroup/T/b")) == want["b"]
    assert _sums(_json("--from-records", str(records), "--netns",
                       str(inodes["n1"]))) == want["n1"]
    status, _, err = run_cli("--from-records", str(records), "--cgroup", "/T/c")
    assert status == 2 and "bad --cgroup '/T/c': no such cgroup" in err
    # a process of this host tells nothing of that host's namespaces
    status, _, err = run_cli("--from-records", str(records), "--netns", str(os.getpid()))
    assert status == 2 and f"bad --netns '{os.getpid()}': the records were collected" in err


def test_sent_places_pass_every_line_on(monkeypatch):
    monkeypatch.setattr(attribution, "_cgroups", None)
    monkeypatch.setattr(attribution, "_netns", None)
    lines = ["R\t...\n", "# tcpipstat-place cgroup 12 /a b\n", "# other\n"]
    assert list(attribution.sent_places(lines)) == lines
    assert attribution.cgroups().path(12) == "/a b"
    assert attribution.cgroups().exists("/a b") and not attribution.cgroups().exists("/a")


# ---- lookups ----

def test_the_cgroup2_mount_is_found_unified_or_hybrid(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert cgroup2_root(str(mounts)) == "/sys/fs/cgroup"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup2_root(str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("cgroup2 /my\\040cgroups cgroup2 rw 0 0\n")
    assert cgroup2_root(str(mounts)) == "/my cgroups"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n")
    assert cgroup2_root(str(mounts)) is None
    assert cgroup2_root(str(tmp_path / "none")) is None


def test_the_cgroup_tree_is_walked_at_most_once_a_second(tmp_path):
    now = [100.0]
    paths = CgroupPaths(str(tmp_path), clock=lambda: now[0])
    (tmp_path / "a").mkdir()
    assert paths.path(tmp_path.stat().st_ino) == "/"
    assert paths.path((tmp_path / "a").stat().st_ino) == "/a"
    (tmp_path / "a" / "b").mkdir()
    b = (tmp_path / "a" / "b").stat().st_ino
    now[0] += 0.5
    assert paths.path(b) is None            # (walked half a second ago)
    now[0] += 0.5
    assert paths.path(b) == "/a/b"
    (tmp_path / "a" / "b").rmdir()
    assert paths.path(b) == "/a/b" and paths.path(0) is None


def test_netns_names_are_the_nsfs_files_only(tmp_path):
    (tmp_path / "blue").touch()
    ino = (tmp_path / "blue").stat().st_ino
    assert NetnsNames(str(tmp_path), own_ns=str(tmp_path / "blue")).name(ino) == "blue"
    # (on this folder's file system, not on nsfs: an empty file, no namespace)
    assert NetnsNames(str(tmp_path), own_ns="/proc/self/ns/net").name(ino) == ""
    assert NetnsNames(str(tmp_path / "gone"), own_ns="/proc/self/ns/net").name(ino) == ""


# ---- --cgroup and --netns ----

def test_check_cgroup_takes_both_spellings(tmp_path):
    (tmp_path / "x.slice" / "y.service").mkdir(parents=True)
    (tmp_path / "x.slice" / "y.service" / "cgroup.procs").touch()
    (tmp_path / "cgroup.procs").touch()
    paths = CgroupPaths(str(tmp_path))
    for text in ("/x.slice/y.service", "x.slice/y.service/", "//x.slice/../x.slice/y.service",
                 f"{tmp_path}/x.slice/y.service"):
        assert attribution.check_cgroup(text, paths) == "/x.slice/y.service", text
    assert attribution.check_cgroup(str(tmp_path), paths) == "/"
    for text in ("/nope", "../../etc", "", "/x.slice", "a\0b"):
        with pytest.raises(UsageError, match="bad --cgroup"):
            attribution.check_cgroup(text, paths)
    with pytest.raises(UsageError, match="cgroup v2 is not mounted"):
        attribution.check_cgroup("/x", CgroupPaths(None))


def test_check_netns_takes_an_inode_or_a_pid():
    own = os.stat("/proc/self/ns/net").st_ino
    assert attribution.check_netns(str(os.getpid()), PID_MAX_LIMIT) == own
    assert attribution.check_netns("4026532178", PID_MAX_LIMIT) == 4026532178
    gone = next(p for p in range(PID_MAX_LIMIT, 1, -1) if not Path(f"/proc/{p}").exists())
    for text in ("0", "-1", "abc", "4294967296", "١٢", str(gone)):
        with pytest.raises(UsageError, match="bad --netns"):
            attribution.check_netns(text, PID_MAX_LIMIT)


@pytest.mark.parametrize("argv, said", [
    (["--cgroup", "/no/such/cgroup/here"], "bad --cgroup '/no/such/cgroup/here'"),
    (["--netns", "12x"], "bad --netns '12x'"),
    (["--read", "x.pcap", "--netns", "1"], "--netns"),
    (["--check", "--cgroup", "/"], "--cgroup"),
    (["--read", "x.pcap", "index=cgroup"], "which process, cgroup or namespace"),
])
def test_bad_places_exit_2_in_one_line(argv, said):
    status, out, err = run_cli(*argv)
    assert status == 2 and said in err and len(err.strip().splitlines()) == 1, err


def test_the_plan_holds_the_checked_places():
    plan = build_plan(["--netns", str(os.getpid())])
    assert plan.netns == os.stat("/proc/self/ns/net").st_ino and plan.cgroup is None


# ---- the collectors ----

def test_bpftrace_reads_the_place_through_the_socket():
    plan = build_plan(["--backend", "bpftrace"])
    text = bpftrace.render_program(plan)
    assert "@cg[$k] = $sk->sk_cgrp_data.cgroup->kn->id;" in text
    assert "@ns[$k] = (uint64)$sk->__sk_common.skc_net.net->ns.inum & 0xffffffff;" in text
    assert "\\t%lu\\t%lu" in text             # (0.17's %d would cut them to 32 bits)
    assert "@cg[$k] = (uint64)0;" in bpftrace.render_program(plan, cgroup=False)
    assert not bpftrace.cgroup_readable(["false"])


def test_end_dump_writes_the_place():
    dump = bpftrace.EndDump(("SendBytes",))
    for line in ("@tup[5]: (2, 0, 1, 80, 0, 2, 90)", "@c_SendBytes[5]: 3", "@cg[5]: 8321499145",
                 "@ns[5]: 4026532178"):
        dump.add(line + "\n")
    (rec,) = dump.records()
    f = rec.split("\t")
    assert (f[SOCKET.at("CGROUP")], f[SOCKET.at("NETNS")]) == ("8321499145", "4026532178")


@pytest.mark.parametrize("words, place", [
    ([], False), (["--save-records", "run.records"], False), (["index=cgroup"], True),
    (["index=netns", "--save-records", "run.records"], True)])
def test_the_stap_collector_reads_places_only_when_asked(words, place):
    """The stap collector reads a socket's cgroup and netns only when the run asks for
    places (its reads run in per-call probes: the lab's congestion runs once skipped
    hundreds of hits for reads on every probe hit), not for --save-records alone; without,
    its records say 0, unknown, never a guess."""
    text = dump_script(build_plan(["--backend", "stap", "--cong", "--dist", *words]))
    assert ("sk_cgrp_data" in text) is place
    assert ("t,\n              0, 0)" in text) is not place


def test_a_child_socket_the_kernel_freed_is_its_servers_passive_open():
    """Recorded in the lab (bookworm's guest, the bpftrace collector, two CPUs, a loaded
    host): for one of n2's two connections the kernel built two child sockets (the last ACK
    and the first data segment handled on two CPUs at once) and freed the loser at once. The
    kernel counts a passive open for each (tcp_create_openreq_child()), and so does the
    report: n2 has 3 for its 2 connections, the extra one in the server's cgroup (b) and
    in its connection's row; the freed child never had a process."""
    race = FIXTURES / "bpftrace" / "attribution-lab-race.records"
    freed = [r for r in parse_text(race.read_text())
             if isinstance(r, SocketRecord) and r.reason == "close" and not r.pid]
    assert [(r.counters["PassiveOpens"], r.counters["RecvBytes"]) for r in freed] == [(1, 0)]
    want = _expected({"n1": 3, "n2": 3})
    replay = ["-m", "tcpipstat", "--json", "--from-records", str(race)]
    by_ns = {r["netns_name"]: r for r in _replayed(*replay, "index=netns")}
    assert {n: _sums([r]) for n, r in by_ns.items()} == {n: want[n] for n in ("n1", "n2")}
    by_cgroup = {r["cgroup"]: r for r in _replayed(*replay, "index=cgroup")}
    assert {c.removeprefix("/T/"): _sums([r]) for c, r in by_cgroup.items()} == {
        c: want[c] for c in ("a", "b", f"a/{CONTAINER}")}
    (row,) = [r for r in _replayed(*replay, f"*:*-*:{freed[0].tuple.rport}")
              if r["lport"] == freed[0].tuple.lport]
    assert row["counters"]["PassiveOpens"] == 2 and row["sockets"] == 1
    assert [p["comm"] for p in row["processes"]] == ["tcpwork"]   # (none from the freed)


def _replayed(*argv: str) -> list[dict]:
    """A replay in a subprocess: the guest's tables a lab recording installs stay there."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                         cwd=FIXTURES.parent.parent)
    assert res.returncode == 0, res.stderr
    return [json.loads(x) for x in res.stdout.splitlines() if '"reconciliation"' not in x]
