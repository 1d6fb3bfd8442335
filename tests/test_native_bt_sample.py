"""--sample, --on-cwnd-change, --series with the bpftrace collector (tcp:tcp_probe).

Tier 1 (no kernel): the program holds no user text and takes every number it uses; the
output of a real bpftrace run on this project's CI host (tests/fixtures/bpftrace/,
recorded by ``sudo python3 -m tests.test_native_bt_sample``) parses into the samples
the kernel's own TCP_INFO of that run agrees with.

Tier "3n" (``@pytest.mark.native``, gated as tests/test_native_bpftrace.py's): real runs
around a loopback transfer of known size (tests/bt_sample_workload.py), checked against
the kernel: the bytes acknowledged, cwnd, srtt, rttvar, rto and snd_wnd of the end
sample against TCP_INFO read just before the close, the number of samples against the
segments received, the rate limit against the samples' times.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tcpipstat import bpftrace
from tcpipstat.model import Collection
from tcpipstat.plan import build_plan
from tcpipstat.records import SAMPLE, SampleRecord, parse_text
from tcpipstat.series import FIELD_NAMES
from tests.test_native_bpftrace import ROOT, _free_port, _native

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bpftrace"
RAW = FIXTURES / "sample0-rst.out"               # bpftrace's stdout
RAW_WORKLOAD = FIXTURES / "sample0-rst.workload.json"
RAW_SEND = 200_000
WORKLOAD = Path(__file__).resolve().parent / "bt_sample_workload.py"


def _plan(*words: str):
    return build_plan(["--backend", "bpftrace", *words])


# ---- tier 1: the program and its parameters ----
@pytest.mark.parametrize("words", [["--sample", "0"], ["--series", "x.csv"],
                                   ["--sample", "20", "--on-cwnd-change"]])
def test_sampling_is_supported(words):
    assert bpftrace.unsupported(_plan(*words)) == ""


def test_sample_program_holds_no_user_text():
    a = _plan("--sample", "20", "--on-cwnd-change", "*:*-*:5201")
    b = _plan("--sample", "75.5", "*:*-*:443")
    text = bpftrace.render_program(a)
    assert text == bpftrace.render_program(b) and "tracepoint:tcp:tcp_probe" in text
    for word in ("20000", "75500", "75.5", "5201"):
        assert word not in text
    assert bpftrace.sample_args(a, 250) == ["20000", "1", "250"]
    assert bpftrace.sample_args(b, 0) == ["75500", "0", "0"]
    assert bpftrace.sample_args(_plan(), 250) == []


@pytest.mark.parametrize("nfilters", [0, 1, 3])
def test_program_uses_exactly_the_parameters_it_gets(nfilters):
    """The sampling parameters come after the filters': the highest $N the program reads
    is the last argument passed."""
    plan = _plan("--sample", "10", *[f"*:*-*:{80 + i}" for i in range(nfilters)])
    args = (bpftrace.program_args(plan.filters, plan.timeout_s)
            + bpftrace.sample_args(plan, 250))
    used = {int(n) for n in re.findall(r"\$(\d+)\b", bpftrace.render_program(plan))}
    assert max(used) == len(args) == 2 + nfilters * bpftrace.PER_FILTER + bpftrace.SAMPLE_PARAMS


def test_every_sampled_field_is_read():
    assert tuple(bpftrace.BT_SFIELDS) == FIELD_NAMES


def test_kernel_hz_from_its_configuration(tmp_path):
    gz, plain = tmp_path / "config.gz", tmp_path / "config-6.1"
    gz.write_bytes(gzip.compress(b"# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"))
    plain.write_text("CONFIG_HZ_1000=y\nCONFIG_HZ=1000\n")
    missing = tmp_path / "none.gz"
    assert bpftrace.kernel_hz((missing, gz, plain)) == 250
    assert bpftrace.kernel_hz((missing, plain)) == 1000
    assert bpftrace.kernel_hz((missing,)) == 0


# ---- tier 1: a real run's output ----
def _record_lines(raw_text: str) -> list[str]:
    """bpftrace's stdout of a --sample 0 run, as the backend turns it into records."""
    plan = _plan("--sample", "0")
    available, _ = bpftrace.counters(plan.groups)
    runner = bpftrace.Runner(["bpftrace"], available, plan.max_sockets, print)
    return list(runner._records(iter(raw_text.splitlines(True))))


def _series(samples: list) -> dict:
    """{local port: [Sample, ...]} in the order written."""
    out: dict = {}
    for s in samples:
        out.setdefault(s.tuple.lport, []).append(s.sample)
    return out


def _check_against_kernel(series: dict, w: dict, send: int, fin: bool) -> None:
    """The samples of one workload run against what its sockets' TCP_INFO said."""
    client, server = series[w["client_port"]], [v for k, v in series.items()
                                                if k != w["client_port"]][0]
    for ss in (client, server):
        assert [s.kind for s in ss].count("end") == 1 and ss[-1].kind == "end"
        assert [s.t_us for s in ss] == sorted(s.t_us for s in ss)
    first, end = client[0], client[-1]
    # the first sample comes before the first ACK is processed: snd_una is ISN + 1
    assert (end.get("snd_una") - first.get("snd_una")) % (1 << 32) == send + fin
    assert w["client"]["bytes_acked"] == send + 1            # (the SYN)
    assert (end.get("snd_nxt"), end.get("wqueue"), end.get("inflight")) == (
        end.get("snd_una"), 0, 0)
    assert (server[-1].get("snd_una") - server[0].get("snd_una")) % (1 << 32) == 1 + fin
    if not fin:      # a reset close: the end sample is the state TCP_INFO read
        info = w["client"]
        assert (end.get("cwnd"), end.get("srtt_us"), end.get("rttvar_us"), end.get("rto_ms"),
                end.get("snd_wnd"), end.get("mss"), end.get("total_retrans")) == (
            info["snd_cwnd"], info["rtt"], info["rttvar"], info["rto"] // 1000,
            info["snd_wnd"], info["snd_mss"], info["total_retrans"])
        assert end.get("ssthresh") == (None if info["snd_ssthresh"] >= 0x7FFFFFFF
                                       else info["snd_ssthresh"])
    # one sample at most per segment received in ESTABLISHED: not the client's SYN-ACK,
    # nor the server's SYN and handshake ACK
    assert 1 <= sum(s.kind == "ack" for s in client) <= w["client"]["segs_in"] - 1
    assert 1 <= sum(s.kind == "ack" for s in server) <= w["server"]["segs_in"] - 2


def test_recorded_run_parses_into_samples_the_kernel_agrees_with():
    w = json.loads(RAW_WORKLOAD.read_text())
    recs = parse_text("".join(_record_lines(RAW.read_text())), str(RAW))
    samples = [r for r in recs if isinstance(r, SampleRecord)]
    assert len(_series(samples)) == 2 and w["client_port"] in _series(samples)
    for s in samples:
        assert all(s.sample.get(n) is not None for n in FIELD_NAMES if n != "ssthresh")
    _check_against_kernel(_series(samples), w, RAW_SEND, fin=False)
    c = Collection()
    for r in recs:
        c.add(r)
    assert sum(map(len, c.series.values())) == len(samples) and c.trailer.dropped == 0


def test_recorded_samples_are_stap_shaped():
    """The S records are the stap collector's (tests/fixtures/bookworm-sample50.records):
    the same fields, in the same order."""
    def names(line: str) -> list[str]:
        return [p.split("=")[0] for p in line.rstrip("\n").split("\t")[SAMPLE.width:]]
    stap = Path(__file__).resolve().parent / "fixtures" / "bookworm-sample50.records"
    want = names(next(ln for ln in stap.read_text().splitlines() if ln.startswith("S\t")))
    ours = [ln for ln in _record_lines(RAW.read_text()) if ln.startswith("S\t")]
    assert ours and all(names(ln) == want for ln in ours) and want == list(FIELD_NAMES)


def _by_connection(lines: list[str]) -> dict:
    """{tuple: [its S records, in the order given]}."""
    out: dict = {}
    for ln in lines:
        if ln.startswith("S\t"):
            out.setdefault(tuple(ln.split("\t")[3:10]), []).append(ln)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_samples_come_out_in_the_order_taken(seed):
    """However bpftrace's per-CPU buffers interleave them, each connection's samples come
    out in the order the kernel took them, and nothing is lost or made up."""
    raw = RAW.read_text().splitlines(True)
    mark = raw.index(bpftrace.END_MARK + "\n")
    body = raw[1:mark]
    shuffled = body[:]
    random.Random(seed).shuffle(shuffled)
    order = bpftrace.SampleOrder()
    out = [x for ln in shuffled for x in order.feed(ln)] + order.rest()
    want = [ln.split("\t", 2)[2] if ln.startswith("Q\t") else ln for ln in body]
    assert sorted(out) == sorted(want) and out != want
    assert _by_connection(out) == _by_connection(want)


def test_a_close_waits_for_the_samples_before_it():
    q = [ln for ln in RAW.read_text().splitlines(True) if ln.startswith("Q\t")]
    first = q[0].split("\t")[5:12]             # one connection: its first three samples
    mine = [ln for ln in q if ln.split("\t")[5:12] == first][:3]
    close = "\t".join(["R", "close", *first, "1", "x", "0", "SendBytes=1"]) + "\n"
    order = bpftrace.SampleOrder()
    s1, s2, s3 = (ln.split("\t", 2)[2] for ln in mine)
    assert order.feed(mine[1]) == [] and order.feed(close) == [] and order.feed(mine[2]) == []
    assert order.feed(mine[0]) == [s1, s2, s3, close]
    assert order.feed(mine[2].replace("Q\t3\t", "Q\t5\t")) == []      # 4 never comes
    assert order.rest() == [s3] and order.rest() == []


# ---- tier 3n: real runs on this kernel ----
def _workload(port: int, send: int, chunk: int, pause_ms: int, close: str, out: Path) -> str:
    return (f"{sys.executable} {WORKLOAD} 127.0.0.1 {port} {send} {chunk} {pause_ms} {close} "
            f"{out}")


def _sampled_run(tmp_path: Path, words: list[str], send: int, chunk: int, pause_ms: int,
                 close: str) -> tuple[dict, dict]:
    """tcpipstat --backend bpftrace WORDS --series CSV around the workload: the CSV's
    samples per local port ({port: [row, ...]}) and the workload's report."""
    port, out, series = _free_port(), tmp_path / "workload.json", tmp_path / "series.csv"
    res = subprocess.run(
        [sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", *words, "--series",
         str(series), f"*:*-*:{port}", f"*:{port}-*:*",
         "-c", _workload(port, send, chunk, pause_ms, close, out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows: dict = {}
    with open(series, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["lport"]), []).append(row)
    return rows, json.loads(out.read_text())


def _as_samples(rows: dict) -> dict:
    """CSV rows back into Sample values (the same numbers the records held)."""
    from tcpipstat.series import Sample
    return {p: [Sample(round(float(r["t_s"]) * 1e6), r["event"],
                       tuple(int(r[n]) if r[n] else None for n in FIELD_NAMES)) for r in rs]
            for p, rs in rows.items()}


@pytest.mark.native
def test_every_ack_sample_agrees_with_tcp_info(tmp_path):
    """--sample 0, a reset close: the end sample is the state TCP_INFO read just before."""
    _native()
    rows, w = _sampled_run(tmp_path, ["--sample", "0"], 300_000, 60_000, 10, "rst")
    assert len(rows) == 2
    _check_against_kernel(_as_samples(rows), w, 300_000, fin=False)


@pytest.mark.native
def test_rate_limit_holds_on_a_long_transfer(tmp_path):
    """--sample 50 over a 1.2 s transfer closed the usual way: no two samples of one
    connection less than 50 ms apart (but the end sample at close), yet sampled all along."""
    _native()
    send = 60 * 16_384
    rows, w = _sampled_run(tmp_path, ["--sample", "50"], send, 16_384, 20, "fin")
    series = _as_samples(rows)
    _check_against_kernel(series, w, send, fin=True)
    for ss in series.values():
        acks = [s.t_us for s in ss if s.kind == "ack"]
        assert min(b - a for a, b in zip(acks, acks[1:])) >= 50_000, acks
    client = [s.t_us for s in series[w["client_port"]] if s.kind == "ack"]
    assert client[-1] - client[0] >= 1_000_000 and len(client) >= 10


@pytest.mark.native
def test_on_cwnd_change_samples_only_changes(tmp_path):
    _native()
    rows, w = _sampled_run(tmp_path, ["--sample", "0", "--on-cwnd-change"], 4_000_000,
                           1 << 20, 0, "fin")
    series = _as_samples(rows)
    for ss in series.values():
        cw = [s.get("cwnd") for s in ss if s.kind == "ack"]
        assert all(a != b for a, b in zip(cw, cw[1:])), cw
    assert sum(s.kind == "ack" for s in series[w["client_port"]]) >= 2


def record(raw: Path = RAW, workload_out: Path = RAW_WORKLOAD) -> None:
    """Record the tier-1 fixture again (root, bpftrace): bpftrace's own output of a
    --sample 0 run around the reset-close workload, and the workload's report."""
    port = _free_port()
    command = _workload(port, RAW_SEND, 50_000, 10, "rst", workload_out)
    plan = _plan("--sample", "0", f"*:*-*:{port}", f"*:{port}-*:*", "-c", command)
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "tcpipstat.bt"
        program.write_text(bpftrace.render_program(plan))
        cmd = ["bpftrace", "-q", str(program),
               *bpftrace.program_args(plan.filters, plan.timeout_s),
               *bpftrace.sample_args(plan, bpftrace.kernel_hz()),
               "-c", command]
        env = {**os.environ, "BPFTRACE_MAP_KEYS_MAX": str(plan.max_sockets)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if res.returncode:
        raise SystemExit(f"bpftrace failed: {res.stderr}")
    raw.write_text(res.stdout)


if __name__ == "__main__":
    record()
