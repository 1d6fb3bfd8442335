"""RFC 4898 variables at close (--rfc4898), on runs recorded in the lab
(tests/fixtures/refresh.sh): one connection, 300000 bytes up and 1000 down, under
netem loss, on Linux 6.1 (no tp->total_rto) and 6.12."""
import csv
import io
import json

import pytest

from tcpipstat.errors import RecordParseError
from tcpipstat.estats import EVARS
from tcpipstat.model import Collection
from tcpipstat.records import EstatsRecord, Parser

from .conftest import FIXTURES, run_cli

RUNS = {"bookworm": FIXTURES / "bookworm-rfc4898.records",
        "trixie": FIXTURES / "trixie-rfc4898.records"}


def records(suite):
    return list(Parser(RUNS[suite].name).parse(RUNS[suite].read_text().splitlines()))


@pytest.mark.parametrize("suite", RUNS)
def test_e_records_parse_with_every_variable(suite):
    es = [r for r in records(suite) if isinstance(r, EstatsRecord)]
    assert len(es) == 2 and all(r.tuple.rport for r in es)       # client and server; no listener
    assert all(set(r.values) == {v.name for v in EVARS} for r in es)
    client = next(r for r in es if r.tuple.rport == 7012)
    v = client.values
    assert v["DataOctetsOut"] == 300000 + v["OctetsRetrans"] and v["ThruOctetsAcked"] == 300002
    assert v["Timeouts"] is None if suite == "bookworm" else isinstance(v["Timeouts"], int)


@pytest.mark.parametrize("suite", RUNS)
def test_reports_show_them_in_every_output(suite):
    status, out, _ = run_cli("--from-records", str(RUNS[suite]))
    assert status == 0 and "RFC 4898 at close" in out
    assert "Perf: SegsOut" in out and "DataOctetsOut " in out and "ThruOctetsAcked 300,002" in out
    if suite == "bookworm":
        assert "Timeouts n/a" in out
    status, out, _ = run_cli("--from-records", str(RUNS[suite]), "--json")
    rows = {(r["lport"], r["rport"]): r for r in map(json.loads, out.splitlines())}
    client = next(r for (lp, rp), r in rows.items() if rp == 7012)
    assert client["rfc4898"]["ThruOctetsReceived"] == 1001
    status, out, _ = run_cli("--from-records", str(RUNS[suite]), "--csv")
    table = list(csv.DictReader(io.StringIO(out)))
    row = next(r for r in table if r["rport"] == "7012")
    assert row["rfc4898.ThruOctetsAcked"] == "300002"
    timeouts = "" if suite == "bookworm" else str(client["rfc4898"]["Timeouts"])
    assert row["rfc4898.Timeouts"] == timeouts


def test_rows_of_several_sockets_aggregate_each_variable_its_own_way():
    c = Collection().extend(records("trixie"))
    es = [s.estats for s in c.sockets.values() if s.estats]
    (row,) = [r for r in c.rows("laddr")]
    agg = row.estats
    assert agg["DataOctetsOut"] == sum(e["DataOctetsOut"] for e in es)                # sum
    assert agg["MinRTT"] == min(e["MinRTT"] for e in es)                              # min
    assert agg["MaxRwinRcvd"] == max(e["MaxRwinRcvd"] for e in es)                    # max
    assert agg["SmoothedRTT"] == pytest.approx(sum(e["SmoothedRTT"] for e in es) / 2)  # mean
    status, out, _ = run_cli("--from-records", str(RUNS["trixie"]), "index=laddr")
    assert "RFC 4898 at close (2 sockets: sums, means, min / max)" in out


@pytest.mark.parametrize("bad", ["NoSuchVar=1", "SegsOut", "SegsOut=x"])
def test_bad_e_records_are_named(bad):
    lines = RUNS["bookworm"].read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("E\t"))
    lines[i] += "\t" + bad
    with pytest.raises(RecordParseError) as e:
        list(Parser("run.records").parse(lines))
    assert "run.records" in str(e.value) and f":{i + 1}" in str(e.value)


def test_onclose_reports_carry_the_variables():
    status, out, _ = run_cli("--from-records", str(RUNS["trixie"]), "onclose=1", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and len(rows) == 2
    assert all(r["rfc4898"]["DataOctetsOut"] >= 1000 for r in rows)
    status, out, _ = run_cli("--from-records", str(RUNS["trixie"]), "onclose=1")
    assert out.count("RFC 4898 at close") == 2


def test_the_option_plans_the_records_and_room_for_them():
    from tcpipstat.plan import build_plan
    from tcpipstat.counters import select
    from tcpipstat.render import render_script
    plan = build_plan(["--rfc4898"])
    assert plan.estats and "-DMAXSTRINGLEN=2048" in plan.compile_flags()
    assert "function tis_estats" in render_script(select(("tcp",)), 1024, estats=True)
    assert "tis_estats" not in render_script(select(("tcp",)), 1024)


def test_the_stap_collector_reads_every_variable_and_only_them():
    from tcpipstat.render import STAP_EVARS, STAP_SFIELDS
    from tcpipstat.series import FIELD_NAMES
    assert list(STAP_EVARS) == [v.name for v in EVARS]
    assert list(STAP_SFIELDS) == list(FIELD_NAMES)
