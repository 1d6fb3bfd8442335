"""man/tcpipstat.8: the prose of tcpipstat/man_prose.txt, with what the code defines filled
in from the same definitions as --help (cli.OPTION_GROUPS), the index registry
(indexes.INDEXES) and the catalogues of counters, series, RFC 4898 variables and capture
fields:

    python3 -m tcpipstat.manpage > man/tcpipstat.8

tests/test_manpage.py fails when the committed page is out of date.
"""
from __future__ import annotations

import re
from importlib.resources import files
from typing import Callable, Iterable, Iterator

from . import __version__
from .bpftrace import BPF_NOTES, BPF_POINTS
from .capture.fields import FIELDS as CAPTURE_FIELDS
from .cli import OPTION_GROUPS, PROG, SUMMARY, Opt, synopsis, word_list
from .counters import COUNTERS, GROUPS, SECTIONS, UNITS
from .render import stap_point
from .estats import EVARS, TABLES as ESTATS_TABLES, UNAVAILABLE as ESTATS_UNAVAILABLE
from .filters import MAX_FILTERS
from .indexes import INDEXES, OFFLINE_NAMES
from .series import FIELDS as SERIES_FIELDS

_FACT = re.compile(r"\{\{(\w+)\}\}")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _esc(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in out.split("\n"))


def _sentence(text: str) -> str:
    """A catalogue description as a man-page sentence: capitalised, a full stop, escaped."""
    return _esc(text[0].upper() + text[1:] + ".")


def _bold(text: str) -> str:
    return f"\\fB{_esc(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{_esc(text)}\\fR"


def _facts() -> dict[str, str]:
    """What each {{NAME}} of the prose stands for."""
    process = [ix for ix in INDEXES if ix.needs_process]
    place = [ix for ix in INDEXES if ix.place]
    return {
        "prog": PROG,
        "version": __version__,
        "summary": SUMMARY,
        "max_filters": str(MAX_FILTERS),
        "counter_sections": " / ".join(SECTIONS),
        "counter_groups": ", ".join(GROUPS),
        "offline_indexes": "|".join(OFFLINE_NAMES),
        "live_only_indexes": word_list((f"index={ix.name}" for ix in INDEXES if not ix.offline),
                                       "and"),
        "process_indexes": word_list((f"index={ix.name}" for ix in process), "and"),
        "process_fields": word_list((f for ix in process for f in ix.fields), "and"),
        "place_indexes": word_list((f"index={ix.name}" for ix in place), "and"),
        "place_fields": word_list((f for ix in place for f in ix.fields), "and"),
    }


# ---- the generated parts (@NAME in the prose) ----

def _synopsis() -> Iterator[str]:
    for i, line in enumerate(synopsis(_bold, _italic)):
        if i:
            yield ".br"
        yield line


def _opt_line(o: Opt) -> str:
    takes = o.metavar and o.action in ("store", "append")
    flags = ", ".join(_bold(f) + (f" {_italic(o.metavar)}" if takes else "") for f in o.flags)
    if o.classic:
        flags += f", \\fB{o.classic}=\\fR\\fIVALUE\\fR"
    return flags


def _options() -> Iterator[str]:
    for title, opts in OPTION_GROUPS:
        yield f".SS {_esc(title)}"
        for o in opts:
            yield from (".TP", _opt_line(o), _sentence(o.help))


def _counters() -> Iterator[str]:
    for sec in SECTIONS:
        yield f".SS {sec}"
        for c in COUNTERS:
            if c.section != sec:
                continue
            where = sorted({stap_point(p) for u in UNITS if c.name in u.counters
                            for p in u.points})
            bpf = BPF_POINTS.get(c.name, "none (unavailable with --backend bpftrace)")
            bpf += BPF_NOTES.get(c.name, "")
            v4 = " IPv4 only: n/a (null) in rows of IPv6 sockets." if c.ipv4_only else ""
            yield from (".TP", f"\\fB{c.name}\\fR ({c.group})",
                        _sentence(f"{c.description}. Probes: {', '.join(where)}; bpftrace: "
                                  f"{bpf}") + _esc(v4))


def _series_fields() -> Iterator[str]:
    for f in SERIES_FIELDS:
        yield from (".TP", f"\\fB{f.name}\\fR \\(em {_esc(f.field)}", _sentence(f.description))


def _rfc4898_variables() -> Iterator[str]:
    for table in ESTATS_TABLES:
        yield f".SS {table}"
        for v in EVARS:
            if v.table == table:
                unit = v.unit + ", " if v.unit else ""
                yield from (".TP", f"\\fB{v.name}\\fR ({unit}{v.agg}) \\(em {_esc(v.field)}",
                            _sentence(v.description))


def _rfc4898_unavailable() -> Iterator[str]:
    for name, why in ESTATS_UNAVAILABLE:
        yield from (".TP", _bold(name), _sentence(why))


def _capture_fields() -> Iterator[str]:
    for c in CAPTURE_FIELDS:
        unit = ", " + c.unit if c.unit else ""
        yield from (".TP", f"\\fB{c.name}\\fR ({c.section}{unit})", _sentence(c.description))


def _outcome_fields() -> Iterator[str]:
    from .outcome import documented_fields
    for name, doc in documented_fields():
        yield from (".TP", _bold(name), _sentence(doc))


PARTS: dict[str, Callable[[], Iterable[str]]] = {
    "synopsis": _synopsis,
    "options": _options,
    "counters": _counters,
    "series_fields": _series_fields,
    "rfc4898_variables": _rfc4898_variables,
    "rfc4898_unavailable": _rfc4898_unavailable,
    "capture_fields": _capture_fields,
    "outcome_fields": _outcome_fields,
}


# ---- the prose ----

def _blocks(prose: str) -> Iterator[str]:
    """The prose's lines, each paragraph joined into one line, comments left out."""
    para: list[str] = []
    tag = False
    for line in prose.splitlines():
        if line.startswith('.\\"'):
            continue
        if tag or not line or line.startswith((".", "@")):
            if para:
                yield " ".join(para)
                para.clear()
            if line:
                yield line
        else:
            para.append(line)
        tag = line == ".TP"
    if para:
        yield " ".join(para)


def _roff(block: str, facts: dict[str, str]) -> Iterable[str]:
    if block.startswith("@"):
        return PARTS[block[1:]]()
    block = _FACT.sub(lambda m: facts[m.group(1)], block)
    if block.startswith("."):
        request, _, text = block.partition(" ")
        return [f"{request} {_esc(text)}" if text else request]
    return [_BOLD.sub(r"\\fB\1\\fR", _esc(block))]


def render_man() -> str:
    prose = files(__package__).joinpath("man_prose.txt").read_text(encoding="utf-8")
    facts = _facts()
    return "".join(line + "\n" for block in _blocks(prose) for line in _roff(block, facts))


if __name__ == "__main__":
    print(render_man(), end="")
