from importlib.resources import files

from tcpipstat.cli import OPTION_GROUPS, OPTIONS
from tcpipstat.counters import COUNTERS
from tcpipstat.manpage import PARTS, render_man

from .conftest import ROOT


def test_committed_man_page_is_current():
    committed = (ROOT / "man" / "tcpipstat.8").read_text()
    assert committed == render_man(), "regenerate: python3 -m tcpipstat.manpage > man/tcpipstat.8"


def test_man_page_documents_every_option_and_field():
    text = render_man()
    for sec in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILTERS", "FIELDS", "EXAMPLES",
                "OVERHEAD", "REQUIREMENTS", "EXIT STATUS", "SEE ALSO"):
        assert f".SH {sec}" in text
    for title, _ in OPTION_GROUPS:
        assert f".SS {title}" in text
    for o in OPTIONS:
        for f in o.flags:
            assert f.replace("-", "\\-") in text, f
    for c in COUNTERS:
        assert f"\\fB{c.name}\\fR" in text


def test_the_prose_places_every_generated_part_and_stays_wrapped():
    prose = files("tcpipstat").joinpath("man_prose.txt").read_text(encoding="utf-8")
    lines = prose.splitlines()
    for name in PARTS:
        assert f"@{name}" in lines, name
    assert [n for n, line in enumerate(lines, 1) if len(line) > 100] == []
