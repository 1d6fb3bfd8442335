"""Tier "capture": record real loopback traffic now (tests/capture_workload.py, full scale:
2 MB uploads with losses, requests and responses over IPv4 and IPv6, a zero window,
resets) with tcpdump in a private network namespace, and check tcpipstat --read against
the workload and against tcptrace run on the same files.

Needs root (unshare --net), tcpdump, tcptrace and nftables, and TCPIPSTAT_CAPTURE=1
(./run-tests installs them and sets it). Without the variable these tests skip and say
why; with it, a missing tool is a failure, not a skip, so CI cannot pass by skipping.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from .capture_helpers import (check_workload, compare, dupacks_problems, ours, pair,
                              tcptrace_rows, to_pcapng)
from .conftest import ROOT

pytestmark = pytest.mark.capture
TOOLS = ("tcpdump", "tcptrace", "nft", "unshare", "ip")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    if os.environ.get("TCPIPSTAT_CAPTURE") != "1":
        pytest.skip("capture tests record real traffic: as root, `apt-get install tcpdump tcptrace "
                    "nftables`, then set TCPIPSTAT_CAPTURE=1 (./run-tests does both)")
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"TCPIPSTAT_CAPTURE=1 but {', '.join(missing)} missing: "
                    "apt-get install tcpdump tcptrace nftables iproute2 util-linux")
    if os.geteuid() != 0:
        pytest.fail("TCPIPSTAT_CAPTURE=1 but not root: recording needs a private network namespace")
    out = tmp_path_factory.mktemp("capture")
    workload = ROOT / "tests" / "capture_workload.py"
    res = subprocess.run(["unshare", "--net", sys.executable, str(workload), str(out),
                          "--scale", "full"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _tcptrace(path) -> str:
    res = subprocess.run(["tcptrace", "-l", "-r", "-n", "--csv", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("name", ["lo.pcap", "any-sll.pcap"])
def test_agrees_with_tcptrace(recorded, name):
    """Per connection: packets, unique and retransmitted bytes and packets, out-of-order,
    zero windows, resets, RTT samples and min/avg/max, handshake RTT, duration (the
    tolerances are in tests/capture_helpers.py). tcptrace reads Ethernet and Linux
    cooked v1, not v2."""
    rows = ours(recorded / name)
    pairs = pair(rows, tcptrace_rows(_tcptrace(recorded / name)))
    problems = [p for o, t, local in pairs for p in compare(o, t, local)]
    problems += dupacks_problems(rows, recorded / name)
    assert not problems, "\n".join(problems)
    assert len(pairs) == 11
    assert sum(o["counters"]["RetransSegs"] for o, _, _ in pairs) > 0
    assert sum(o["counters"]["OutOfOrder"] for o, _, _ in pairs) > 0
    assert max(o["counters"]["RttMax"] for o, _, _ in pairs) > 10


@pytest.mark.parametrize("name", ["lo.pcap", "any-sll2.pcap", "any-sll.pcap"])
def test_shows_what_the_workload_did(recorded, name):
    check_workload(ours(recorded / name), json.loads((recorded / "manifest.json").read_text()))


def test_pcapng_reads_like_libpcap_reads_it(recorded, tmp_path):
    """Our pcapng (written by tests/capture_helpers.py, read by tcpipstat): libpcap (tcpdump
    -r) and tcptrace read the same number of packets from it, and tcpipstat reports the
    same counts as from the pcap."""
    ng = tmp_path / "lo.pcapng"
    n = to_pcapng(recorded / "lo.pcap", ng)
    res = subprocess.run(["tcpdump", "-r", str(ng), "-n", "-q"], capture_output=True, text=True)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == n
    a = [r["counters"]["OutSegs"] + r["counters"]["InSegs"] for r in ours(ng)]
    b = [r["counters"]["OutSegs"] + r["counters"]["InSegs"] for r in ours(recorded / "lo.pcap")]
    assert a == b and sum(a) == n
    pairs = pair(ours(ng), tcptrace_rows(_tcptrace(ng)))
    assert len(pairs) == 11
