"""Tier 1: the compiled reader of socket records (tcpipstat/csrc_records: tcpipstat._records)
against the pure-Python Parser, the reference (tcpipstat/records.py).

* the same records (same types at every level, same values, fields and counters in the
  same order) and the same RecordParseError (source, line number, text, reason), line by
  line, on every recorded stream under tests/fixtures, on the bench's synthetic streams,
  on a socket record of every reason the Python parser can refuse one for, on lines that
  Python reads in ways the compiled reader leaves to it (signs, spaces, underscores, 0x,
  numbers beyond 64 bits, escapes, non-ASCII), and on random edits of real lines;
* that the compiled reader did read the plain lines itself (not Python against Python);
* without the extension (not built, broken or stale), Parser reads every line itself and
  the reports are the same.

The extension must be built (``python3 setup.py build_ext --inplace`` or ``pip install .``):
without it these fail, saying so, rather than compare Python with itself.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import tracemalloc
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpipstat import records
from tcpipstat.errors import RecordParseError
from tcpipstat.records import (REASONS, SOCKET, SOCKET_FORMAT1, SOCKET_FORMAT2, Parser,
                               SocketRecord, Tuple)

from .conftest import FIXTURES, ROOT, run_cli

SPEC_OF_FORMAT = {1: SOCKET_FORMAT1, 2: SOCKET_FORMAT2, 3: SOCKET}
COUNTERS = ("SendBytes", "RecvBytes", "InSegs")
PLAIN = dict(REASON="close", FAMILY="2", LADDR_HI="0", LADDR_LO="7f000001", LPORT="39634",
             RADDR_HI="0", RADDR_LO="7f000001", RPORT="7001", PID="108", COMM="tcpwork",
             FLAGS="1", CGROUP="4242", NETNS="4026531840")
# the recorded streams: the collectors' records, and bpftrace's raw output (lines of other
# kinds among them: both parsers must refuse those alike)
STREAMS = sorted(p for p in FIXTURES.rglob("*") if p.suffix in (".records", ".out", ".stdout"))


@pytest.fixture(autouse=True)
def _compiled_reader_is_built():
    if records._compiled is None:
        pytest.fail(f"the compiled record reader is not built ({records.UNAVAILABLE}): "
                    "`python3 setup.py build_ext --inplace` builds it")


def shape(value):
    """``value`` with the type of every part: a record's fields in their order (vars), a
    dict's items in their order; so that True and 1, or a tuple and a Tuple, differ."""
    if dataclasses.is_dataclass(value):
        return type(value), [(k, shape(v)) for k, v in vars(value).items()]
    if isinstance(value, tuple):
        return type(value), [shape(v) for v in value]
    if isinstance(value, dict):
        return dict, [(shape(k), shape(v)) for k, v in value.items()]
    return type(value), value


def outcome(parser: Parser, line: str, lineno: int):
    try:
        return shape(parser.parse_line(line, lineno))
    except RecordParseError as e:
        return "error", e.source, e.lineno, e.line, e.why, str(e)


def agree(lines, source: str = "stream") -> int:
    """Both parsers line by line over ``lines``, which must give the same outcomes;
    returns how many lines the compiled reader read itself."""
    fast, ref = Parser(source), Parser(source, compiled=False)
    assert fast.compiled and not ref.compiled
    compiled = 0
    for n, line in enumerate(lines, 1):
        compiled += fast._fast is not None and fast._fast(line) is not None
        assert outcome(fast, line, n) == outcome(ref, line, n), (n, line)
    return compiled


def header(fmt: int = 3, counters=COUNTERS) -> str:
    return f"H\ttcpipstat\t{fmt}\t0.1.0\t1700000000000\t0\t8192\t{','.join(counters)}"


def rline(fmt: int = 3, pairs: str = "SendBytes=1000\tInSegs=4", **fields: str) -> str:
    """A socket record of format ``fmt``: PLAIN's fields with ``fields`` instead."""
    values = {**PLAIN, **fields}
    spec = SPEC_OF_FORMAT[fmt]
    return "\t".join(["R"] + [values[f.name] for f in spec.fields] + ([pairs] if pairs else []))


def _bench():
    spec = importlib.util.spec_from_file_location("python_side", ROOT / "bench" / "python_side.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_recording_reads_the_same(path):
    lines = path.read_text().splitlines(keepends=True)
    compiled = agree(lines, path.name)
    # every socket record of the recordings is plain, but those with a histogram field
    # (--dist) not seen before: Python sees it valid first
    sockets, firsts, seen = 0, 0, set()
    for line in lines:
        if line.startswith("R\t"):
            hist = {x.partition("=")[0] for x in line.split("\t") if x.startswith("h.")}
            sockets, firsts, seen = sockets + 1, firsts + bool(hist - seen), seen | hist
    assert compiled == sockets - firsts
    assert firsts == {"bookworm-cong-dist.records": 3, "trixie-cong-dist.records": 3}.get(
        path.name, 0)


def test_streams_hold_what_the_test_needs():
    """(the recordings above include every record format and IPv6)"""
    heads = [line for p in STREAMS for line in p.read_text().splitlines()
             if line.startswith("H\ttcpipstat\t")]
    assert {h.split("\t")[2] for h in heads} == {"1", "2", "3"}
    assert any(line.startswith("R\t") and line.split("\t")[2] == "10"
               for p in STREAMS for line in p.read_text().splitlines())


@pytest.mark.parametrize("distinct", [False, True])
def test_the_bench_stream_reads_the_same(distinct):
    lines = _bench().make_stream(5000, 10000, distinct)
    assert agree(lines, "bench") == 10000          # every socket record, by the compiled reader


# A socket record's fields (over PLAIN), its NAME=VALUE fields, and what happens:
# "plain": the compiled reader reads it; "python": the compiled reader leaves it to Python,
# which reads it; any other text: the Python parser's reason for refusing it.
CASES = [
    ({}, "SendBytes=1000\tInSegs=4", "plain"),
    ({}, "", "plain"),                                            # no counters
    ({"REASON": "spill"}, "SendBytes=1", "plain"),
    ({"REASON": "interval"}, "SendBytes=1", "plain"),
    ({"REASON": "end"}, "SendBytes=1", "plain"),
    ({"FAMILY": "10", "LADDR_HI": "20010db800000000", "LADDR_LO": "1",
      "RADDR_HI": "FE80000000000000", "RADDR_LO": "ffffffffffffffff"}, "InSegs=1", "plain"),
    ({"FAMILY": "010", "LADDR_LO": "0000000000000000000000007f000001"}, "InSegs=1", "plain"),
    ({"LPORT": "0", "RPORT": "65535"}, "InSegs=1", "plain"),
    ({"PID": "-1", "FLAGS": "-1", "COMM": ""}, "InSegs=1", "plain"),
    ({"PID": "0", "FLAGS": "2", "COMM": "has space=1"}, "InSegs=1", "plain"),
    ({"FLAGS": "3", "CGROUP": "18446744073709551615", "NETNS": "0"}, "InSegs=1", "plain"),
    ({}, "SendBytes=-5\tRecvBytes=9223372036854775807\tInSegs=007", "plain"),
    ({}, "SendBytes=1\tInSegs=2\tSendBytes=3", "plain"),           # the last one counts
    ({}, "SendBytes=1\n\n", "plain"),                               # newlines stripped
    ({"LPORT": "+80"}, "InSegs=1", "python"),
    ({"RPORT": " 80"}, "InSegs=1", "python"),
    ({"PID": "1_000"}, "InSegs=1", "python"),
    ({"PID": "٣"}, "InSegs=1", "python"),                           # a digit, not ASCII
    ({"LADDR_LO": "0x7f000001"}, "InSegs=1", "python"),
    ({"RADDR_LO": "7f_000001"}, "InSegs=1", "python"),
    ({"COMM": "a\\tb"}, "InSegs=1", "python"),
    ({"COMM": "x\\033y"}, "InSegs=1", "python"),
    ({"COMM": "né"}, "InSegs=1", "python"),
    ({"FLAGS": "+1", "CGROUP": "00042"}, "InSegs=1", "python"),
    ({}, "SendBytes= 7", "python"),
    ({}, "SendBytes=7\r", "python"),
    ({}, "SendBytes=+7", "python"),
    ({}, "SendBytes=9223372036854775808", "python"),                # beyond 64 bits signed
    ({}, "SendBytes=-9223372036854775808", "python"),
    ({}, "SendBytes=" + "9" * 30, "python"),
    ({}, "h.1.3=2", "python"),                                      # a histogram field, new
    ({"REASON": "weird"}, "InSegs=1", "unknown reason 'weird'"),
    ({"REASON": "Close"}, "InSegs=1", "unknown reason 'Close'"),
    ({"FAMILY": "7"}, "InSegs=1", "unknown address family 7"),
    ({"FAMILY": "x"}, "InSegs=1", "bad number"),
    ({"LPORT": "65536"}, "InSegs=1", "port out of range"),
    ({"RPORT": "-1"}, "InSegs=1", "port out of range"),
    ({"LADDR_LO": "zz"}, "InSegs=1", "bad number"),
    ({"LADDR_HI": "-1"}, "InSegs=1", "bad number (-1)"),
    ({"RADDR_LO": "1" + "0" * 16}, "InSegs=1", "bad number (10000000000000000)"),
    ({"RADDR_HI": ""}, "InSegs=1", "bad number"),
    ({"PID": "x"}, "InSegs=1", "bad number"),
    ({"FLAGS": "x"}, "InSegs=1", "bad number"),
    ({"CGROUP": "-1"}, "InSegs=1", "bad number (-1)"),
    ({"NETNS": str(1 << 64)}, "InSegs=1", "bad number (18446744073709551616)"),
    ({}, "SendBytes=x", "bad number"),
    ({}, "SendBytes=1=2", "bad number"),
    ({}, "SendBytes=", "bad number"),
    ({}, "Bogus=1", "unknown counter 'Bogus'"),
    ({}, "InSegs=1\tBogus=1", "unknown counter 'Bogus'"),
    ({}, "SendBytes", "unknown counter 'SendBytes'"),
    ({}, "=5", "unknown counter ''"),
    ({}, "SendBytes=1\t", "unknown counter ''"),
    ({}, "h.9.0=1", "unknown counter 'h.9.0'"),
    ({}, "h.1.64=1", "unknown counter 'h.1.64'"),
]
# which formats have the fields a case changes
_FORMAT_CASES = [(fmt, fields, pairs, want) for fmt in (1, 2, 3) for fields, pairs, want in CASES
                 if set(fields) <= {f.name for f in SPEC_OF_FORMAT[fmt].fields}]


@pytest.mark.parametrize("fmt, fields, pairs, want", _FORMAT_CASES)
def test_each_kind_of_line_reads_the_same(fmt, fields, pairs, want):
    line = rline(fmt, pairs, **fields)
    fast, ref = Parser("capture.out"), Parser("capture.out", compiled=False)
    for p in (fast, ref):
        p.parse_line(header(fmt), 1)
    compiled = fast._fast(line) is not None
    got, expected = outcome(fast, line, 7), outcome(ref, line, 7)
    assert got == expected
    if want in ("plain", "python"):
        assert expected[0] is SocketRecord and compiled == (want == "plain")
    else:
        assert expected[:4] == ("error", "capture.out", 7, line.rstrip("\n"))
        assert expected[4].startswith(want) and not compiled


def test_what_the_compiled_reader_makes():
    """The values themselves (the comparison above holds them to Python's)."""
    p = Parser("t")
    p.parse_line(header(), 1)
    line = rline(3, "SendBytes=7\tInSegs=-2", FAMILY="10", LADDR_HI="1", LADDR_LO="2",
                 FLAGS="3", CGROUP="18446744073709551615")
    rec = p._fast(line)
    assert type(rec) is SocketRecord and type(rec.tuple) is Tuple
    assert rec == SocketRecord("close", Tuple(10, (1 << 64) | 2, 39634, 0x7F000001, 7001), 108,
                               "tcpwork", {"SendBytes": 7, "InSegs": -2}, True,
                               (1 << 64) - 1, 4026531840)
    assert list(vars(rec)) == [f.name for f in dataclasses.fields(SocketRecord)]


def test_record_before_the_header_and_short_lines():
    lines = [rline(), header(), rline()[:40], "R", "R\t", "R\tclose", "\n", "# comment",
             "X\t1", "RR\tclose", "r\tclose", rline(), ""]
    assert agree(lines) == 1


def test_histogram_fields_are_read_by_the_compiled_reader_once_valid():
    line = rline(3, "h.1.3=2\th.0.0=1\tInSegs=1")
    assert agree([header(), line, line, rline(3, "h.0.0=5")]) == 2


def test_a_new_header_starts_over():
    """Names valid under one header are not under the next; the format changes the width."""
    lines = [header(3, ("SendBytes", "InSegs")), rline(3, "SendBytes=1"),
             header(1, ("InSegs",)), rline(1, "SendBytes=1"), rline(1, "InSegs=2"),
             rline(3, "InSegs=2")]
    assert agree(lines) == 2


_BASES = [(3, rline(3, "SendBytes=1000\tRecvBytes=100\tInSegs=4")),
          (3, rline(3, "InSegs=1", FAMILY="10", LADDR_HI="20010db800000000", LADDR_LO="1")),
          (2, rline(2, "h.1.3=2\tSendBytes=5")), (1, rline(1, "RecvBytes=77"))]


@settings(max_examples=400, deadline=None)
@given(base=st.sampled_from(_BASES),
       edits=st.lists(st.tuples(st.integers(0, 200), st.sampled_from("0123456789abcdefABCDEF"
                                                                       "xX-+_ =\t\\\n\r.h٣é")),
                      min_size=1, max_size=3),
       delete=st.booleans())
def test_edited_lines_read_the_same(base, edits, delete):
    """A character put in (or in place of another) up to three times: a line of either
    kind, read alike or refused alike."""
    fmt, line = base
    for at, c in edits:
        at %= len(line) + 1
        line = line[:at] + c + line[at + delete:]
    agree([header(fmt), line, line])


def test_no_memory_is_kept_per_line():
    """Lines read, left to Python half-way through their counters, or refused: the same
    memory after 20,000 rounds as after 2,000 (no reference left behind)."""
    p = Parser("t")
    p.parse_line(header(), 1)
    lines = [rline(), rline(pairs="SendBytes=1\tInSegs=2\tBogus=3"),
             rline(pairs="SendBytes=1\tInSegs=x"), rline(FAMILY="10", LADDR_HI="ff"),
             rline(COMM="a\\tb"), rline(REASON="weird")]
    tracemalloc.start()
    try:
        sizes = []
        for rounds in (2000, 18000):
            for _ in range(rounds):
                for line in lines:
                    p._fast(line)
            sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert sizes[1] - sizes[0] < 10_000


def test_a_bad_layout_is_refused():
    at = (1, 2, 9, 10, 11, 12, 13)
    with pytest.raises(ValueError):
        records._compiled.SocketLines(SocketRecord, Tuple, REASONS, set(), 5, at)
    with pytest.raises(TypeError):
        records._compiled.SocketLines(SocketRecord, dict, REASONS, set(), SOCKET.width, at)


def test_without_the_extension_python_reads_every_line(monkeypatch):
    """Not built (simulated): Parser reads alone, and every recording's report is the
    same, byte for byte, as with the compiled reader."""
    paths = sorted(FIXTURES.rglob("*.records"))
    with_compiled = [run_cli("--from-records", str(p), "--json", "index=lport") for p in paths]
    monkeypatch.setattr(records, "_compiled", None)
    p = Parser("t")
    p.parse_line(header(), 1)
    assert not p.compiled and p._fast is None
    without = [run_cli("--from-records", str(p), "--json", "index=lport") for p in paths]
    assert without == with_compiled
    failed = {p.name for p, (status, _, _) in zip(paths, without) if status}
    assert failed == {"bookworm-table-too-small.records"}      # (its collector lost events)


@pytest.mark.parametrize("found, why", [
    (ModuleNotFoundError("No module named 'tcpipstat._records'"),
     "it was not built (no C compiler or no Python headers when tcpipstat was installed)"),
    (ImportError("undefined symbol: PyFoo"), "undefined symbol: PyFoo"),
    (types.SimpleNamespace(FIELDS=("reason", "tuple")),
     "it was built from other sources than this tcpipstat's"),
])
def test_an_unusable_extension_is_not_used(monkeypatch, found, why):
    def import_module(name, package=None):
        assert (name, package) == ("._records", "tcpipstat")
        if isinstance(found, Exception):
            raise found
        return found
    monkeypatch.setattr(records.importlib, "import_module", import_module)
    assert records._load_compiled() == (None, why)
