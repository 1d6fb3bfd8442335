"""Parser, model and reports on records recorded from real lab runs (tests/fixtures,
refreshed by tests/fixtures/refresh.sh)."""
import csv
import re
import io
import json

import pytest

from tcpipstat.errors import RecordParseError
from tcpipstat.model import INDEXES, Collection
from tcpipstat.records import Header, Parser, SocketRecord, Trailer, parse_text, unescape_comm
from tcpipstat.report import ReportContext, write_csv, write_json

from .conftest import FIXTURES, run_cli

# what tcpwork did in bookworm-tcpwork-v4 (see refresh.sh): port 7001: 3 connections,
# 1000 bytes up and 100 down each; port 7002: 2 connections, 5000 up, 50 down.
V4 = FIXTURES / "bookworm-tcpwork-v4.records"
V6 = FIXTURES / "trixie-tcpwork-v6.records"


def load(path) -> Collection:
    return Collection().extend(Parser(path.name).parse(path.read_text().splitlines()))


def test_fixture_parses_into_typed_records():
    recs = list(Parser("f").parse(V4.read_text().splitlines()))
    assert isinstance(recs[0], Header) and isinstance(recs[-1], Trailer)
    socks = [r for r in recs if isinstance(r, SocketRecord)]
    assert socks and all(r.tuple.family == 2 for r in socks)
    assert {r.reason for r in socks} <= {"close", "end", "spill"}


def test_exact_counts_of_the_known_workload():
    c = load(V4)
    rows = {r.key.lport: r for r in c.rows("lport")}
    assert rows[7001].counters["PassiveOpens"] == 3
    assert rows[7001].counters["RecvBytes"] == 3000 and rows[7001].counters["SendBytes"] == 300
    assert rows[7002].counters["PassiveOpens"] == 2
    assert rows[7002].counters["RecvBytes"] == 10000 and rows[7002].counters["SendBytes"] == 100
    clients = [r for p, r in rows.items() if p not in (7001, 7002)]
    assert sum(r.counters.get("ActiveOpens", 0) for r in clients) == 5
    assert sorted(r.counters["SendBytes"] for r in clients) == [1000, 1000, 1000, 5000, 5000]


@pytest.mark.parametrize("path", [V4, V6, FIXTURES / "bookworm-iperf3.records"])
def test_every_index_mode_sums_to_the_same_totals(path):
    c = load(path)
    totals = c.totals()
    for index in INDEXES:
        summed: dict[str, int] = {}
        for row in c.rows(index):
            for k, v in row.counters.items():
                summed[k] = summed.get(k, 0) + v
        assert summed == {k: v for k, v in totals.items()}, index


def test_ipv6_addresses_are_real():
    c = load(V6)
    rows = c.rows("tuple")
    assert rows and all(r.key.family == 10 for r in rows)
    out = io.StringIO()
    write_json(out, rows, ReportContext(c.counter_names))
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {o["laddr"] for o in objs} == {"::1"}
    assert sum(o["counters"]["PassiveOpens"] for o in objs) == 2
    assert all(o["counters"]["InNoRoutes"] is None for o in objs)   # IPv4-only: n/a, not 0
    assert all(o["counters"]["InSegs"] > 0 for o in objs)
    # InReceives and OutRequests have IPv6 probes (ip6_rcv_core, ip6_xmit): one segment a
    # datagram here
    assert all(o["counters"]["InReceives"] == o["counters"]["InSegs"] for o in objs)
    assert all(o["counters"]["OutRequests"] == o["counters"]["OutSegs"] > 0 for o in objs)


def test_json_and_csv_mark_unavailable_counters_not_zero():
    c = load(V4)
    ctx = ReportContext(tuple(n for n in c.counter_names if n != "DelayedACKs"), ("DelayedACKs",))
    rows = c.rows("lport")
    out = io.StringIO()
    write_json(out, rows, ctx)
    first = json.loads(out.getvalue().splitlines()[0])
    assert first["counters"]["DelayedACKs"] is None
    out = io.StringIO()
    assert write_csv(out, rows, ctx) == len(rows)
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert table[0]["DelayedACKs"] == "" and table[0]["index"] == "lport"


def test_from_records_cli_round_trip():
    status, out, err = run_cli("--from-records", str(V4), "index=lport", "--json")
    assert status == 0, err
    objs = [json.loads(line) for line in out.splitlines()]
    assert {o["lport"] for o in objs} >= {7001, 7002}
    status, out, _ = run_cli("--from-records", str(V4), "index=raddr")
    assert status == 0 and "Remote address: 127.0.0.1" in out and "PassiveOpens 5" in out


def test_nozeros_hides_zero_counters():
    _, out, _ = run_cli("--from-records", str(V4), "index=lport", "nozeros=1")
    assert "RetransSegs" not in out
    _, out, _ = run_cli("--from-records", str(V4), "index=lport", "nozeros=0")
    assert "RetransSegs 0" in out


def test_onclose_reports_each_closed_socket_once():
    status, out, err = run_cli("--from-records", str(V4), "onclose=1", "--json")
    assert status == 0, err
    objs = [json.loads(line) for line in out.splitlines()]
    tuples = [(o["lport"], o["rport"]) for o in objs]
    assert len(tuples) == len(set(tuples)) == 10  # 5 connections, both ends
    assert all(o["closed"] == 1 for o in objs)



ODD_COMMS = ("R\tclose\t10\t0\t1\t8000\t20010db8\t5\t443\t7\tq\\\"x\\tz\\r\\303\\251\t0"
             "\tSendBytes=1234567\tInSegs=3")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.records")), ids=lambda p: p.name)
def test_ndjson_lines_are_json_dumps_of_row_dict(path):
    """write_json builds its lines from pieces (for speed): each must be exactly what
    json.dumps writes for the row's dict, whatever the index, the rows and the sockets."""
    from tcpipstat.report import row_dict
    text = path.read_text()
    # a command name to escape, an IPv6 row, two processes
    if path.name == "bookworm-tcpwork-v4.records":
        lines = text.splitlines()
        lines.insert(-1, ODD_COMMS)
        lines.insert(-1, ODD_COMMS.replace("\t443\t7\t", "\t444\t9\t").replace("\tq", "\tother"))
        text = "\n".join(lines)
    c = Collection().extend(Parser(path.name).parse(text.splitlines()))
    names = c.counter_names
    for ctx in (ReportContext(names), ReportContext(names[1:], names[:1])):
        for index in INDEXES:
            rows = c.rows(index)
            out = io.StringIO()
            write_json(out, rows, ctx)
            expected = "".join(json.dumps(row_dict(r, ctx), separators=(",", ":")) + "\n"
                               for r in rows)
            assert out.getvalue() == expected, index



TABLE_RECORDS = [
    "H\ttcpipstat\t2\t0.2\t1000\t0\t8192\tSendBytes,RecvBytes,InReceives,InNoRoutes,CurrEstab,InSegs,OutSegs,DelayedACKs",
    "R\tclose\t2\t0\t7f000001\t80\t0\t7f000002\t4242\t7\tweb\t0\tSendBytes=1234567\tRecvBytes=999\tCurrEstab=-1234"
    "\tInSegs=1000\tOutSegs=-5\tInReceives=0",
    "R\tclose\t10\t0\t1\t80\t0\t2\t4243\t8\tw\\rb\t0\tSendBytes=12\tCurrEstab=1\tInSegs=1000000\tOutSegs=-1000"
    "\tInNoRoutes=3",
    "T\t2000\t1\t0\t0\t0",
]


def test_table_text():
    """Tables are laid out with string operations (for speed): the text a rich SIMPLE_HEAD
    table had, thousands separators on negative numbers too, a command's \\r dropped as
    rich drops it, IPv4-only counters left out of IPv6 rows."""
    from rich.console import Console
    from tcpipstat.report import render_tables
    c = Collection().extend(Parser("t").parse(TABLE_RECORDS))
    out = io.StringIO()
    render_tables(Console(file=out, width=100), c.rows(), ReportContext(c.counter_names), "hdr")
    assert out.getvalue() == (
        'hdr\n'
        '127.0.0.1:80 <-> 127.0.0.2:4242  web[7]  '
        '(open before collection started: partial totals)\n'
        '                                                      \n'
        ' Socket                Ip   Tcp                TcpExt \n'
        ' ──────────────────────────────────────────────────── \n'
        ' SendBytes 1,234,567   -    CurrEstab -1,234   -      \n'
        ' RecvBytes 999              InSegs 1,000              \n'
        '                            OutSegs -5                \n'
        '                                                      \n'
        '[::1]:80 <-> [::2]:4243  wb[8]  (open before collection started: partial totals)\n'
        '                                               \n'
        ' Socket         Ip   Tcp                TcpExt \n'
        ' ───────────────────────────────────────────── \n'
        ' SendBytes 12   -    CurrEstab 1        -      \n'
        '                     InSegs 1,000,000          \n'
        '                     OutSegs -1,000            \n'
        '                                               \n'
    )


@pytest.mark.parametrize("line,why", [
    ("X\t1", "not a tcpipstat record"),
    ("R\tclose\t2\t0\t7f000001\t1\t0\t7f000001\t2\t0\tx\tBogus=1", "unknown counter"),
    ("R\tweird\t2\t0\t7f000001\t1\t0\t7f000001\t2\t0\tx", "unknown reason"),
    ("R\tclose\t7\t0\t7f000001\t1\t0\t7f000001\t2\t0\tx", "unknown address family"),
    ("R\tclose\t2\t0\t7f000001\t70000\t0\t7f000001\t2\t0\tx", "port out of range"),
    ("R\tclose\t2\t0\tzz\t1\t0\t7f000001\t2\t0\tx", "bad number"),
    ("H\ttcpipstat\t99\tv\t1\t0\t8\tA", "record format 99"),
])
def test_parse_errors_name_source_line_and_text(line, why):
    header = "H\ttcpipstat\t1\t0.1.0\t1\t0\t8192\tSendBytes,InSegs"
    p = Parser("capture.out")
    p.parse_line(header, 1)
    with pytest.raises(RecordParseError) as e:
        p.parse_line(line, 7)
    msg = e.value.message
    assert msg.startswith("capture.out:7:") and why in msg and repr(line)[1:20] in msg


def test_record_before_header_is_an_error():
    with pytest.raises(RecordParseError):
        parse_text("R\tclose\t2\t0\t1\t1\t0\t1\t2\t0\tx\n")


def test_comm_escapes():
    assert unescape_comm("plain") == "plain"
    assert unescape_comm("a\\tb\\\\c\\\"") == 'a\tb\\c"'
    assert unescape_comm("x\\033y") == "x\x1by"


@pytest.mark.parametrize("fields, want", [
    ("1700000000000\t12\t0\t0\t0", Trailer(1700000000000, 12, 0, 0, 0)),    # format 2, first
    ("1700000000000\t12\t1\t2\t3\t4",                                         # + pfull
     Trailer(1700000000000, 12, 1, 2, 3, 4, counts_records=True)),   # (IDS: records since)
    ("1700000000000\t12\t1\t2\t3\t4\t3",                                      # + ended
     Trailer(1700000000000, 12, 1, 2, 3, 4, 3, counts_records=True)),
])
def test_trailers_of_every_age_are_read(fields, want):
    p = Parser("t")
    assert p.parse_line("T\t" + fields, 1) == want == p.trailer


@pytest.mark.parametrize("fields, why", [
    ("1\t2\t3\t4\t5\t6\t9", "trailer: unknown end 9"),
    ("1\t2\t3\t4\t5\t6\t3\t0", "malformed trailer"),
    ("1\t2\t3", "malformed trailer"),
])
def test_a_bad_trailer_is_named(fields, why):
    with pytest.raises(RecordParseError) as e:
        Parser("t").parse_line("T\t" + fields, 7)
    assert str(e.value).startswith(f"t:7: {why}: 'T")     # source, line, reason, text


def test_real_recordings_say_what_ended_them():
    """Recorded in the lab (tests/fixtures/refresh.sh): a -c run, finished by the command's
    shell through the collector's control file, and a timeout run, finished by its timer."""
    from tcpipstat.records import ENDED_BY
    from .lab_workloads import TCPWORK_V4_PORTS
    ended = {}
    for name in ("bookworm-tcpwork-v4.ended", "trixie-timeout.ended"):
        p = Parser(name)
        recs = list(p.parse((FIXTURES / f"{name}.records").read_text().splitlines()))
        assert recs[-1] is p.trailer                                # the trailer is the last record
        ended[name] = ENDED_BY[p.trailer.ended]
    assert ended == {"bookworm-tcpwork-v4.ended": "request", "trixie-timeout.ended": "timeout"}
    # everything the workload did is in the -c run's records: its exact bytes per server port
    ended_c = FIXTURES / "bookworm-tcpwork-v4.ended.records"
    status, out, err = run_cli("--from-records", str(ended_c), "--json", "index=lport")
    assert status == 0, err
    rows = {o["lport"]: o["counters"] for o in map(json.loads, out.splitlines())}
    for port, (n, up, down) in TCPWORK_V4_PORTS.items():
        assert (rows[port]["RecvBytes"], rows[port]["SendBytes"]) == (n * up, n * down)
    # the timeout run's window is the timeout: it ends at the deadline, in the timer
    status, out, err = run_cli("--from-records", str(FIXTURES / "trixie-timeout.ended.records"))
    assert status == 0 and "0 rows, index=tuple, 1.0 s" in out, out + err


# every recording: the lab's (stap 4.8 and 5.1) and this host's (bpftrace), of every age
RECORDINGS = sorted([*FIXTURES.glob("*.records"), *FIXTURES.glob("*/*.records")])


def _trailer_and_arrivals(path) -> tuple[Trailer, int]:
    p = Parser(path.name)
    recs = list(p.parse(x for x in path.read_text().splitlines() if not x.startswith("#")))
    return p.trailer, sum(isinstance(r, SocketRecord) for r in recs)


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
def test_a_trailer_counts_the_socket_records_that_came_before_it(path):
    """Where the trailer counts records (it has PFULL), it counts exactly those a whole
    run delivered: fewer is a loss, and none of these whole runs shows one."""
    t, arrived = _trailer_and_arrivals(path)
    if t.counts_records:
        assert t.ids == arrived and t.lost_records(arrived) == 0
        assert t.lost_records(arrived - 2) == 2
    else:                                       # (IDS then counted sockets, not records)
        assert t.lost_records(0) == 0


def test_recordings_whose_trailer_counts_records_come_from_every_collector():
    counting = {p.name for p in RECORDINGS if _trailer_and_arrivals(p)[0].counts_records}
    assert {"bookworm-tcpwork-v4.ended.records", "trixie-rfc4898.records",      # stap 4.8, 5.1
            "native-both-ends.records", "attribution-native.records"} <= counting  # bpftrace
    assert "bookworm-tcpwork-v4.records" not in counting                       # (5 fields)


def test_the_docstring_lists_each_record_kind_as_its_spec():
    import tcpipstat.records as records
    documented = re.findall(r"^``([A-Z])  ([A-Z_ ]+)``$", records.__doc__, re.M)
    assert {k: n.split() for k, n in documented} == {
        s.kind: [f.name for f in s.fields] for s in (*records.SPECS, records.SNAPSHOT)}


def test_the_trailer_and_header_hold_their_specs_fields_in_order():
    from dataclasses import fields
    from tcpipstat.records import HEADER, TRAILER, Header
    assert [f.name.lower() for f in TRAILER.fields] == [f.name for f in fields(Trailer)
                                                        if not f.kw_only]
    assert [f.name.lower() for f in HEADER.fields[1:]] == [f.name for f in fields(Header)]


def test_record_formats_come_from_the_specs():
    from tcpipstat.records import HEADER, SOCKET, SOCKET_FORMAT1, SOCKET_FORMAT2, TRAILER
    assert SOCKET.printf() == "R\t%s\t%d\t%x\t%x\t%d\t%x\t%x\t%d\t%d\t%s\t%d\t%d\t%d"
    assert (SOCKET.width, SOCKET_FORMAT2.width, SOCKET_FORMAT1.width) == (14, 12, 11)
    assert (SOCKET.at("PID"), SOCKET.at("FLAGS"), SOCKET.at("NETNS")) == (9, 11, 13)
    assert TRAILER.printf() == "T" + "\t%d" * 7 + "\n"
    assert (TRAILER.min_width, TRAILER.width) == (6, 8)
    assert HEADER.printf(MAGIC="tcpipstat", FORMAT=2, VERSION="v", MAX_SOCKETS=8, COUNTERS="A,B") \
        == "H\ttcpipstat\t2\tv\t%d\t%d\t8\tA,B\n"
    with pytest.raises(KeyError):
        TRAILER.printf(NOPE=1)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.records")), ids=lambda p: p.name)
def test_save_headers_read_back_as_written(path):
    from tcpipstat.records import SaveHeader
    first = path.read_text().splitlines(keepends=True)[0]
    head = SaveHeader.read(first)
    assert SaveHeader.read(head.line()) == head and head.kernel.startswith("6.")
    if "; tree=" in first:       # (tcpipstat 0.1 wrote no tree= field)
        # (cong recordings made before dist= existed read as dist=1: they show their histograms)
        assert head.line() == first or ("; dist=" not in first and head.dist
                                         and head.line().replace("; dist=1", "") == first)
    assert SaveHeader.read("H\ttcpipstat\t2\n") is None


def test_save_header_fields():
    from tcpipstat.records import SaveHeader
    head = SaveHeader("6.1", ("DelayedACKs", "InSegs"), True, "kprobes: tcp_ack, x",
                      dist=False, rfc4898=True)
    line = head.line()
    assert line == ("# tcpipstat records; kernel=6.1; unavailable=DelayedACKs,InSegs; tree=1; "
                    "cong=kprobes: tcp_ack, x; dist=0; rfc4898=1\n")
    assert SaveHeader.read(line) == head
    assert SaveHeader.read("# tcpipstat records; kernel=k; unavailable=\n") == SaveHeader("k")


def test_the_footer_gives_the_collectors_reason_for_unavailable_counters(tmp_path):
    """A saved run keeps its collector's reason (bpftrace's) and reports it; a stap run's
    header has none, and the footer says a probe did not resolve."""
    from tcpipstat.records import SaveHeader
    lines = (FIXTURES / "bookworm-tcpwork-v4.records").read_text().splitlines(keepends=True)
    for why, shown in (("", "probe did not resolve"),
                       ("no tracepoint counts it exactly", "no tracepoint counts it exactly")):
        head = SaveHeader("6.18", ("InSegs",), why_unavailable=why)
        assert SaveHeader.read(head.line()) == head
        saved = tmp_path / "r.records"
        saved.write_text(head.line() + "".join(lines[1:]))
        status, out, err = run_cli("--from-records", str(saved), "nozeros=0")
        assert status == 0 and f"({shown}, not zero): InSegs" in " ".join(out.split()), out
