"""tcpipstat --read on captures recorded from real loopback traffic (tests/fixtures/capture,
recorded by its refresh.sh with tests/capture_workload.py), checked against what the
workload did and against tcptrace's output on the same file; bad captures. No root,
no tcpdump, no tcptrace needed: tests/test_capture_tier.py records and runs them."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpipstat.capture import analyse
from tcpipstat.capture.fields import CATALOGUE, FIELDS, NAMES
from tcpipstat.capture.flows import MAX_HOLES, MAX_PENDING, FlowTable
from tcpipstat.errors import ExitStatus
from tcpipstat.manpage import render_man
from tcpipstat.report import LIVE, ReportContext

from .capture_helpers import (check_workload, compare, ours, pair, synthetic_capture, tcptrace_rows,
                              to_pcapng)
from .conftest import FIXTURES, ROOT, run_cli

CAP = FIXTURES / "capture"
LO = CAP / "lo.pcap"
FORMATS = ["lo.pcap", "any-sll2.pcap", "any-sll.pcap", "any-sll2.pcapng"]
MANIFEST = json.loads((CAP / "manifest.json").read_text())
MEASURES = [f.name for f in FIELDS if f.unit]
COUNTS = [f.name for f in FIELDS if not f.unit]


# -- real traffic: what the workload did, and what tcptrace says ---------------------------

@pytest.mark.parametrize("name", FORMATS)
def test_every_format_shows_what_the_workload_did(name):
    check_workload(ours(CAP / name), MANIFEST)


def test_agrees_with_tcptrace_on_the_same_file():
    rows = ours(LO)
    tt = tcptrace_rows((CAP / "lo.tcptrace.csv").read_text())
    pairs = pair(rows, tt)
    problems = [p for o, t, local in pairs for p in compare(o, t, local)]
    assert not problems, "\n".join(problems)
    # the comparison covered retransmissions, out-of-order segments, zero windows and RTTs
    assert sum(o["counters"]["RetransSegs"] for o, _, _ in pairs) > 0
    assert sum(o["counters"]["OutOfOrder"] for o, _, _ in pairs) > 0
    assert sum(o["counters"]["InZeroWindows"] for o, _, _ in pairs) > 0
    assert max(o["counters"]["RttMax"] or 0 for o, _, _ in pairs) > 10


def test_agrees_with_tcptrace_on_a_synthetic_capture(tmp_path):
    """bench/capture_bench.py's seeded capture: 70 connections with segments the capture
    missed (resent after three duplicate ACKs: out of order) and spurious retransmissions
    (Karn's rule: no RTT sample for them); tcptrace's figures were recorded by refresh.sh."""
    path = tmp_path / "synthetic.pcap"
    assert synthetic_capture(path) == 5000
    rows = ours(path)
    pairs = pair(rows, tcptrace_rows((CAP / "synthetic.tcptrace.csv").read_text()))
    problems = [p for o, t, local in pairs for p in compare(o, t, local)]
    assert not problems, "\n".join(problems)
    assert len(pairs) == 70
    assert sum(r["counters"]["InRetransSegs"] for r in rows) > 0
    assert sum(r["counters"]["InOutOfOrder"] for r in rows) > 0
    assert sum(r["counters"]["DupAcks"] for r in rows) > 0


def test_link_types_and_formats_give_the_same_report():
    """Ethernet, SLL2, SLL and pcapng (nanosecond time stamps): the same packets, recorded
    side by side: the same counts; times within 0.1 ms (each recorder stamps the packets
    it receives itself: tens of microseconds apart on this loopback)."""
    base = {(r["lport"], r["rport"]): r["counters"] for r in ours(LO)}
    for name in FORMATS[1:]:
        other = {(r["lport"], r["rport"]): r["counters"] for r in ours(CAP / name)}
        assert other.keys() == base.keys(), name
        for k, c in other.items():
            assert {n: c[n] for n in COUNTS} == {n: base[k][n] for n in COUNTS}, (name, k)
            for n in MEASURES:
                assert (c[n] is None) == (base[k][n] is None), (name, k, n)
                if c[n] is not None:
                    assert abs(c[n] - base[k][n]) <= 0.1, (name, k, n, c[n], base[k][n])


@pytest.mark.parametrize("linktype", [101, 12, 14])      # LINKTYPE_RAW, DLT_RAW (two numberings)
def test_raw_ip_link_type_gives_the_same_report(tmp_path, linktype):
    """The Ethernet fixture rewritten as a raw-IP capture (each frame without its 14-byte
    Ethernet header, lengths adjusted): the same connections and counts."""
    raw = LO.read_bytes()
    out = bytearray(raw[:24])
    struct.pack_into("<I", out, 20, linktype)
    for off, n in _records(raw):
        sec, usec, caplen, wirelen = struct.unpack_from("<IIII", raw, off)
        out += struct.pack("<IIII", sec, usec, caplen - 14, wirelen - 14)
        out += raw[off + 16 + 14:off + n]
    f = tmp_path / "raw.pcap"
    f.write_bytes(bytes(out))
    base = {(r["lport"], r["rport"]): {n: r["counters"][n] for n in COUNTS} for r in ours(LO)}
    got = {(r["lport"], r["rport"]): {n: r["counters"][n] for n in COUNTS} for r in ours(f)}
    assert got == base and len(base) >= 5


def test_snaplen_cut_packets_still_count_their_bytes():
    status, out, err = run_cli("--read", str(LO))
    cap = analyse(str(LO))
    assert cap.read.cut > 0 and cap.decoded.cut_headers == 0
    assert f"{cap.read.cut:,} of {cap.read.frames:,} packets were cut by the snapshot length" in \
        " ".join(out.split())
    assert status == 0


def test_table_layout_header_and_sections():
    status, out, err = run_cli("--read", str(LO), "index=rport")
    assert status == 0, err
    lines = out.splitlines()
    frames = analyse(str(LO)).read.frames
    assert lines[0].startswith(f"tcpipstat: 7 rows, index=rport, {LO}: {frames} packets")
    assert "Remote port: 7101  (2 connections)" in out
    assert "Remote port: 7199  (1 connection)" in out
    heads = [ln.split() for ln in lines if ln.strip().startswith("Out ")]
    assert heads and all(h == ["Out", "In", "Tcp", "Timing"] for h in heads)
    assert " ms" in out and "HandshakeRtt" in out


def test_absent_measurements_are_na_null_and_empty_not_zero():
    """The refused connection (7199): a SYN and a reset. Nothing to time but the SYN's
    round trip (the reset acknowledges it, as tcptrace counts it)."""
    refused = "127.0.0.1:*-*:7199"
    _, table, _ = run_cli("--read", str(LO), "--zeros", refused)
    words = [ln.split() for ln in table.splitlines()]
    cells = {" ".join(w[i:i + 2]) for w in words for i in range(len(w) - 1)}
    for name in ("HandshakeRtt", "FirstByte", "TransferTime", "InRttMin", "InRttAvg", "InRttMax"):
        assert f"{name} n/a" in cells, name
    assert "AttemptFails 1" in cells and "RttSamples 1" in cells
    _, table_nz, _ = run_cli("--read", str(LO), refused)
    assert "InRttMin" not in table_nz and "HandshakeRtt" not in table_nz
    assert "AttemptFails 1" in table_nz
    (row,) = ours(LO, refused)
    c = row["counters"]
    assert c["InRttMin"] is None and c["HandshakeRtt"] is None and c["InRttSamples"] == 0
    assert c["RttSamples"] == 1 and c["RttMin"] is not None and c["AttemptFails"] == 1
    _, out, _ = run_cli("--read", str(LO), "--csv", refused)
    rec = list(csv.DictReader(io.StringIO(out)))
    assert rec[0]["InRttMin"] == "" and rec[0]["AttemptFails"] == "1" and rec[0]["pid"] == ""
    assert list(rec[0])[11:] == list(NAMES)


# -- index modes and filters: the live tool's ----------------------------------------------

@pytest.mark.parametrize("index", ["laddr", "raddr", "lport", "rport"])
def test_every_index_adds_up_to_the_same_totals(index):
    rows = ours(LO)
    grouped = ours(LO, f"index={index}")
    for name in COUNTS:
        total = sum(r["counters"][name] for r in rows)
        assert sum(r["counters"][name] for r in grouped) == total, name
    assert sum(r["sockets"] for r in grouped) == len(rows)
    every_min = min(r["counters"]["RttMin"] for r in rows if r["counters"]["RttMin"] is not None)
    mins = [r["counters"]["RttMin"] for r in grouped if r["counters"]["RttMin"] is not None]
    assert min(mins) == every_min
    # RttAvg of a group: the mean over all of its samples
    n = sum(r["counters"]["RttSamples"] for r in rows)
    mean = sum((r["counters"]["RttAvg"] or 0) * r["counters"]["RttSamples"] for r in rows) / n
    got = sum((r["counters"]["RttAvg"] or 0) * r["counters"]["RttSamples"] for r in grouped) / n
    assert abs(mean - got) < 0.01


@pytest.mark.parametrize("index", ["pid", "comm"])
def test_process_indexes_are_a_clear_error(index):
    status, out, err = run_cli("--read", str(LO), f"index={index}")
    assert status == ExitStatus.USAGE and out == ""
    assert f"index={index} is not available with --read" in err and "process" in err


@pytest.mark.parametrize("argv,what", [
    (["-c", "true"], "-c"), (["timeout=5"], "timeout"), (["--interval", "1"], "--interval"),
    (["onclose=1"], "onclose"), (["-x", "1"], "-x/--pid"),
    (["--from-records", "x"], "--from-records"),
    (["--groups", "tcp"], "-g/--groups"), (["--save-records", "x"], "--save-records"),
    (["--cong"], "--cong"), (["--dist"], "--dist"), (["--rfc4898"], "--rfc4898"),
    (["--sample", "10"], "--sample"),
    (["--on-cwnd-change"], "--on-cwnd-change"), (["--series", "s.csv"], "--series"),
    (["--plot", "p.png"], "--plot"),
    (["--kprobes-only"], "--kprobes-only"),
])
def test_live_only_options_are_refused(argv, what):
    status, out, err = run_cli("--read", str(LO), *argv)
    assert status == ExitStatus.USAGE and what in err and "--read" in err


@pytest.mark.parametrize("filt,ports", [
    ("*:*-*:7101", {7101}),
    ("*:*-*:7101..7102", {7101, 7102}),
    ("[::1]:*-*:*", {7104}),
    ("*.*.*.*:*-*:*", {7101, 7102, 7103, 7105, 7106, 7199}),
    ("127.0.0.0/8:*-127.0.0.1:7103", {7103}),
    ("*:7101-*:*", set()),          # local is the side that opened the connection
])
def test_filters_select_connections_by_the_opening_side(filt, ports):
    rows = ours(LO, filt)
    assert {r["rport"] for r in rows} == ports


def test_no_connection_accepted_says_so():
    status, out, _ = run_cli("--read", str(LO), "*:7101-*:*")
    assert status == 0 and "No TCP connection in the capture was accepted by the filters." in out
    assert "connections were not accepted by the filters" in out


def test_sort_and_top_by_capture_counters():
    rows = ours(LO, "--sort", "RttMax", "--top", "2")
    assert len(rows) == 2 and {r["rport"] for r in rows} <= {7103, 7104, 7105}
    assert rows[0]["counters"]["RttMax"] >= rows[1]["counters"]["RttMax"]
    status, _, err = run_cli("--read", str(LO), "--sort", "DelayedACKs")
    assert status == ExitStatus.USAGE and "DelayedACKs" in err


def test_the_live_catalogue_stays_the_default():
    assert ReportContext(()).catalogue is LIVE and CATALOGUE is not LIVE
    assert not set(n for n in NAMES) & {"InReceives", "DelayedACKs", "CurrEstab"}


def test_man_page_documents_the_capture_fields():
    man = render_man()
    assert ".SS Captures (\\-\\-read)" in man and ".SS From a capture (\\-\\-read)" in man
    for f in FIELDS:
        assert f"\\fB{f.name}\\fR" in man, f.name
    assert "tcpipstat \\-\\-read" in man


# -- bad captures: a clear error naming the file, or a warning with counts ----------------

def _records(raw: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each pcap record (little-endian file)."""
    out, pos = [], 24
    while pos + 16 <= len(raw):
        caplen = struct.unpack_from("<I", raw, pos + 8)[0]
        out.append((pos, 16 + caplen))
        pos += 16 + caplen
    return out


def test_fixture_is_little_endian_pcap():
    assert LO.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_pcap_reports_what_was_read_then_fails(tmp_path, where):
    raw = LO.read_bytes()
    recs = _records(raw)
    off, n = recs[-20]
    cut = off + (n - 5 if where == "data" else 7)
    bad = tmp_path / "cut.pcap"
    bad.write_bytes(raw[:cut])
    status, out, err = run_cli("--read", str(bad), "--json")
    assert status == ExitStatus.ERROR
    assert str(bad) in err and "truncated" in err and "Traceback" not in err
    assert f"{len(recs) - 20:,} packets read before" in err
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert sum(r["counters"]["OutSegs"] + r["counters"]["InSegs"] for r in rows) == len(recs) - 20


def test_truncated_pcapng_reports_what_was_read_then_fails(tmp_path):
    ng = CAP / "any-sll2.pcapng"
    bad = tmp_path / "cut.pcapng"
    bad.write_bytes(ng.read_bytes()[:-37])
    status, out, err = run_cli("--read", str(bad))
    assert status == ExitStatus.ERROR and str(bad) in err and "truncated" in err
    assert "rows, index=tuple" in out


def test_unknown_link_type_is_a_clear_error(tmp_path):
    raw = bytearray(LO.read_bytes())
    struct.pack_into("<I", raw, 20, 147)         # LINKTYPE_USER0
    bad = tmp_path / "user0.pcap"
    bad.write_bytes(bytes(raw))
    status, out, err = run_cli("--read", str(bad))
    assert status == ExitStatus.USAGE and out == ""
    assert str(bad) in err and "link type 147 is not supported" in err


def test_pcapng_interface_of_an_unknown_link_type_is_skipped_with_a_count(tmp_path):
    mixed = tmp_path / "mixed.pcapng"
    to_pcapng(LO, mixed, extra_iface=147)
    status, out, err = run_cli("--read", str(mixed), "index=rport")
    assert status == 0
    skipped = "packets of unsupported link types were skipped: 1 of link type 147"
    assert skipped in " ".join(out.split())
    counts = [[r["counters"][n] for n in COUNTS] for r in ours(mixed, "index=rport")]
    assert counts == [[r["counters"][n] for n in COUNTS] for r in ours(LO, "index=rport")]


def test_pcapng_of_only_unknown_link_types_is_a_clear_error(tmp_path):
    raw = bytearray(LO.read_bytes())
    struct.pack_into("<I", raw, 20, 147)
    src = tmp_path / "user0.pcap"
    src.write_bytes(bytes(raw))
    ng = tmp_path / "user0.pcapng"
    to_pcapng(src, ng)
    status, out, err = run_cli("--read", str(ng))
    assert status == ExitStatus.USAGE and str(ng) in err and "link type 147" in err


def test_packets_cut_inside_their_headers_are_counted_and_skipped(tmp_path):
    raw = LO.read_bytes()
    recs = _records(raw)
    out = [raw[:24]]
    cut = 0
    for i, (off, n) in enumerate(recs):
        sec, usec, caplen, wirelen = struct.unpack_from("<IIII", raw, off)
        data = raw[off + 16:off + n]
        if i % 10 == 5:                          # Ethernet + IPv4 + 6 bytes of TCP header
            data = data[:40]
            cut += 1
        out.append(struct.pack("<IIII", sec, usec, len(data), wirelen) + data)
    bad = tmp_path / "cut-headers.pcap"
    bad.write_bytes(b"".join(out))
    status, text, err = run_cli("--read", str(bad))
    assert status == 0
    flat = " ".join(text.split())
    assert f"{cut} packets were cut inside their IP or TCP header and could not be used" in flat
    cap = analyse(str(bad))
    assert cap.decoded.cut_headers == cut and cap.decoded.tcp == len(recs) - cut


@pytest.mark.parametrize("content,why", [
    (b"", "the file is empty"),
    (b"# tcpipstat records\nH\ttcpipstat\t2\n",
     "not a pcap or pcapng file (it starts with 23 20 74 63 70 69 70 73)"),
    (b"x\n", "not a pcap or pcapng file (it starts with 78 0a)"),
    (gzip.compress(b"\xd4\xc3\xb2\xa1" + b"\0" * 40), "gunzip it first"),
    (b"\xd4\xc3\xb2\xa1\x02\x00", "ends inside the pcap file header"),
    (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x00\x00\x00\x00", "not a pcap or pcapng file"),
])
def test_not_a_capture_is_a_clear_error_naming_the_file(tmp_path, content, why):
    bad = tmp_path / "not-a-capture"
    bad.write_bytes(content)
    status, out, err = run_cli("--read", str(bad))
    assert status == ExitStatus.USAGE and out == ""
    assert f"cannot read capture '{bad}'" in err and why in err


def test_missing_file_and_directory(tmp_path):
    for path, why in ((tmp_path / "nope.pcap", "No such file"), (tmp_path, "directory")):
        status, out, err = run_cli("--read", str(path))
        assert status == ExitStatus.USAGE and str(path) in err and why in err


def test_corrupt_record_length_stops_with_an_error(tmp_path):
    raw = bytearray(LO.read_bytes())
    off, _ = _records(bytes(raw))[3]
    struct.pack_into("<I", raw, off + 8, 0x7FFFFFF0)
    bad = tmp_path / "corrupt.pcap"
    bad.write_bytes(bytes(raw))
    status, out, err = run_cli("--read", str(bad), "--json")
    assert status == ExitStatus.ERROR and "impossible captured length" in err and str(bad) in err
    assert "3 packets read before" in err


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("reader", ["python", "auto"])
def test_a_record_longer_than_the_snapshot_length_is_refused(tmp_path, monkeypatch, reader, fmt):
    """No record may hold more than its capture's snapshot length (the pcap header's, or its
    pcapng interface's): one that claims more is corrupt, and what was read before it is
    reported, as before any corrupt record."""
    raw = bytearray(LO.read_bytes())
    lens = [n - 16 for _, n in _records(bytes(raw))]
    snap = lens[0]
    first_over = next(i for i, n in enumerate(lens) if n > snap)
    struct.pack_into("<I", raw, 16, snap)
    bad = tmp_path / "snaplen.pcap"
    bad.write_bytes(bytes(raw))
    if fmt == "pcapng":     # (the interface's snapshot length is the pcap header's)
        to_pcapng(bad, bad.with_suffix(".pcapng"))
        bad = bad.with_suffix(".pcapng")
    monkeypatch.setenv("TCPIPSTAT_READER", reader)
    status, out, err = run_cli("--read", str(bad), "--json")
    said = (f"packet {first_over + 1} claims {lens[first_over]} captured bytes, more than its "
            f"capture's snapshot length ({snap})")
    assert status == ExitStatus.ERROR and said in err, err
    assert f"{first_over} packets read before" in err and first_over > 0


@pytest.mark.parametrize("reader", ["python", "auto"])
def test_a_huge_claimed_length_costs_only_the_bytes_there(tmp_path, monkeypatch, reader):
    """Found by the property test below: a record of a 350-byte file claiming 100 MiB made
    the pure-Python reader set aside 100 MiB (read(n) allocates n before it finds the end)."""
    raw = bytearray(LO.read_bytes())
    off, _ = _records(bytes(raw))[3]
    struct.pack_into("<I", raw, off + 8, 100 * 2**20)
    struct.pack_into("<I", raw, 16, 0)     # (a header that states no snapshot length)
    bad = tmp_path / "claims-100MiB.pcap"
    bad.write_bytes(bytes(raw[:off + 16 + 12]))
    monkeypatch.setenv("TCPIPSTAT_READER", reader)
    tracemalloc.start()
    try:
        status, out, err = run_cli("--read", str(bad), "--json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == ExitStatus.ERROR and "the file ends inside packet 4" in err
    assert peak < 16 * 2**20, peak


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_captures_never_raise(tmp_path_factory, data):
    """Any damage (bytes changed, cut anywhere, zeros appended): an exit status and a
    message, never a traceback, within a bound of time and memory."""
    name = data.draw(st.sampled_from(FORMATS))
    raw = bytearray((CAP / name).read_bytes())
    for _ in range(data.draw(st.integers(0, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    raw += bytes(data.draw(st.sampled_from([0, 16, 4096, 65536])))   # empty records, sparse
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    cpu = time.process_time()
    try:
        status, out, err = run_cli("--read", str(path), "--json")
        cpu = time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Bounds far above the slowest seen (0.3 s, 30 MiB: the fixtures are a few KiB), so that
    # only a hang or a runaway allocation fails; CPU time, not wall time, so load cannot.
    assert cpu < 20 and peak < 64 * 2**20, (cpu, peak)
    assert status in (ExitStatus.OK, ExitStatus.ERROR, ExitStatus.USAGE)
    if status != ExitStatus.OK:
        assert str(path) in err


# -- streaming: memory does not grow with the capture's length -----------------------------

def _bench():
    spec = importlib.util.spec_from_file_location("capture_bench",
                                                  ROOT / "bench" / "capture_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_does_not_grow_with_the_length_of_the_capture(tmp_path):
    """The same four connections, 10k and 60k packets long: the analysis' peak memory
    (tracemalloc) is the same, give or take."""
    gen = _bench().generate
    peaks = []
    for n in (10_000, 60_000):
        path = tmp_path / f"long{n}.pcap"
        assert gen(path, n, 4, "long")[0] == n
        tracemalloc.start()
        cap = analyse(str(path))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert cap.decoded.tcp == n and len(cap.connections()) == 4
    assert peaks[1] < peaks[0] * 1.5 + 256 * 1024, peaks


def test_per_direction_state_is_bounded():
    """A direction whose ACKs the capture never shows keeps at most MAX_PENDING segments
    for RTT samples; holes are capped at MAX_HOLES."""
    t = FlowTable()
    src, dst = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    t.add(0.0, (2, src, 1000, dst, 80, 100, 0, 0x02, 500, 0, 0))
    for i in range(3 * MAX_PENDING):
        t.add(i * 1e-5, (2, src, 1000, dst, 80, 101 + i * 1000, 1, 0x10, 500, 1000, 0))
    (conn,) = list(t.connections())
    h = conn.halves[0]
    assert len(h.pending) <= MAX_PENDING and len(h.seen) == 1
    assert h.new_bytes == 3 * MAX_PENDING * 1000
    for i in range(3 * MAX_HOLES):               # every other segment missing: a hole each
        seq = (101 + (3 * MAX_PENDING + 2 * i) * 1000) & 0xFFFFFFFF
        t.add(1.0 + i * 1e-5, (2, src, 1000, dst, 80, seq, 1, 0x10, 500, 1000, 0))
    assert len(h.seen) <= MAX_HOLES


def test_sequence_numbers_wrap_around():
    t = FlowTable()
    src, dst = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    isn = 0xFFFFFFFF - 5000
    t.add(0.0, (2, src, 1000, dst, 80, isn, 0, 0x02, 500, 0, 0))
    t.add(0.001, (2, dst, 80, src, 1000, 7, (isn + 1) & 0xFFFFFFFF, 0x12, 500, 0, 0))
    seq = isn + 1
    for i in range(10):
        t.add(0.002 + i * 1e-3, (2, src, 1000, dst, 80, seq & 0xFFFFFFFF, 8, 0x10, 500, 1000, 0))
        ack = (seq + 1000) & 0xFFFFFFFF
        t.add(0.0025 + i * 1e-3, (2, dst, 80, src, 1000, 8, ack, 0x10, 500, 0, 0))
        seq += 1000
    # one resend, after the wrap
    t.add(0.5, (2, src, 1000, dst, 80, (seq - 1000) & 0xFFFFFFFF, 8, 0x10, 500, 1000, 0))
    (conn,) = list(t.connections())
    c = conn.counters()
    assert c["SendBytes"] == 10_000 and c["RetransSegs"] == 1 and c["RetransBytes"] == 1000
    assert c["RttSamples"] == 11 and abs(c["RttMax"] - 1.0) < 1e-6   # the SYN's, and each segment's


def _blocks(data: bytes) -> list[bytes]:
    """A little-endian pcapng file's blocks, as they are."""
    out, i = [], 0
    while i < len(data):
        blen = int.from_bytes(data[i + 4:i + 8], "little")
        out.append(data[i:i + blen])
        i += blen
    return out


def test_a_corrupt_interface_block_keeps_what_was_read(tmp_path):
    """An interface description block too short to hold one, after three packets: the three
    are reported and the run says where the file went bad (exit 1), as after a corrupt
    packet block; no exit 2 and no dpkt wording."""
    blocks = _blocks((FIXTURES / "capture" / "any-sll2.pcapng").read_bytes())
    packets = [i for i, b in enumerate(blocks) if b[:4] == b"\x06\x00\x00\x00"]
    bad_idb = (1).to_bytes(4, "little") + (16).to_bytes(4, "little") + bytes(4) + \
        (16).to_bytes(4, "little")
    at = packets[2] + 1
    path = tmp_path / "bad-idb.pcapng"
    path.write_bytes(b"".join(blocks[:at]) + bad_idb + b"".join(blocks[at:]))
    status, out, err = run_cli("--read", str(path), "--json")
    assert status == ExitStatus.ERROR
    assert "corrupt interface description block after packet 3" in err
    assert "3 packets read before" in err and "needed at least" not in err


def test_a_fifo_says_it_waits_for_a_writer(tmp_path):
    import os
    import subprocess
    import sys
    fifo = tmp_path / "cap.fifo"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-m", "tcpipstat", "--read", str(fifo), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the writer comes once the reader has said it waits (whatever the machine's speed)
    first = p.stderr.readline()
    assert "is a FIFO: waiting for a writer" in first
    fifo.write_bytes((FIXTURES / "capture" / "lo.pcap").read_bytes())
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.count("\n") > 0, err


def test_ctrl_c_while_reading_reports_what_was_read(monkeypatch):
    """The report of the packets read before Ctrl-C, a note saying so, and exit 130; with
    progress called as reading goes."""
    import tcpipstat.capture as capture
    real = capture.frames

    def interrupted(path, stats):
        for i, frame in enumerate(real(path, stats)):
            if i == 100:
                raise KeyboardInterrupt
            yield frame
    monkeypatch.setattr(capture, "frames", interrupted)
    monkeypatch.setenv("TCPIPSTAT_READER", "python")     # (whose frames() this replaces)
    monkeypatch.setattr(capture, "PROGRESS_EVERY", 10)
    calls = []
    cap = capture.analyse(str(FIXTURES / "capture" / "lo.pcap"), progress=calls.append)
    assert cap.interrupted and calls == list(range(10, 101, 10))
    assert any("interrupted (Ctrl-C) after 100 packets" in n for n in cap.notes())
    status, out, err = run_cli("--read", str(FIXTURES / "capture" / "lo.pcap"))
    assert status == ExitStatus.INTERRUPTED and "after 100 packets" in " ".join(out.split())
