"""Congestion-state times (--cong) and their histograms (--dist), on runs recorded in the
lab under netem loss: bookworm saw the states through the tracepoint, trixie through the
kprobe fallback (tests/fixtures/refresh.sh)."""
import csv
import io
import json
import re

import pytest

from tcpipstat.counters import CA_STATES
from tcpipstat.errors import RecordParseError
from tcpipstat.model import Collection
from tcpipstat.records import Parser, hist_key

from .conftest import FIXTURES, run_cli

RUNS = {"bookworm": FIXTURES / "bookworm-cong-dist.records",
        "trixie": FIXTURES / "trixie-cong-dist.records"}
HOW = {"bookworm": "tracepoint tcp:tcp_cong_state_set", "trixie": "kprobes: tcp_ack"}


def load(path) -> Collection:
    c = Collection().extend(Parser(path.name).parse(path.read_text().splitlines()))
    c.finish()
    return c


@pytest.mark.parametrize("suite", RUNS)
def test_stays_add_up_to_the_time_in_each_state(suite):
    c = load(RUNS[suite])
    sender = max(c.sockets.values(), key=lambda s: s.counters.get("SendBytes", 0))
    assert sender.counters["RetransSegs"] > 0 and sender.counters["CaChanges"] >= 2
    for i, state in enumerate(CA_STATES):
        stays = {hist_key(k)[1]: v for k, v in sender.counters.items()
                 if hist_key(k) and hist_key(k)[0] == i}
        us = sender.counters.get(f"Ca{state}Us", 0)
        # a stay in bucket b lasted 2^b .. 2^(b+1)-1 us: their sum brackets the state's time
        # (bucket 0 holds stays of 0 and 1 us)
        assert sum(((1 << b) if b else 0) * n for b, n in stays.items()) <= us
        assert us <= sum(((1 << (b + 1)) - 1) * n for b, n in stays.items())
    # every change ends one stay and begins the next; the last one is cut by the close
    n_stays = sum(v for k, v in sender.counters.items() if hist_key(k))
    assert n_stays == sender.counters["CaChanges"] + 1


@pytest.mark.parametrize("suite", RUNS)
def test_tables_say_how_states_were_seen_and_show_ms_or_us(suite):
    top = ("--sort", "SendBytes", "--top", "1")
    status, out, err = run_cli("--from-records", str(RUNS[suite]), *top)
    assert status == 0, err
    assert f"congestion states seen through the {HOW[suite]}" in out
    assert "Congestion" in out and re.search(r"CaOpen [0-9,]+\.[0-9]{3} ms", out)
    assert re.search(r"Recovery: how long each stay lasted \(\d+ stays?\)", out)
    status, out_us, _ = run_cli("--from-records", str(RUNS[suite]), "--us", *top)
    c = load(RUNS[suite])
    sender = max(c.sockets.values(), key=lambda s: s.counters.get("SendBytes", 0))
    assert f"CaOpen {sender.counters['CaOpenUs']:,} us" in out_us


@pytest.mark.parametrize("suite", RUNS)
def test_json_and_csv_carry_microseconds(suite):
    c = load(RUNS[suite])
    status, out, _ = run_cli("--from-records", str(RUNS[suite]), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    for row in rows:
        st = next(s for s in c.sockets.values()
                  if (s.tuple.lport, s.tuple.rport) == (row["lport"], row["rport"]))
        assert row["counters"]["CaRecoveryUs"] == st.counters.get("CaRecoveryUs", 0)
        want = {}
        for k, v in st.counters.items():
            hk = hist_key(k)
            if hk and v:
                want.setdefault(CA_STATES[hk[0]], {})[str((1 << hk[1]) if hk[1] else 0)] = v
        assert row.get("dist_us", {}) == want
    status, out, _ = run_cli("--from-records", str(RUNS[suite]), "--csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert sum(int(r["CaChanges"]) for r in table) == sum(r["counters"]["CaChanges"] for r in rows)
    assert not any(k.startswith("h.") for k in table[0])


def test_no_congestion_column_without_the_group():
    status, out, _ = run_cli("--from-records", str(FIXTURES / "bookworm-tcpwork-v4.records"))
    assert status == 0 and "Congestion" not in out and "Socket" in out


@pytest.mark.parametrize("field", ["h.5.0=1", "h.0.64=1", "h.x.1=1", "h.1=2"])
def test_bad_histogram_fields_are_named(field):
    text = RUNS["bookworm"].read_text().splitlines()
    r = next(i for i, line in enumerate(text) if line.startswith("R\t"))
    text[r] += "\t" + field
    with pytest.raises(RecordParseError) as e:
        list(Parser("x.records").parse(text))
    assert field.split("=")[0] in str(e.value) and "x.records" in str(e.value)
