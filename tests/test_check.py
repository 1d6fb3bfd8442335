"""tcpipstat --check: the host diagnosis. On this host for real, on prepared trees
for the situations a test machine cannot be in (lockdown, signing, no kprobes), and
with the scripted stap stand-in for stap's own verdicts."""
import json
import os
import sys
from pathlib import Path

import pytest

from tcpipstat.check import Host, host_checks

from .conftest import ROOT, run_cli

FAKES = ROOT / "tests" / "fakes"
K = "9.9.9-test"


def by_name(findings):
    return {f.name: f for f in findings}


def tree(tmp_path: Path, lockdown="[none] integrity confidentiality", config="y",
         sig_force=False, modules=True, disabled="0", headers=True,
         vmlinux="usr/lib/debug/boot/vmlinux-{k}") -> Path:
    r = tmp_path / "root"
    (r / "proc/sys/kernel").mkdir(parents=True)
    if modules:
        (r / "proc/modules").write_text("ext4 1 0 - Live 0x0\n")
    (r / "proc/sys/kernel/modules_disabled").write_text(disabled + "\n")
    (r / "proc/cmdline").write_text("root=/dev/vda1 ro\n")
    if lockdown is not None:
        (r / "sys/kernel/security").mkdir(parents=True)
        (r / "sys/kernel/security/lockdown").write_text(lockdown + "\n")
    (r / "boot").mkdir()
    kp = ("CONFIG_KPROBES=y\nCONFIG_KRETPROBES=y\n" if config == "y"
          else "# CONFIG_KPROBES is not set\n")
    sig = "CONFIG_MODULE_SIG_FORCE=y\n" if sig_force else ""
    (r / f"boot/config-{K}").write_text("CONFIG_MODULES=y\n" + kp + sig)
    if headers:
        (r / f"lib/modules/{K}/build").mkdir(parents=True)
    if vmlinux:
        p = r / vmlinux.format(k=K)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x7fELF")
    return r


def test_a_ready_host(tmp_path):
    f = by_name(host_checks(K, True, Host(tree(tmp_path)), 0, False))
    assert all(x.ok for x in f.values()), {n: x.detail for n, x in f.items()}
    assert f["debuginfo"].detail == f"/usr/lib/debug/boot/vmlinux-{K}"


@pytest.mark.parametrize("kw, name, words", [
    (dict(lockdown="none [integrity] confidentiality"), "lockdown", "'integrity'"),
    (dict(sig_force=True), "module signing", "signed modules"),
    (dict(modules=False), "modules", "CONFIG_MODULES"),
    (dict(disabled="1"), "modules", "modules_disabled=1"),
    (dict(config="n"), "kprobes", "no kprobes"),
    (dict(headers=False), "headers", "is missing"),
    (dict(vmlinux=None), "debuginfo", "no vmlinux"),
])
def test_each_problem_is_found_with_its_fix(tmp_path, kw, name, words):
    f = by_name(host_checks(K, True, Host(tree(tmp_path, **kw)), 0, False))
    assert f[name].ok is False and words in f[name].detail
    assert f[name].fix_debian and f[name].fix_fedora
    assert [n for n, x in f.items() if x.ok is False] == [name]


def test_not_root_and_another_kernel(tmp_path):
    f = by_name(host_checks(K, False, Host(tree(tmp_path)), 1000, False))
    assert f["root"].ok is False and "sudo" in f["root"].fix_debian
    assert f["modules"].ok is None and "not the running kernel" in f["modules"].detail
    assert "lockdown" not in f            # a property of the running kernel only


def test_this_host_for_real(monkeypatch):
    """Whatever this machine is, --check must agree with its own /proc and exit accordingly."""
    monkeypatch.delenv("TCPIPSTAT_STAP", raising=False)
    monkeypatch.delenv("TCPIPSTAT_STAPRUN", raising=False)
    status, out, err = run_cli("--check", "--json")
    doc = json.loads(out)
    by_backend = {b["backend"]: b for b in doc["backends"]}
    assert list(by_backend) == ["stap", "bpftrace"]
    f = {c["check"]: c for c in by_backend["stap"]["checks"]}
    assert doc["kernel"] == os.uname().release and doc["running"] is True
    if not os.path.exists("/proc/modules"):
        assert f["modules"]["ok"] is False and "CONFIG_MODULES" in f["modules"]["detail"]
    assert f["root"]["ok"] is (os.geteuid() == 0)
    for b in doc["backends"]:
        assert b["ready"] is all(c["ok"] is not False for c in b["checks"])
    assert doc["ready"] is any(b["ready"] for b in doc["backends"])
    assert doc["backend"] == next((b["backend"] for b in doc["backends"] if b["ready"]), None)
    assert status == (0 if doc["ready"] else 1)
    status, out, err = run_cli("--check")
    assert ("collection can work here" if doc["ready"] else "collection cannot work here") in out


def test_stap_verdicts_with_the_stand_in(monkeypatch, tmp_path):
    monkeypatch.setenv("TCPIPSTAT_STAP", f"{sys.executable} {FAKES / 'fake_stap.py'}")
    monkeypatch.setenv("TCPIPSTAT_STAPRUN", f"{sys.executable} {FAKES / 'fake_staprun.py'}")
    monkeypatch.setenv("TCPIPSTAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_STAP_MISSING", "tcp_retransmit_skb")
    status, out, err = run_cli("--check", "--json", "-r", "9.9-fake")
    doc = json.loads(out)
    f = {c["check"]: c for c in doc["checks"]}
    assert "version 9.9/0.0, fake" in f["stap"]["detail"]
    assert f["probe check"]["ok"] is True and doc["unavailable"] == ["RetransSegs"]
    assert "1 not on this kernel: RetransSegs" in f["probe check"]["detail"]
    assert f["modules"]["ok"] is None          # staprun is replaced: not this host's business
    assert status == 0 and doc["ready"] is True
    monkeypatch.setenv("FAKE_STAP_MODE", "no-debuginfo")
    monkeypatch.setenv("TCPIPSTAT_CACHE", str(tmp_path / "cache2"))
    status, out, err = run_cli("--check", "--json", "-r", "9.9-fake")
    f = {c["check"]: c for c in json.loads(out)["checks"]}
    assert status == 1 and f["probe check"]["ok"] is False
    assert "debug information is missing" in f["probe check"]["detail"]
    assert "-dbg" in f["probe check"]["fix"]["debian"]


@pytest.mark.parametrize("argv, token", [
    (["--check", "-c", "true"], "with -c"),
    (["--check", "*:80-*:*"], "with FILTER"),
    (["--check", "--interval", "1"], "with --interval"),
])
def test_check_collects_nothing(argv, token):
    status, out, err = run_cli(*argv)
    assert status == 2 and token in err
