"""Tier 2: every script tcpipstat can render elaborates (stap -p2) on each lab kernel,
the full one and each group alone compile (stap -p4), and the counters the tool
reports as unavailable are exactly the expected ones."""
import itertools
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tcpipstat.stap import prepare
from tcpipstat.counters import GROUPS, all_points, kprobe, select
from tcpipstat.plan import build_plan
from tcpipstat.render import (probe_check_points, render_probe_check, render_script,
                              stap_point, stap_spellings)
from tcpipstat.stap import Toolchain, parse_resolved

from .conftest import LAB, lab_kver, run_cli

pytestmark = pytest.mark.stap

# What does not resolve on each lab kernel (probe points absent or inlined away).
# Both Debian kernels have every point tcpipstat uses today: icmp_send() is an inline
# wrapper since Linux 5.7, which is why IcmpErrors probes __icmp_send().
EXPECTED_UNAVAILABLE = {"bookworm": [], "trixie": []}
# Probe points that do not resolve: trixie's stap 5.1 cannot use Linux 6.12's tracepoints
# (congestion states then come from the kprobe fallback, same counters), and Linux 6.12 has
# no tcp_sendpage() (gone in 6.5: sendfile() and splice() reach tcp_sendmsg() there), nor
# tls_sw_sendpage().
_ABSENT_612 = {'kernel.trace("tcp:tcp_cong_state_set")', 'kernel.function("tcp_sendpage").return',
               'module("tls").function("tls_sw_sendpage").return'}
EXPECTED_ABSENT = {"bookworm": set(), "trixie": _ABSENT_612}
# By their usual names: the tls module's functions need its debug information, which stap 5.1
# does not find by name for the compressed tls.ko.xz (it resolves them from the symbol table
# only: not counted as resolved); they resolve by the debug file's path
# (render.stap_spellings).
EXPECTED_UNRESOLVED = {"bookworm": set(),
                       "trixie": _ABSENT_612 | {
                           'module("tls").function("tls_sw_sendmsg").return',
                           'module("tls").function("tls_sw_recvmsg").return',
                           'module("tls").function("tls_sw_splice_read").return'}}
EXPECTED_CONG = {"bookworm": "tracepoint", "trixie": "kprobes"}


@pytest.fixture
def lab_toolchain(suite, monkeypatch, tmp_path_factory):
    kver = lab_kver(suite)
    monkeypatch.setenv("LAB_SUITE", suite)
    monkeypatch.setenv("TCPIPSTAT_STAP", f"{LAB}/lab.sh stap")
    monkeypatch.setenv("TCPIPSTAT_STAPRUN", f"{LAB}/lab.sh staprun")
    cache = Path(os.environ.get("TCPIPSTAT_TEST_CACHE") or tmp_path_factory.mktemp("cache")) / suite
    monkeypatch.setenv("TCPIPSTAT_CACHE", str(cache))
    return Toolchain.find(), kver


def _stap(tc: Toolchain, args, script: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "t.stp").write_text(script)
        return subprocess.run([*tc.stap, *args, "t.stp"], cwd=d, capture_output=True, text=True)


def test_unavailable_counters_are_exactly_the_expected(lab_toolchain, suite):
    tc, kver = lab_toolchain
    plan = build_plan(["-r", kver])
    _, available, unavailable, cong = prepare(plan, tc, lambda m: None)
    assert unavailable == EXPECTED_UNAVAILABLE[suite]
    assert "InSegs" in available and "SendBytes" in available
    assert cong == ""                                           # not asked for


def test_congestion_states_come_from_the_tracepoint_or_the_fallback(lab_toolchain, suite):
    tc, kver = lab_toolchain
    plan = build_plan(["-r", kver, "--dist"])
    script, available, unavailable, cong = prepare(plan, tc, lambda m: None)
    assert cong.startswith(EXPECTED_CONG[suite]) and not unavailable
    assert {"CaOpenUs", "CaLossUs", "CaChanges"} <= set(available)
    res = _stap(tc, ["-p2", "-r", kver], script)
    assert res.returncode == 0, res.stderr[-2000:]


def test_an_absent_probe_point_is_detected(lab_toolchain, suite):
    tc, kver = lab_toolchain
    points = all_points() + [kprobe("tcpipstat_no_such_function")]
    texts = probe_check_points(points, kver)
    res = _stap(tc, ["-p2", "-r", kver], render_probe_check(texts))
    assert res.returncode == 0, res.stderr
    resolved = parse_resolved(res.stdout, texts)
    assert 'kernel.function("tcpipstat_no_such_function")' not in resolved
    assert {stap_point(p) for p in all_points()} - resolved == EXPECTED_UNRESOLVED[suite]
    # the module's functions resolve by its debug file's path on both kernels
    modular = [p for p in all_points() if p.module]
    by_file = {stap_point(p) for p in modular if stap_spellings(p, kver)[1] in resolved}
    assert by_file == {stap_point(p) for p in modular} - EXPECTED_ABSENT[suite]


def _resolved_units(combo, suite, tracepoints: bool = True):
    """The units tcpipstat would choose on this lab kernel (fallbacks where needed;
    tracepoints=False: as with --kprobes-only), each point spelled as it resolves."""
    kver = lab_kver(suite)
    resolved = {}
    for p in all_points():
        if stap_point(p) not in EXPECTED_ABSENT[suite]:
            by_name = stap_point(p) not in EXPECTED_UNRESOLVED[suite]
            resolved[p] = stap_spellings(p, kver)[0 if by_name else 1]
    return select(combo, tracepoints, resolved=resolved)


def test_every_group_combination_elaborates(lab_toolchain, suite):
    tc, kver = lab_toolchain
    failures = []
    scripts = []
    for r in range(1, len(GROUPS) + 1):
        for combo in itertools.combinations(GROUPS, r):
            scripts.append((combo, render_script(_resolved_units(combo, suite), 8192)))
    # --dist, and the kprobe fallback even where the tracepoint exists
    every = _resolved_units(GROUPS, suite)
    fallback = _resolved_units(("socket", "cong"), suite, tracepoints=False)
    cong = _resolved_units(("cong",), suite)
    scripts.append((("cong", "dist"), render_script(cong, 8192, dist=True)))
    scripts.append((GROUPS + ("dist",), render_script(every, 8192, dist=True)))
    scripts.append((("CongStateK", "dist"), render_script(fallback, 8192, dist=True)))
    # --rfc4898: every tcp_sock field it reads (one -1 where the kernel lacks it)
    tcp = _resolved_units(("tcp",), suite)
    scripts.append((("tcp", "rfc4898"), render_script(tcp, 8192, estats=True)))
    # --sample with everything else that reads struct tcp_sock
    scripts.append((GROUPS + ("dist", "rfc4898", "sample"),
                    render_script(every, 8192, dist=True, estats=True, sample=True)))
    for combo, script in scripts:
        res = _stap(tc, ["-p2", "-r", kver], script)
        if res.returncode != 0:
            failures.append((combo, res.stderr[-2000:]))
    assert not failures


def test_hostile_input_still_parses(lab_toolchain):
    """Whatever the user typed, the script is the same text; pass 1 proves it parses."""
    tc, kver = lab_toolchain
    plan = build_plan(["index=raddr", "timeout=5", "*.*.*.*:80-*:*", "[::1]:1..9-*:*"])
    script = render_script(select(plan.groups), plan.max_sockets)
    res = _stap(tc, ["-p1", "-r", kver], script)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("groups", [GROUPS] + [(g,) for g in GROUPS], ids=lambda g: "+".join(g))
def test_compiles(lab_toolchain, suite, groups):
    tc, kver = lab_toolchain
    script = render_script(_resolved_units(groups, suite), 8192, dist="cong" in groups)
    ko = tc.compile(script, kver,
                    ["-DMAXSKIPPED=1000000000", "-DSTP_NO_OVERLOAD", "-DMAXSTRINGLEN=4096"])
    assert ko.is_file() and ko.stat().st_size > 10000


STAP_VERSION = {"bookworm": "version 4.8", "trixie": "version 5.1"}


def test_check_on_a_lab_kernel(lab_toolchain, suite):
    """--check -r KVER with the lab's stap: its version, and pass 2 on real debuginfo."""
    tc, kver = lab_toolchain
    status, out, err = run_cli("--check", "--json", "-r", kver)
    doc = json.loads(out)
    f = {c["check"]: c for c in doc["checks"]}
    assert STAP_VERSION[suite] in f["stap"]["detail"], f["stap"]
    assert f["probe check"]["ok"] is True and doc["unavailable"] == EXPECTED_UNAVAILABLE[suite]
    assert doc["running"] is False and status == 0, out


def test_the_place_reads_elaborate_on_the_new_layout(lab_toolchain, suite):
    """An attribution index adds the reads of each socket's cgroup and namespace (never in
    the default script); on both lab kernels (Linux 6.1, 6.12) sk_cgrp_data holds the
    cgroup pointer as a field of its own, and the older layouts' branches fold away."""
    tc, kver = lab_toolchain
    plan = build_plan(["-r", kver, "index=cgroup", "--cong", "--dist", "--rfc4898",
                       "--sample", "50"])
    script, _, _, _ = prepare(plan, tc, lambda m: None)
    assert "tis_place(" in script
    default, _, _, _ = prepare(build_plan(["-r", kver]), tc, lambda m: None)
    assert "tis_place(" not in default and "sk_cgrp_data" not in default
    res = _stap(tc, ["-p2", "-r", kver], script)
    assert res.returncode == 0, res.stderr[-2000:]
    # pass 2 lists each function's locals: the pre-5.15 branch's v has folded away
    head = res.stdout.index("tis_sk_cgroup__overload_0:long (sk:long)\n")
    locals_ = res.stdout[head:].split("\n")[1:4]
    assert locals_[:2] == ["  # locals", "  cg:long"] and not locals_[2].startswith("  ")
