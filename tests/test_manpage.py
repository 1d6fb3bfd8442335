from tcpipstat.cli import OPTIONS
from tcpipstat.counters import COUNTERS
from tcpipstat.manpage import render_man

from .conftest import ROOT


def test_committed_man_page_is_current():
    committed = (ROOT / "man" / "tcpipstat.8").read_text()
    assert committed == render_man(), "regenerate: python3 -m tcpipstat.manpage > man/tcpipstat.8"


def test_man_page_documents_every_option_and_field():
    text = render_man()
    for sec in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILTERS", "FIELDS", "EXAMPLES",
                "OVERHEAD", "REQUIREMENTS", "EXIT STATUS", "SEE ALSO"):
        assert f".SH {sec}" in text
    for o in OPTIONS:
        for f in o.flags:
            assert f.replace("-", "\\-") in text, f
    for c in COUNTERS:
        assert f"\\fB{c.name}\\fR" in text
