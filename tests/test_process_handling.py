"""tcpipstat's handling of stap/staprun as processes, with scripted stand-ins
(tests/fakes): Ctrl-C, failures, warnings, missing counters, the module cache."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import FIXTURES, ROOT

FAKES = ROOT / "tests" / "fakes"
RECORDS = FIXTURES / "bookworm-tcpwork-v4.records"
ENDED_RECORDS = FIXTURES / "bookworm-tcpwork-v4.ended.records"  # (its trailer counts records)


def tcpipstat(args, tmp_path, **env):
    e = {**os.environ, "TCPIPSTAT_STAP": f"{sys.executable} {FAKES / 'fake_stap.py'}",
         "TCPIPSTAT_STAPRUN": f"{sys.executable} {FAKES / 'fake_staprun.py'}",
         "TCPIPSTAT_CACHE": str(tmp_path / "cache"), "FAKE_RECORDS": str(RECORDS),
         "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, "-m", "tcpipstat", "-r", "9.9-fake", *args], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_normal_run_reports(tmp_path):
    p = tcpipstat(["--json", "index=lport"], tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    rows = {o["lport"]: o for o in map(json.loads, out.splitlines())}
    assert rows[7001]["counters"]["PassiveOpens"] == 3
    # the module was cached: a second run with another filter does not compile again
    mods = list((tmp_path / "cache" / "modules").iterdir())
    p = tcpipstat(["--json", "*:7001-*:*"], tmp_path, FAKE_STAP_MODE="fail-p4")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert list((tmp_path / "cache" / "modules").iterdir()) == mods


def test_ctrl_c_during_collection_reports_and_exits_130(tmp_path):
    p = tcpipstat(["index=lport"], tmp_path, FAKE_STAPRUN_MODE="wait-int")
    seen = ""
    deadline = time.time() + 60
    while "collecting" not in seen and time.time() < deadline:  # wait until staprun runs
        seen += p.stderr.readline()
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Local port: 7001" in out and "PassiveOpens 3" in out
    assert "skipped 3 probe hits" in out


def test_collector_dying_keeps_the_data_and_names_the_fix(tmp_path):
    p = tcpipstat(["index=lport"], tmp_path, FAKE_STAPRUN_MODE="die")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "Local port: 7001" in out                       # partial data shown
    assert "overhead guard" in err and "--no-overload-guard" in err
    assert "did not finish normally" in out


def test_compile_failure_is_one_line(tmp_path):
    p = tcpipstat([], tmp_path, FAKE_STAP_MODE="fail-p4")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and out == ""
    assert "compile (stap -p4) failed: semantic error: type mismatch" in err


def test_missing_debuginfo_names_the_package(tmp_path):
    p = tcpipstat([], tmp_path, FAKE_STAP_MODE="no-debuginfo")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "debug information is missing" in err and "-dbg" in err


def test_counters_whose_probe_is_missing_are_unavailable_not_zero(tmp_path):
    p = tcpipstat(["--json", "index=lport"], tmp_path,
                  FAKE_STAP_MISSING="tcp_delack_timer_handler,ip_defrag")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    obj = json.loads(out.splitlines()[0])
    assert obj["counters"]["DelayedACKs"] is None and obj["counters"]["ReasmReqds"] is None
    assert "DelayedACKs" in err and "Unavailable" in err
    p = tcpipstat(["nozeros=0", "index=lport"], tmp_path,
                  FAKE_STAP_MISSING="tcp_delack_timer_handler")
    out, _ = p.communicate(timeout=60)
    assert "DelayedACKs n/a" in out


def test_not_root_is_refused_before_stap(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        from tcpipstat import stap
        monkeypatch.setattr(stap.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("TCPIPSTAT_STAP", raising=False)
    monkeypatch.delenv("TCPIPSTAT_STAPRUN", raising=False)
    monkeypatch.setenv("PATH", str(FAKES) + ":" + os.environ["PATH"])
    (tmp_path / "stap").write_text("#!/bin/sh\nexit 99\n")
    (tmp_path / "staprun").write_text("#!/bin/sh\nexit 99\n")
    for f in ("stap", "staprun"):
        (tmp_path / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    from .conftest import run_cli
    status, out, err = run_cli("timeout=1")
    assert status == 1 and "needs root" in err and "sudo" in err


def test_psutil_names_the_owner_of_a_live_socket():
    import socket

    from tcpipstat.model import SocketTotals
    from tcpipstat.procs import fill_processes
    from tcpipstat.records import Tuple

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    try:
        la, lp = cli.getsockname()
        ra, rp = cli.getpeername()
        st = SocketTotals(Tuple(2, 0x7F000001, lp, 0x7F000001, rp), {"InSegs": 1})
        assert fill_processes([st]) == 1
        assert st.pid == os.getpid() and st.comm
    finally:
        cli.close()
        srv.close()


def test_an_unreadable_line_costs_that_line_only(tmp_path):
    p = tcpipstat(["--json", "index=lport"], tmp_path, FAKE_STAPRUN_MODE="garble")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    rows = {o["lport"]: o for o in map(json.loads, out.splitlines())}
    assert rows[7002]["counters"]["PassiveOpens"] == 2          # the rest is all there
    assert "2 lines from the collector were not records" not in err
    assert "1 lines from the collector were not records and were skipped" in err
    assert "unreadable lines from the collector" in err


@pytest.mark.parametrize("mode", ["transport", "vanish"])
def test_a_record_the_trailer_counts_but_never_came_is_told(tmp_path, mode):
    """The trailer counts the socket records the module wrote: one that did not arrive is
    a loss (exit 1), told or not by the runtime, not a note beside exit 0 (a loaded lab
    run, stap 4.8, once ended so). The module's count of the writes its relay buffer
    refused comes first, as the cause; the records' count says how many."""
    outcome = tmp_path / "outcome.json"
    p = tcpipstat(["--json", "index=lport", "--outcome-json", str(outcome)], tmp_path,
                  FAKE_STAPRUN_MODE=mode, FAKE_RECORDS=str(ENDED_RECORDS))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    o = json.loads(outcome.read_text())
    assert (o["lost_records"], o["lost_writes"]) == (1, 1 if mode == "transport" else 0)
    assert "1 socket records the stap collector wrote did not arrive" in err
    first = "stap's transport lost 1" if mode == "transport" else "1 socket records the"
    assert err.splitlines()[-2].startswith(f"tcpipstat: {first}"), err
    assert len(out.splitlines()) == 6     # the rest: 7 ports less the one whose record was lost
    assert {json.loads(line)["lport"] for line in out.splitlines()} >= {7001, 7002}
    if mode == "transport":
        assert "SystemTap before 5.1 drops a write" in err
        assert "another stap session" not in err        # not the control channel's failure


@pytest.mark.parametrize("mode", ["timing", "timing-early"])
def test_stap_t_timing_report_passes_through(tmp_path, mode):
    """--stap-arg=-t: the module's per-probe report (recorded in the lab) follows the
    records on stdout (its lock contention lines may come first); it goes to stderr and
    into saved records as comments, and is not taken for unreadable records."""
    saved = tmp_path / "saved.records"
    p = tcpipstat(["--json", "index=lport", "--stap-arg=-t", "--save-records", str(saved)],
                  tmp_path, FAKE_STAPRUN_MODE=mode,
                  FAKE_TIMING=str(FIXTURES / "bookworm-stap-t-report.txt"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    rows = {o["lport"]: o for o in map(json.loads, out.splitlines())}
    assert rows[7001]["counters"]["PassiveOpens"] == 3
    assert "----- probe hit report" in err and "lock contention occurred" in err
    assert "# ----- probe hit report" in saved.read_text()
    p = subprocess.run([sys.executable, "-m", "tcpipstat", "--from-records", str(saved),
                        "--json", "index=lport"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and p.stdout == out, p.stderr


def _passes(log):
    """[(event, pass, time)] from the fake stap's log."""
    return [(e, p, float(t))
            for e, p, t in (line.split() for line in log.read_text().splitlines())]


def test_a_cold_start_compiles_while_the_probe_check_runs(tmp_path):
    """Every point exists: the module compiled from the unchecked script is used, and the
    compile runs while the probe check does (the fake stap's log of when each pass started
    and ended shows it, whatever else the machine is doing)."""
    log = tmp_path / "stap.log"
    p = tcpipstat(["--json", "index=lport"], tmp_path, FAKE_STAP_LOG=str(log), FAKE_STAP_P2_S="1.5",
                  FAKE_STAP_P4_S="2")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ev = _passes(log)
    assert [p for e, p, _ in ev if e == "start"].count("p4") == 1          # one compile
    p2_end = next(t for e, p, t in ev if (e, p) == ("end", "p2"))
    p4_start = next(t for e, p, t in ev if (e, p) == ("start", "p4"))
    assert p4_start < p2_end, ev
    assert len(list((tmp_path / "cache" / "modules").iterdir())) == 1


def test_a_kernel_without_a_point_cancels_the_guess(tmp_path):
    """The probe check drops a unit: the speculative compile is stopped and the checked
    script compiled; the module in use is the checked one (no DelayedACKs probe)."""
    log = tmp_path / "stap.log"
    p = tcpipstat(["--json", "index=lport"], tmp_path, FAKE_STAP_LOG=str(log), FAKE_STAP_P2_S="0.5",
                  FAKE_STAP_P4_S="3", FAKE_STAP_MISSING="tcp_delack_timer_handler")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    ev = _passes(log)
    assert [p for e, p, _ in ev if e == "start"].count("p4") == 2
    mods = list((tmp_path / "cache" / "modules").iterdir())
    assert len(mods) == 1 and "tcp_delack_timer_handler" not in mods[0].read_text()
    assert json.loads(out.splitlines()[0])["counters"]["DelayedACKs"] is None   # unavailable, not 0


# ---- the end of a run: the module finishes (everything out, then the trailer) and only
# then exits, so that stapio < 5.1 (PR31597) has read it all before it stops reading ----

def _toolchain(version):
    from tcpipstat.stap import Toolchain
    return Toolchain(["stap"], ["staprun"], _version=version)


@pytest.mark.parametrize("version, wait", [
    ("Systemtap translator/driver (version 4.8/0.188, Debian version 4.8-2)", 500),
    ("Systemtap translator/driver (version 4.9/0.189, commit release-4.9)", 500),
    ("Systemtap translator/driver (version 5.1/0.192, Debian version 5.1-5)", 0),
    ("Systemtap translator/driver (version 5.3/0.193, commit release-5.3)", 0),
    ("Systemtap translator/driver (version 10.0/0.200, future)", 0),
    ("unknown", 500),
])
def test_the_drain_wait_is_for_staprun_before_5_1(version, wait):
    assert _toolchain(version).drain_ms() == wait


def _run_wrapper(command, finish, drain_ms):
    import shlex
    from tcpipstat.stap import command_wrapper
    argv = shlex.split(command_wrapper(command, finish, drain_ms))   # as stapio's wordexp splits it
    t0 = time.monotonic()
    rc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return rc, time.monotonic() - t0


def test_the_command_wrapper_runs_the_command_then_finishes_and_waits(tmp_path):
    finish = tmp_path / "tcpipstat_abc" / "finish"
    finish.parent.mkdir()
    out = tmp_path / "out"
    # quotes, $, ; and a subshell reach the command's own shell intact; its status is kept
    cmd = f"""echo "it's $((1 + 2))" > {out}; (exit 7)"""
    r, took = _run_wrapper(cmd, finish, 500)
    assert r.returncode == 7, r.stderr
    assert out.read_text() == "it's 3\n"
    assert finish.read_text() == "1\n"                 # the module was told to finish
    assert took >= 0.5                                 # ... and had 500 ms to be read


def test_the_command_wrapper_without_a_module_does_not_wait_or_fail(tmp_path):
    finish = tmp_path / "no-such-module" / "finish"
    r, took = _run_wrapper("true", finish, 5000)
    assert r.returncode == 0 and r.stderr == ""
    assert took < 5 and not finish.exists()


def _sleeper() -> subprocess.Popen:
    """A stand-in for staprun that SIGINT ends. Its SIGINT is reset to the default: a shell
    that starts the suite in the background (CI scripts do) makes its children ignore it."""
    return subprocess.Popen(["sleep", "30"],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_asks_the_module_to_finish_first_then_signals(tmp_path):
    from tcpipstat.stap import Collector
    ko = tmp_path / "tcpipstat_abc.ko"
    (tmp_path / "proc" / "tcpipstat_abc").mkdir(parents=True)
    c = Collector(_toolchain("unknown"), ko, [], None, procfs_root=tmp_path / "proc")
    c._proc = _sleeper()
    try:
        c.interrupt()                                  # first: the control file, no signal
        assert (tmp_path / "proc" / "tcpipstat_abc" / "finish").read_text() == "1\n"
        assert c._proc.poll() is None and c.outcome.interrupted
        c.interrupt()                                  # second: SIGINT to staprun
        assert c._proc.wait(timeout=10) == -signal.SIGINT
    finally:
        if c._proc.poll() is None:
            c._proc.kill()


def test_ctrl_c_without_a_control_file_signals_at_once(tmp_path):
    from tcpipstat.stap import Collector
    c = Collector(_toolchain("unknown"), tmp_path / "tcpipstat_x.ko", [], None,
                  procfs_root=tmp_path)
    c._proc = _sleeper()
    try:
        c.interrupt()
        assert c._proc.wait(timeout=10) == -signal.SIGINT
    finally:
        if c._proc.poll() is None:
            c._proc.kill()
