"""Test tiers (like SystemTap's own tcpipstat.meta):

1. unit tests: no kernel, no stap (everything not marked).
2. ``@pytest.mark.stap``: every script tcpipstat can render passes ``stap -p2``/``-p4``
   against the lab kernels' real debuginfo.
3. ``@pytest.mark.lab``: real runs in the QEMU guest, checked against the guest's
   /proc/net/snmp and against what the workload did.

Tiers 2 and 3 need the kernel lab (``lab/setup``, root, Debian's archive) and
``TCPIPSTAT_LAB=1``. Without that variable they skip and say so; with it, a lab
that is not set up is an error, not a skip, so CI cannot pass by skipping.
"""
from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from tcpipstat.app import run

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "lab"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SUITES = ("bookworm", "trixie")


def run_cli(*argv: str) -> tuple[int, str, str]:
    """tcpipstat in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = run(list(argv), out, err)
    return int(status), out.getvalue(), err.getvalue()


def json_rows(text: str) -> list[dict]:
    """A --json report's row objects: its lines less the host reconciliation's last object
    (tcpipstat/reconcile.py), which live runs and their saved records carry."""
    import json
    objs = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    return [o for o in objs if "reconciliation" not in o]


def data_connection(by_conn: dict[tuple[int, int], list[dict]], port: int) -> tuple[int, int]:
    """The (lport, rport) key of BY_CONN (a series' samples by connection) of the bulk sender
    to PORT: of the connections to it, the one whose snd_una advanced most (mod 2**32). Not
    the one with most samples: when the transfer starves, iperf3's control connection can
    have more (fixtures/trixie-sample50-starved.ndjson)."""
    def sent(key: tuple[int, int]) -> int:
        return (by_conn[key][-1]["snd_una"] - by_conn[key][0]["snd_una"]) % (1 << 32)
    return max((k for k in by_conn if k[1] == port), key=sent)


def lab_kver(suite: str) -> str:
    """The lab kernel of ``suite``; skips (no TCPIPSTAT_LAB) or fails (lab missing)."""
    if os.environ.get("TCPIPSTAT_LAB") != "1":
        pytest.skip("kernel lab tests: run `sudo lab/setup` once, then set TCPIPSTAT_LAB=1 "
                    "(.ci/run does both)")
    res = subprocess.run([str(LAB / "lab.sh"), "kver"], capture_output=True, text=True,
                         env={**os.environ, "LAB_SUITE": suite})
    if res.returncode != 0 or not res.stdout.strip():
        pytest.fail(f"TCPIPSTAT_LAB=1 but the {suite} lab is not set up: "
                    f"run `sudo lab/setup {suite}`")
    return res.stdout.strip()


@pytest.fixture(params=SUITES)
def suite(request) -> str:
    return request.param
