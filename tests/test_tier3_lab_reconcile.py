"""Tier 3: the host reconciliation of a run in the lab's guest (tcpipstat/reconcile.py),
with both collectors on both kernels.

tcpipstat runs here and the collector in the guest, so the counters it reconciles with must
be the guest's, which the stand-in (lab.sh) reports, never this machine's (busy with other
suites: hundreds of opens a second). The guest runs nothing but the workload (tcpwork:
5 connections), so its counters and the rows agree exactly, but for what the collector
reports it skipped.
"""
import json

import pytest

from . import lab_workloads as W
from .conftest import json_rows, run_cli
from .test_tier3_lab import clean_run

pytestmark = pytest.mark.lab

CONNS = sum(n for n, _, _ in W.TCPWORK_V4_PORTS.values())
SEGMENTS = {"InSegs": "Tcp.InSegs", "OutSegs": "Tcp.OutSegs"}
# the segment counters each collector gives on both kernels (bpftrace: InSegs by fexit on
# tcp_v4_rcv/tcp_v6_rcv; OutSegs has no point it can use): only those are reconciled
SEGMENTS_BY = {"stap": {"InSegs", "OutSegs"}, "bpftrace": {"InSegs"}}


def _reconciliation(stdout: str) -> dict:
    return json.loads(stdout.splitlines()[-1])["reconciliation"]


@pytest.mark.parametrize("backend", ("stap", "bpftrace"))
def test_the_guests_counters_are_reconciled(suite, backend, tmp_path):
    rec = tmp_path / "records"
    r = clean_run(suite, tmp_path, "--backend", backend, "--json", "*:*-*:*",
                  "--all-processes", "-c", W.TCPWORK_V4, "--save-records", str(rec))
    assert r.rc == 0, r.stderr
    got, guest, why = _reconciliation(r.stdout), r.snmp_delta(), r.explain()
    c, slack = got["counters"], r.skipped() + r.faults()
    assert got["source"] == "collector" and got["skipped_probe_hits"] == r.skipped(), why
    assert set(c) & set(SEGMENTS) == SEGMENTS_BY[backend], (got, why)
    # the guest's own deltas (lab.sh's --meta), not this machine's
    assert c["ActiveOpens"]["host"] == guest["Tcp.ActiveOpens"] == CONNS, (got, why)
    assert c["ActiveOpens"]["not_attributed"] == 0 or slack, (got, why)
    assert c["PassiveOpens"]["host"] == guest["Tcp.PassiveOpens"], (got, why)
    assert c["PassiveOpens"]["not_attributed"] == 0 or slack, (got, why)
    for ours in SEGMENTS_BY[backend]:
        assert c[ours]["host"] == guest[SEGMENTS[ours]], (ours, got, why)
        assert 0 <= c[ours]["not_attributed"] <= slack, (ours, got, why)
    rows = json_rows(r.stdout)
    assert c["InSegs"]["attributed"] == sum(o["counters"]["InSegs"] for o in rows), why
    # the snapshots travel with the records: the replay reconciles alike
    status, out, err = run_cli("--from-records", str(rec), "--json")
    assert status == 0 and _reconciliation(out) == {**got, "skipped_probe_hits": 0}, err
