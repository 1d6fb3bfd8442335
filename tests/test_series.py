"""Sampled series (--sample, --series, --plot) on a run recorded in the lab: iperf3
under netem loss, one sample per connection every 50 ms (tests/fixtures/refresh.sh)."""
import csv
import json

import pytest

from tcpipstat.errors import RecordParseError
from tcpipstat.model import Collection
from tcpipstat.plan import build_plan
from tcpipstat.records import Parser
from tcpipstat.render import module_args
from tcpipstat.series import FIELD_NAMES, sparkline

from .conftest import FIXTURES, data_connection, run_cli

RUN = FIXTURES / "bookworm-sample50.records"


def load() -> Collection:
    return Collection().extend(Parser(RUN.name).parse(RUN.read_text().splitlines()))


def test_samples_parse_in_order_with_an_end_each():
    c = load()
    assert len(c.series) >= 2
    for t, ss in c.series.items():
        acks = [s for s in ss if s.kind == "ack"]
        assert all(b.t_us - a.t_us >= 50_000 for a, b in zip(acks, acks[1:]))   # the period
        assert all(s.kind == "ack" for s in ss[:-1])
    sender = max(c.series.values(), key=lambda ss: max(s.get("total_retrans") for s in ss))
    assert max(s.get("total_retrans") for s in sender) > 0           # netem's loss
    assert len({s.get("cwnd") for s in sender}) > 1                   # cwnd moved


def test_series_files_hold_every_sample(tmp_path):
    c = load()
    n = sum(len(ss) for ss in c.series.values())
    status, out, err = run_cli("--from-records", str(RUN), "--series", str(tmp_path / "s.csv"))
    said = " ".join((out + err).split())     # (the footer is wrapped to the terminal width)
    assert status == 0 and f"{n:,} samples of {len(c.series)} connections written" in said
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == n and list(rows[0])[7:] == list(FIELD_NAMES)
    status, _, _ = run_cli("--from-records", str(RUN), "--series", str(tmp_path / "s.ndjson"))
    objs = [json.loads(line) for line in (tmp_path / "s.ndjson").read_text().splitlines()]
    assert len(objs) == n and [o["cwnd"] for o in objs] == [int(r["cwnd"]) for r in rows]
    assert all(o["ssthresh"] is None for o, r in zip(objs, rows) if r["ssthresh"] == "")


def test_report_shows_sparklines_and_json_a_summary():
    status, out, _ = run_cli("--from-records", str(RUN))
    assert status == 0 and " cwnd " in out and " srtt " in out and " samples" in out
    assert any(ch in out for ch in "▁▂▃▄▅▆▇█")
    status, out, _ = run_cli("--from-records", str(RUN), "--json")
    c = load()
    for o in map(json.loads, out.splitlines()):
        ss = [s for t, v in c.series.items() if (t.lport, t.rport) == (o["lport"], o["rport"])
              for s in v]
        acks = [s for s in ss if s.kind == "ack"]
        if acks:
            assert o["series"]["samples"] == len(acks)
            assert o["series"]["cwnd"]["max"] == max(s.get("cwnd") for s in acks)
            assert o["series"]["srtt_ms"]["last"] == acks[-1].get("srtt_us") / 1000


def test_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib",
                        reason="--plot needs matplotlib (pip install 'tcpipstat[plot]')")
    png = tmp_path / "cwnd.png"
    status, _, err = run_cli("--from-records", str(RUN), "--plot", str(png))
    assert status == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000


def test_sparkline():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5]) == "▁▁▁"
    assert len(sparkline(list(range(1000)), width=24)) == 24
    assert sparkline([]) == ""


@pytest.mark.parametrize("argv,msg", [
    (["--sample", "x"], "bad --sample 'x'"), (["--sample", "-1"], "bad --sample '-1'"),
    (["--sample", "nan"], "bad --sample 'nan'"), (["--plot", "a.svg"], "bad --plot 'a.svg'"),
    (["--series", " "], "empty --series"),
])
def test_bad_sampling_options_are_named(argv, msg):
    status, _, err = run_cli(*argv)
    assert status == 2 and msg in err


def test_sampling_mode_travels_as_module_parameters():
    plan = build_plan(["--sample", "20", "--on-cwnd-change"])
    args = module_args([], None, sample_ms=plan.sample_ms, on_cwnd_change=plan.on_cwnd_change)
    assert args[1:] == ["tis_sample_us=20000", "tis_sample_cwnd=1"]
    assert build_plan(["--plot", "x.png"]).sample_ms == 100   # --plot implies the default period


def test_bad_sample_records_are_named():
    lines = RUN.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("S\t"))
    lines[i] = lines[i].replace("\tack\t", "\tsyn\t", 1)
    with pytest.raises(RecordParseError) as e:
        list(Parser("run.records").parse(lines))
    assert "malformed sample record" in str(e.value)


def test_the_bulk_sender_is_the_connection_that_moved_data():
    """A lab CI run's --series (fixtures/trixie-sample50-starved.ndjson, netem loss from the
    start: the data connection lost its SYN and then timed out): iperf3's data connection
    advanced 127653 bytes in 3 samples, its control connection 492 in 6. The sampling test
    took the connection with most samples for the sender, and failed on the control one."""
    path = FIXTURES / "trixie-sample50-starved.ndjson"
    by_conn = {}
    for line in path.read_text().splitlines():
        x = json.loads(line)
        by_conn.setdefault((x["lport"], x["rport"]), []).append(x)
    assert data_connection(by_conn, 5201) == (35550, 5201)
    assert max(by_conn, key=lambda k: len(by_conn[k])) == (35546, 5201)
    # snd_una wraps at 2**32: a connection that crossed it still counts what it sent
    wrapped = {(1, 5201): [{"snd_una": (1 << 32) - 10}, {"snd_una": 90}],
               (2, 5201): [{"snd_una": 0}, {"snd_una": 50}],
               (5201, 2): [{"snd_una": 0}, {"snd_una": 5000}]}
    assert data_connection(wrapped, 5201) == (1, 5201)
