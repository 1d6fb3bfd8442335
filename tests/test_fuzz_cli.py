"""Tier 1, property-based: generated command lines against tcpipstat with the fake stap.

Whatever the command line, tcpipstat exits 0, 1, 2 or 130, never with a traceback;
its messages are one line each with no raw control character; input it refuses never
starts stap; and the script it generates never depends on the filters' text.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from .conftest import FIXTURES, run_cli

FAKES = Path(__file__).resolve().parent / "fakes"
RECORDS = FIXTURES / "bookworm-tcpwork-v4.records"

# hostile text: control characters, markup, quotes, non-ASCII digits and spaces
_PIECES = list("abc019:*.-/[]%=,'\"\\ ") + ["\n", "\x1b", "\t", "\x00", "\u0663", "\u00a0",
                                            "[red]", "[/]", "--", "..", "::"]
_HOSTILE = st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)
_NUMBERISH = st.one_of(st.integers(-5, 10 ** 7).map(str), st.sampled_from(
    ["0.05", "0.1", "1", "1e3", "nan", "inf", "-1", "", "\u0663", "1\n", "0x10", "64"]), _HOSTILE)
_ADDR = st.sampled_from(["*", "127.0.0.1", "10.0.0.0/8", "9.*.*.*", "[::1]", "[2001:db8::/32]",
                         "300.1.1.1", "[fe80::1%lo]", "1.2.3"])
_PORT = st.sampled_from(["*", "80", "8000..8080", "65536", "9..1", "x"])
_FILTER = st.one_of(st.builds(lambda a, p, b, q: f"{a}:{p}-{b}:{q}", _ADDR, _PORT, _ADDR, _PORT),
                    _HOSTILE)
_CLASSIC = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["index", "timeout", "interval", "nozeros", "onclose", "bogus"]),
    st.one_of(st.sampled_from(["tuple", "lport", "pid", "comm", "0", "1", "2", "raddr"]),
              _NUMBERISH))
_SWITCHES = ["--json", "--csv", "--zeros", "--onclose", "--cong", "--dist", "--rfc4898", "-T",
             "--all-processes", "--kprobes-only", "--no-overload-guard", "-u", "--dump-script",
             "--check", "-v"]
_VALUED = ["--index", "--timeout", "--interval", "--count", "--sort", "--top", "--groups",
           "--sample", "--max-sockets", "-r", "--stap-arg", "-x", "--from-records", "--read",
           "-c"]


def _token(out_dir: str):
    path = st.builds(lambda name: os.path.join(out_dir, name),
                     st.sampled_from(["a.csv", "a.png", "[red]b.png", "x\ny.json", "sub/c.json"]))
    written = st.builds(lambda o, p: [o, p], st.sampled_from(
        ["--series", "--plot", "--save-records", "--outcome-json"]), path)
    valued = st.builds(lambda o, v: [o, v] if o != "--stap-arg" else [f"{o}={v}"],
                       st.sampled_from(_VALUED), st.one_of(_NUMBERISH, _HOSTILE))
    return st.one_of(st.sampled_from(_SWITCHES).map(lambda s: [s]), valued, written,
                     _CLASSIC.map(lambda w: [w]), _FILTER.map(lambda f: [f]))


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory):
    """The fake stap and staprun, and a log of every stap call."""
    tmp = tmp_path_factory.mktemp("fuzz")
    log = tmp / "stap.log"
    env = {"TCPIPSTAT_STAP": f"{sys.executable} {FAKES / 'fake_stap.py'}",
           "TCPIPSTAT_STAPRUN": f"{sys.executable} {FAKES / 'fake_staprun.py'}",
           "TCPIPSTAT_CACHE": str(tmp / "cache"), "FAKE_RECORDS": str(RECORDS),
           "FAKE_STAP_LOG": str(log)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield tmp, log
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _no_raw_controls(text: str) -> bool:
    return all(c == "\n" or c.isprintable() for c in text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_command_line(fake_env, data):
    tmp, log = fake_env
    argv = [w for tok in data.draw(st.lists(_token(str(tmp / "out")), max_size=6)) for w in tok]
    (tmp / "out").mkdir(exist_ok=True)
    log.write_text("")
    status, out, err = run_cli("-r", "9.9-fake", *argv)
    assert status in (0, 1, 2, 130), (argv, status, err)
    assert "Traceback" not in err, (argv, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("tcpipstat: ")]
    assert all(_no_raw_controls(ln) for ln in lines), (argv, err)
    if status == 2:
        assert log.read_text() == "", (argv, "a refused command line started stap", err)
        assert len(lines) == 1, (argv, err)


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.sampled_from(["--cong", "--dist", "--rfc4898", "--sample=0",
                                        "--groups=socket,tcp", "--kprobes-only"]), max_size=3),
       filters=st.lists(_FILTER, max_size=4))
def test_the_script_never_depends_on_filter_text(groups, filters):
    status, bare, _ = run_cli("--dump-script", *groups)
    status_f, script, err = run_cli("--dump-script", *groups, *filters)
    assert status == 0 and (status_f == 2 or script == bare), (filters, err)
