"""Tier 1: --outcome-json, the machine-readable end of a run, on real recordings: it says
what the report's notes say, and it is written even when the run then fails."""
from __future__ import annotations

import json

from tcpipstat.outcome import Outcome, documented_fields, run_notes

from .conftest import FIXTURES, run_cli


def _run(tmp_path, *argv):
    path = tmp_path / "outcome.json"
    status, out, err = run_cli(*argv, "--outcome-json", str(path))
    return status, out, err, json.loads(path.read_text()) if path.exists() else None


def test_a_timeout_run_says_what_ended_it(tmp_path):
    status, out, err, o = _run(tmp_path, "--from-records",
                               str(FIXTURES / "trixie-timeout.ended.records"))
    assert status == 0 and o["ended_by"] == "timeout" and o["finished"], o
    assert o["rows"] == int(out.split()[1]) and f", {o['duration_s']:.1f} s" in out.split("\n")[0]


def test_lost_events_are_in_the_outcome_although_the_run_fails(tmp_path):
    status, out, err, o = _run(tmp_path, "--from-records",
                               str(FIXTURES / "bookworm-table-too-small.records"), "--json")
    assert status == 1 and o["dropped"] > 0 and o["pfull"] > 0 and o["max_sockets"] == 64
    assert f"{o['dropped']} events were lost to full tables" in err
    # the notes are those printed under the report (stderr with --json)
    for note in o["notes"]:
        assert note.split(":")[0] in err.replace("\n", " ")


def test_notes_are_the_footers(tmp_path):
    status, out, err, o = _run(tmp_path, "--from-records",
                               str(FIXTURES / "bookworm-cong-dist.records"), "--top", "1")
    assert status == 0 and o["hidden"] > 0 and o["cong"].startswith("tracepoint")
    assert o["notes"] == run_notes(Outcome(cong=o["cong"], hidden=o["hidden"], top=1,
                                           sort="bytes"))
    flat = " ".join(out.split())
    assert all(" ".join(n.split()) in flat for n in o["notes"]), (o["notes"], out)


def test_a_capture_has_an_outcome(tmp_path):
    status, out, err, o = _run(tmp_path, "--read", str(FIXTURES / "capture" / "lo.pcap"))
    assert status == 0 and o["rows"] == int(out.split()[1]) > 0 and o["available"], o
    assert o["capture"] and all(" ".join(n.split()) in " ".join(out.split()) for n in o["notes"])


def test_an_unwritable_outcome_file_is_refused_before_anything_runs(tmp_path):
    for path, why in ((tmp_path, "it is a directory"),
                      (tmp_path / "no" / "such.json", "no folder")):
        status, out, err = run_cli("--from-records", str(FIXTURES / "bookworm-iperf3.records"),
                                   "--outcome-json", str(path))
        assert status == 2 and why in err and out == "", err


def test_every_field_is_documented():
    names = [n for n, _ in documented_fields()]
    assert names[:-1] == list(Outcome().as_dict())[:-1] and names[-1] == "notes"


def _disk_full(monkeypatch) -> None:
    """Writing the --series file fails as on a full disk."""
    import tcpipstat.series

    def full(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tcpipstat.series, "write_series", full)


def test_a_series_that_cannot_be_written_costs_no_report(tmp_path, monkeypatch):
    """The run has collected: its report comes first, then the error (exit 1)."""
    _disk_full(monkeypatch)
    status, out, err, o = _run(tmp_path, "--from-records",
                               str(FIXTURES / "bookworm-sample50.records"), "--json",
                               "--series", str(tmp_path / "s.csv"))
    assert status == 1 and len(out.splitlines()) == o["rows"] > 0, err
    assert "cannot write --series" in err and "No space left on device" in err
    assert o["unwritten"] and "No space left" in o["unwritten"][0]


def test_plot_without_matplotlib_is_refused_before_anything_runs(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    status, out, err = run_cli("--from-records", str(FIXTURES / "bookworm-sample50.records"),
                               "--plot", "x.png")
    assert status == 2 and "needs matplotlib" in err and out == ""


def test_lost_events_are_told_before_a_series_that_cannot_be_written(tmp_path, monkeypatch):
    """Both went wrong: the collector's loss is the error named; the series is a note."""
    _disk_full(monkeypatch)
    status, out, err, o = _run(tmp_path, "--from-records",
                               str(FIXTURES / "bookworm-table-too-small.records"), "--json",
                               "--series", str(tmp_path / "s.csv"))
    last = err.strip().splitlines()
    assert status == 1 and o["dropped"] and o["unwritten"]
    assert "events were lost to full tables" in " ".join(last[-2:]), err


def test_warnings_are_named_after_the_collector_that_ran():
    assert "bpftrace: Lost 3 events" in run_notes(Outcome(collector="bpftrace",
                                                          warnings=["Lost 3 events"]))
    assert "stap: WARNING: x" in run_notes(Outcome(warnings=["WARNING: x"]))
