"""Tier 1: the bpftrace collector's choice of probe points per kernel (tcpipstat/bt_points.py),
on what bpftrace really listed (``bpftrace -lv``, the listing files in tests/fixtures/bpftrace/:
the lab's 6.1 guest with bpftrace 0.17, its 6.12 guest with 0.23, this CI host's 6.18 with
0.17), and its runtime warnings as bpftrace 0.23 wrote them."""
from __future__ import annotations

import os

import pytest

from tcpipstat import bpftrace
from tcpipstat.bt_points import LISTINGS, Choice, KernelPoints, choose, parse_listing
from tcpipstat.plan import build_plan

from .conftest import FIXTURES

BT = FIXTURES / "bpftrace"
PATHS_HERE = {"sendpage": "kretfunc:tcp_sendpage", "splice_read": "kretfunc:tcp_splice_read",
              "zc_recv": "kretfunc:tcp_zerocopy_receive"}


def _points(name: str) -> KernelPoints:
    return KernelPoints(parse_listing((BT / f"listing-{name}.txt").read_text()))


@pytest.mark.parametrize("kernel, want", [
    # 6.1: no sock_*_length tracepoints (Linux 6.3), fexit on tcp_sendmsg/tcp_recvmsg; its
    # tcp_send_reset misses resets without a full socket: the kfuncs; every kfunc there
    # tcp_sendpage() (sendfile, splice into a socket), tcp_splice_read(), TCP_ZEROCOPY_RECEIVE
    ("bookworm", Choice("kretfunc:tcp_sendmsg", "kretfunc:tcp_recvmsg", False, True,
                        rsts="kfunc", insegs=True, dack=True, listen=True, **PATHS_HERE)),
    # 6.12: tcp_v4/v6_syn_recv_sock are not in its BTF (no fexit): no ListenDrops; no
    # tcp_sendpage() (its struct proto has no sendpage: nothing missed)
    ("trixie", Choice("tracepoint:sock:sock_send_length", "tracepoint:sock:sock_recv_length",
                      False, True, rsts="tracepoint", insegs=True, dack=True, listen=False,
                      **{**PATHS_HERE, "sendpage": ""})),
    # this host: no trampolines, no kfunc at all; OutRsts by the tracepoint only; splice()
    # out of a socket and TCP_ZEROCOPY_RECEIVE not seen (said); no tcp_sendpage() here
    ("native-6.18", Choice("tracepoint:sock:sock_send_length",
                           "tracepoint:sock:sock_recv_length", True, True, rsts="tracepoint",
                           unseen=("splice_read", "zc_recv"))),
])
def test_choice_per_kernel(kernel, want):
    assert choose(_points(kernel)) == want


@pytest.mark.parametrize("kernel, sees", [("bookworm", False), ("trixie", True),
                                           ("native-6.18", True)])
def test_ktls_paths_missed_are_said_where_tls_is_loaded(kernel, sees, tmp_path):
    """Where the sock_*_length tracepoints count, kTLS sends and receives are seen; where
    fexit on tcp_sendmsg()/tcp_recvmsg() counts, they are not; splice() out of a kTLS
    socket nowhere. Said only where the tls module is loaded (no kTLS socket without it)."""
    choice = choose(_points(kernel))
    available = ("SendBytes", "SendMsgs", "RecvBytes", "RecvMsgs")
    assert bpftrace.ktls_notes(choice, available, tmp_path) == []
    (tmp_path / "tls").mkdir()
    notes = bpftrace.ktls_notes(choice, available, tmp_path)
    assert len(notes) == 2 - sees
    assert ("SendBytes and SendMsgs miss kTLS sockets' sends" in notes[0]) == (not sees)
    assert "RecvBytes and RecvMsgs miss " in notes[-1] and "tls_sw_splice_read()" in notes[-1]
    assert ("kTLS sockets' receives (tls_sw_recvmsg()) and splice()" in notes[-1]) == (not sees)
    assert bpftrace.ktls_notes(choice, ("SendBytes", "SendMsgs"), tmp_path) == notes[:1 - sees]


@pytest.mark.parametrize("kernel, tls", [
    # 6.1: fexit on the tls module's functions, as on tcp_sendmsg() and tcp_sendpage()
    ("bookworm", ("tls:tls_sw_sendmsg", "tls:tls_sw_sendpage", "tls:tls_sw_recvmsg",
                  "tls:tls_sw_splice_read")),
    # 6.12: the tracepoints see kTLS sends and receives; no tls_sw_sendpage() (Linux 6.5)
    ("trixie", ("tls:tls_sw_splice_read",))])
def test_ktls_at_the_tls_modules_functions_where_it_is_listed(kernel, tls, tmp_path):
    """The lab guests' listings with the tls module loaded (bpftrace 0.17 names its
    functions kfunc:tls:NAME, 0.23 fentry:tls:NAME); without it, no tls path."""
    listing = "".join((BT / f"listing-{k}.txt").read_text() for k in (kernel, f"{kernel}-tls"))
    choice = choose(KernelPoints(parse_listing(listing)))
    assert choice.tls == tls and choose(_points(kernel)).tls == ()
    (tmp_path / "tls").mkdir()
    assert bpftrace.ktls_notes(choice, bpftrace.BPF_COUNTERS, tmp_path) == []
    program = bpftrace.render_program(build_plan(["--backend", "bpftrace"]), choice)
    assert [f"kretfunc:{f} " in program for f in tls] == [True] * len(tls)
    assert program.count("kretfunc:tls:") == len(tls)


@pytest.mark.parametrize("kernel, missing", [
    ("bookworm", set()), ("trixie", {"ListenOverflows", "ListenDrops"}),
    ("native-6.18", {"InSegs", "DelayedACKs", "ListenOverflows", "ListenDrops"})])
def test_counters_per_kernel(kernel, missing):
    """The TCP counters each kernel gives (--check's "counters here" and the report's n/a
    list come from these); OutSegs has no point anywhere (tcp_v4_send_ack() and
    tcp_v6_send_response(), where control segments are counted, are inlined: no kfunc)."""
    available, unavailable = bpftrace.counters(("tcp", "ext"), choose(_points(kernel)).missing)
    tcp = {"InSegs", "OutSegs", "OutRsts", "DelayedACKs", "ListenOverflows", "ListenDrops"}
    assert set(unavailable) & tcp == missing | {"OutSegs"}
    assert set(available) & tcp == tcp - missing - {"OutSegs"}


def test_listing_fields_and_kfunc_spellings():
    """bpftrace 0.17 lists kfunc:vmlinux:NAME, 0.23 fentry:vmlinux:NAME: both are kfunc:NAME."""
    old, new = _points("bookworm"), _points("trixie")
    for p in (old, new):
        assert p.has_field("kfunc:tcp_sendmsg", "retval") and p.has_field("kfunc:tcp_sendmsg", "sk")
        assert p.has_field("tracepoint:sock:inet_sock_set_state", "newstate")
        assert p.has_field("tracepoint:tcp:tcp_probe", "saddr")      # (saddr[28]: the name)
    assert not old.has("tracepoint:sock:sock_send_length")
    assert not _points("native-6.18").has("kfunc:tcp_sendmsg")     # (no trampolines here)


def test_paths_a_kernel_does_not_let_bpf_see_are_said():
    """A counter that misses a path on this kernel is said to, in --check and in the
    report's notes (never a silent 0); one that misses nothing, or is n/a, is not."""
    assert bpftrace.missed_notes(choose(_points("native-6.18")), bpftrace.BPF_COUNTERS) == [
        "RecvBytes and RecvMsgs miss splice() out of a socket (tcp_splice_read()) and "
        "getsockopt(TCP_ZEROCOPY_RECEIVE) (tcp_zerocopy_receive()) on this kernel: BPF "
        "cannot attach to those functions here"]
    for kernel in ("bookworm", "trixie"):
        assert bpftrace.missed_notes(choose(_points(kernel)), bpftrace.BPF_COUNTERS) == []
    assert bpftrace.missed_notes(choose(_points("native-6.18")), ("SendBytes",)) == []
    # 6.1 where BPF cannot attach to functions (tracefs locked): its BTF still tells that
    # sendfile() and splice() go to tcp_sendpage()
    locked = KernelPoints({k: v for k, v in _points("bookworm").fields.items()
                           if not k.startswith("kfunc:")})
    assert locked.has_field("struct:proto", "sendpage")
    choice = choose(locked)
    assert not choice.send and choice.missed() == []      # (n/a: nothing partial)
    sendmsg = KernelPoints({**locked.fields, "kfunc:tcp_sendmsg": frozenset({"sk"})})
    assert bpftrace.missed_notes(choose(sendmsg), ("SendBytes", "SendMsgs")) == [
        "SendBytes and SendMsgs miss sendfile(), splice() and vmsplice() into a socket "
        "(tcp_sendpage(), before Linux 6.5) on this kernel: BPF cannot attach to that "
        "function here"]


def test_struct_members_are_listed():
    """``bpftrace -lv 'struct NAME'``: members, function pointers by their name."""
    fields = parse_listing("struct proto {\n\tint (*sendmsg)(struct sock *, size_t);\n"
                           "\tunion {\n\t\tstruct a *b;\n\t} h;\n\t__u32 x[4];\n};\n"
                           "kfunc:vmlinux:tcp_sendpage\n    int flags\n")
    assert fields == {"struct:proto": {"sendmsg", "b", "h", "x"},
                      "kfunc:tcp_sendpage": {"flags"}}


def test_a_kernel_without_a_point_makes_its_counters_unavailable():
    none = choose(KernelPoints({}))
    available, unavailable = bpftrace.counters(("socket", "tcp"), none.missing)
    assert {"SendBytes", "SendMsgs", "RecvBytes", "RecvMsgs"} <= set(unavailable)
    assert "ActiveOpens" in available and not set(available) & set(unavailable)


def test_program_per_kernel_uses_its_points():
    plan = build_plan(["--backend", "bpftrace"])
    old = bpftrace.render_program(plan, choose(_points("bookworm")))
    mid = bpftrace.render_program(plan, choose(_points("trixie")))
    new = bpftrace.render_program(plan, choose(_points("native-6.18")))
    assert "kretfunc:tcp_sendmsg" in old and "sock_send_length" not in old
    assert "tracepoint:tcp:tcp_retransmit_skb {" in old
    assert "tracepoint:sock:sock_send_length" in new and "kretfunc" not in new
    assert "tracepoint:tcp:tcp_retransmit_skb /args->err == 0/" in new
    for text in (old, mid, new):
        assert "tracepoint:tcp:tcp_destroy_sock" in text
    # OutRsts: the kfuncs on 6.1, the tracepoint where it sees every reset
    for f in ("kfunc:tcp_v4_send_reset {", "kfunc:tcp_v6_send_reset {",
              "kfunc:tcp_send_active_reset {"):
        assert f in old and f not in mid and f not in new
    assert "tcp_send_reset {" in mid and "tcp_send_reset {" in new
    assert "tracepoint:tcp:tcp_send_reset" not in old
    for f in ("kfunc:tcp_v4_rcv {", "kfunc:tcp_v6_rcv {", "kfunc:tcp_send_ack /@dack[cpu]/ {"):
        assert f in old and f in mid and f not in new
    syn = "kretfunc:tcp_v4_syn_recv_sock /retval == 0/ {"
    assert syn in old and syn not in mid
    assert "kfunc" not in new
    # the Socket paths around sock_sendmsg()/sock_recvmsg(): tcp_sendpage() on 6.1 only
    assert "kretfunc:tcp_sendpage /retval > 0/ {" in old and "tcp_sendpage /" not in mid
    for f in ("kretfunc:tcp_splice_read /retval > 0/ {", "kretfunc:tcp_zerocopy_receive {"):
        assert f in old and f in mid and f not in new


def test_counts_by_tuple_are_printed_and_cleared():
    """The tuple maps of what the kernel gives are printed at the end (and at each
    --interval snapshot) and cleared: none of a counter this kernel does not give."""
    plan = build_plan(["--backend", "bpftrace", "--interval", "1"])
    mid = bpftrace.render_program(plan, choose(_points("trixie")))
    end = mid[mid.index("\nEND {"):]
    snap = mid[mid.index("interval:ms:$"):mid.index("\nEND {")]
    for m in ("t_InSegs", "t_OutRsts"):
        assert f"print(@{m});" in end and f"print(@{m});" in snap and f"clear(@{m});" in end
    assert "t_ListenDrops" not in mid and "clear(@dack);" in end


def test_onclose_leaves_the_counts_by_tuple_out():
    """onclose=1 rows hold a socket's whole life; counts by tuple come at the end only."""
    plan = build_plan(["--backend", "bpftrace", "onclose=1"])
    choice = choose(_points("bookworm"))
    available, unavailable = bpftrace.counters(plan.groups, bpftrace.missing_here(plan, choice))
    assert set(bpftrace.TUPLE_COUNTERS) <= set(unavailable)
    assert "DelayedACKs" in available
    text = bpftrace.render_program(plan, choice)
    assert "@t_" not in text and "kfunc:tcp_v4_rcv" not in text


def test_filters_reach_the_tuple_counts_as_numbers():
    """The filters' verdict on a segment's tuple uses the positional parameters, like the
    sockets'; nothing typed is in the text."""
    a = build_plan(["--backend", "bpftrace", "10.1.2.0/24:8000..8080-*:*"])
    b = build_plan(["--backend", "bpftrace", "[2001:db8::/32]:*-*:4433"])
    choice = choose(_points("bookworm"))
    text = bpftrace.render_program(a, choice)
    assert text == bpftrace.render_program(b, choice)
    for word in ("8000", "8080", "10.1.2", "2001", "4433"):
        assert word not in text
    insegs = text[text.index("kfunc:tcp_v4_rcv {"):text.index("kfunc:tcp_v6_rcv {")]
    assert "$lp >= $12 && $lp <= $13" in insegs


def test_end_dump_writes_the_tuple_records():
    """A tuple's counts become a record of their own, no process; with --interval each
    snapshot writes what came since the last one."""
    available = ("SendBytes", "InSegs", "OutRsts")
    ledger = bpftrace.Ledger()
    lines = ("@t_InSegs[2, 0, 2130706433, 5201, 0, 2130706433, 40000]: 7",
             "@t_OutRsts[2, 0, 2130706433, 5201, 0, 2130706433, 40000]: 1",
             "@t_InSegs[10, 0, 1, 443, -2306405959167115264, 5, 9]: 2")
    recs = []
    for n, more in ((0, 0), (3, 0)):
        dump = bpftrace.EndDump(available)
        for line in lines:
            name, _, value = line.rpartition(": ")
            dump.add(f"{name}: {int(value) + (n if 'OutRsts' not in name else more)}\n")
        recs.append(dump.records("interval", ledger))
    f = recs[0][0].rstrip("\n").split("\t")
    assert f[:9] == ["R", "interval", "2", "0", "7f000001", "5201", "0", "7f000001", "40000"]
    assert f[-3:] == ["SendBytes=0", "InSegs=7", "OutRsts=1"] and f[9:11] == ["0", ""]
    v6 = recs[0][1].split("\t")        # (bpftrace prints a key's 64 bits signed)
    assert v6[2:9] == ["10", "0", "1", "443", "dffe000000000000", "5", "9"]
    assert [r.rstrip("\n").split("\t")[-2:] for r in recs[1]] == [
        ["InSegs=3", "OutRsts=0"], ["InSegs=3", "OutRsts=0"]]


def test_runtime_warnings_are_not_records():
    """bpftrace 0.23 warns on stdout, in four lines, of each delete() of a missing key."""
    r = bpftrace.Runner(["true"], ("SendBytes",), 10, print)
    lines = (BT / "runtime-warning-0.23.out").read_text().splitlines(keepends=True)
    assert list(r._records(iter(lines))) == ["H\tok\n", "@a[1]: 1\n"]
    assert r.outcome.warnings == []
    other = [x.replace("Can't delete map element because it does not exist.", "map full")
             for x in lines]
    r = bpftrace.Runner(["true"], ("SendBytes",), 10, print)
    assert list(r._records(iter(other))) == ["H\tok\n", "@a[1]: 1\n"]
    assert r.outcome.warnings == ["map full"]


def test_check_says_where_this_kernel_counts(tmp_path, monkeypatch):
    """--check asks bpftrace (here a stand-in answering with the 6.1 guest's real listing)
    and names the points it would use."""
    fake = tmp_path / "bpftrace"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = -lv ] && cat '{BT / 'listing-bookworm.txt'}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TCPIPSTAT_BPFTRACE", str(fake))
    monkeypatch.setattr(bpftrace.os, "geteuid", lambda: 0)
    findings, available, _ = bpftrace.BpftraceBackend.checks(
        bpftrace.os.uname().release, True, ("socket", "tcp"), None)
    (points,) = [f for f in findings if f.name == "probe points"]
    assert "sends at kretfunc:tcp_sendmsg" in points.detail
    assert "receives at kretfunc:tcp_recvmsg" in points.detail
    assert "InSegs at kfuncs, OutRsts at kfuncs, DelayedACKs at kfuncs" in points.detail
    assert ("kretfunc:tcp_sendpage, kretfunc:tcp_splice_read, kretfunc:tcp_zerocopy_receive;"
            in points.detail and " miss " not in points.detail)
    assert "SendBytes" in available and "InSegs" in available and "OutRsts" in available


def _stand_in(tmp_path, listing: str, dry_run_rc: int):
    """A bpftrace that lists ``listing`` for each -lv, answers the cgroup dry run with
    ``dry_run_rc`` and notes each call in its log."""
    (tmp_path / "listing.txt").write_text((BT / f"listing-{listing}.txt").read_text())
    log = tmp_path / "calls"
    script = tmp_path / "bpftrace"
    script.write_text(f'#!/bin/sh\necho "$1" >> {log}\ncase "$1" in\n'
                      f'  -lv) cat {tmp_path / "listing.txt"};;\n'
                      f'  -d|--dry-run) exit {dry_run_rc};;\nesac\n')
    script.chmod(0o755)
    return [str(script)], log


def test_kernel_facts_are_asked_once_a_boot(tmp_path, monkeypatch):
    cmd, log = _stand_in(tmp_path, "native-6.18", 0)
    kept = tmp_path / "run" / "facts.json"
    first = bpftrace.kernel_facts(cmd, kept)
    asked = log.read_text().split()
    assert sorted(asked) == ["--dry-run", *["-lv"] * len(LISTINGS)]
    assert bpftrace.kernel_facts(cmd, kept) == first        # (read back: nothing asked)
    assert log.read_text().split() == asked
    assert choose(first[0]) == choose(_points("native-6.18")) and first[1] is True
    kept.write_text("{")        # (a file cut short: asked again, and kept whole again)
    assert bpftrace.kernel_facts(cmd, kept) == first
    twice = 2 * len(asked)
    assert len(log.read_text().split()) == twice and bpftrace.kernel_facts(cmd, kept) == first
    assert len(log.read_text().split()) == twice
    # another bpftrace version, or another tcpipstat asking more: another place
    assert bpftrace.facts_path(cmd, "v0.17.0") != bpftrace.facts_path(cmd, "v0.17.1")
    before = bpftrace.facts_path(cmd, "v0.17.0")
    monkeypatch.setattr(bpftrace, "LISTINGS", (*LISTINGS, "struct sock"))
    assert bpftrace.facts_path(cmd, "v0.17.0") != before


def test_kernel_facts_a_no_to_the_cgroup_is_asked_again(tmp_path):
    cmd, log = _stand_in(tmp_path, "native-6.18", 1)
    kept = tmp_path / "facts.json"
    assert bpftrace.kernel_facts(cmd, kept)[1] is False
    bpftrace.kernel_facts(cmd, kept)
    # the points are kept (listed once), the no is not (the dry run asked by both runs)
    asked = log.read_text().split()
    assert asked.count("-lv") == len(LISTINGS) and asked.count("--dry-run") == 2


def test_kernel_facts_the_cgroup_is_asked_only_when_wanted(tmp_path):
    cmd, log = _stand_in(tmp_path, "native-6.18", 0)
    kept = tmp_path / "facts.json"
    assert bpftrace.kernel_facts(cmd, kept, cgroup_wanted=False)[1] is False
    assert sorted(log.read_text().split()) == ["-lv"] * len(LISTINGS)
    assert bpftrace.kernel_facts(cmd, kept, cgroup_wanted=False)[1] is False   # (kept)
    # a run that reads places asks the dry run alone, then keeps its yes
    assert bpftrace.kernel_facts(cmd, kept)[1] is True
    assert bpftrace.kernel_facts(cmd, kept, cgroup_wanted=False)[1] is True
    assert bpftrace.kernel_facts(cmd, kept)[1] is True
    assert sorted(log.read_text().split()) == ["--dry-run", *["-lv"] * len(LISTINGS)]


@pytest.mark.parametrize("words, place", [
    ([], False), (["index=lport"], False), (["index=cgroup"], True), (["index=container"], True),
    (["index=netns"], True), (["--save-records", "run.records"], True)])
def test_place_is_read_only_where_the_run_asks(words, place):
    """A socket's cgroup and namespace are read only where the run asks for them: their
    struct cgroup and struct net cost bpftrace's compile ~0.3 s of the start-up."""
    plan = build_plan(["--backend", "bpftrace", *words])
    assert plan.places_kept is place
    program = bpftrace.render_program(plan, None, None, place, place)
    assert ("sk_cgrp_data" in program, "skc_net" in program) == (place, place)
    assert ("@ns[$k] = (uint64)0;" in program) is not place


# bpftrace 0.17's --info on this suite's native host (Linux 6.18), and the lab's stand-in's
INFO_NATIVE = (BT / "info-0.17.0.txt").read_text()
INFO_LAB = "System\n  OS: Linux 6.1.0-50-cloud-amd64 (the lab guest)\n"


@pytest.mark.parametrize("says, kernel", [
    (INFO_NATIVE, "6.18.44-fc-v973"), (INFO_LAB, "6.1.0-50-cloud-amd64"),
    ("bpftrace: unrecognized option '--info'\n", ""),         # (says nothing: no kernel)
    ("  OS: Linux 6.1; tree=1\n", "6.1")])     # (a release only: no field of a saved header)
def test_a_stand_ins_kernel_is_the_one_its_info_names(tmp_path, says, kernel):
    (tmp_path / "says").write_text(says)
    fake = tmp_path / "bpftrace"
    fake.write_text(f'cat "{tmp_path / "says"}" >&2\n')        # (0.17 writes it to stderr)
    assert bpftrace.kernel_of(["/bin/sh", str(fake)]) == kernel
    assert bpftrace.kernel_of([str(tmp_path / "missing")]) == ""


def test_prepare_names_the_kernel_the_program_runs_on(tmp_path, monkeypatch):
    """A replaced bpftrace (the lab's) runs the program on another kernel: prepare() names
    that one (--save-records's header says it), this host's only for this host's bpftrace."""
    (tmp_path / "info").write_text(INFO_LAB)
    stand_in = tmp_path / "bpftrace"
    stand_in.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path / "calls"}\n'
                        f'if [ "$1" = --info ]; then cat {tmp_path / "info"}; fi\n')
    stand_in.chmod(0o755)
    monkeypatch.setattr(bpftrace.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bpftrace, "ensure_tracefs", lambda: None)
    monkeypatch.setattr(bpftrace, "bpftrace_version", lambda cmd: ("0.17.0", ""))
    monkeypatch.setattr(bpftrace, "kernel_facts", lambda cmd, path, wanted: (
        _points("bookworm"), True))
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")   # (this host's, too)
    kernels = []
    for replaced in (str(stand_in), ""):
        monkeypatch.setenv("TCPIPSTAT_BPFTRACE", replaced)
        be = bpftrace.BpftraceBackend(build_plan(["--backend", "bpftrace"]), print)
        try:
            kernels.append(be.prepare(lambda msg: None).kernel)
        finally:
            be._tmp.cleanup()
    assert kernels == ["6.1.0-50-cloud-amd64", bpftrace.os.uname().release]
    assert (tmp_path / "calls").read_text() == "--info\n"     # (this host's: not asked)
