"""Plan -> SystemTap script text (Jinja templates in tcpipstat/stp_templates/).

Only the probe units and the table size reach the script text; everything else
the user chooses travels as module parameters (see :func:`module_args`), so the
compiled module is reused for every filter, index, timeout and report option.
Nothing the user types is ever placed into the script text.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import jinja2

from . import __version__
from .counters import UNITS, counters_for_units
from .estats import EVARS
from .series import FIELDS as SFIELDS
from .filters import FILTER_FIELDS, MAX_FILTERS, Filter
from .records import FORMAT_VERSION, HEADER, MAGIC, SPECS


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tcpipstat", "stp_templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def select_units(unit_names: set[str] | frozenset[str]) -> list[str]:
    """Close a set of available unit names: drop a fallback whose preferred unit is
    there, and secondary units whose counter has no primary unit (their array would
    not exist)."""
    chosen = [u for u in UNITS if u.name in unit_names and u.fallback_for not in unit_names]
    fed = set(counters_for_units(chosen))
    return [u.name for u in chosen if u.primary or u.counters[0] in fed]


def _stap_string(text: str) -> str:
    """``text`` as the inside of a stap string literal."""
    return (text.replace("\\", "\\\\").replace('"', '\\"')
            .replace("\t", "\\t").replace("\n", "\\n"))


def record_formats(counters: list[str], max_sockets: int) -> dict[str, str]:
    """Each record kind's printf format (records.py's specs), as stap string literals'
    text; the header's constants are written into its format."""
    consts = {HEADER.kind: dict(MAGIC=MAGIC, FORMAT=FORMAT_VERSION, VERSION=__version__,
                                MAX_SOCKETS=max_sockets, COUNTERS=",".join(counters))}
    return {s.kind: _stap_string(s.printf(**consts.get(s.kind, {}))) for s in SPECS}


def render_script(unit_names: list[str] | set[str], max_sockets: int, dist: bool = False,
                  estats: bool = False, sample: bool = False) -> str:
    """dist: also keep log2 histograms of congestion-state episodes (--dist); estats:
    write each closing socket's RFC 4898 variables (--rfc4898); sample: sample
    connections after ACKs (--sample; period and mode are module parameters)."""
    units = select_units(set(unit_names))
    counters = counters_for_units([u for u in UNITS if u.name in units])
    return _env().get_template("tcpipstat.stp.j2").render(
        version=__version__,
        format_version=FORMAT_VERSION,
        fmt=record_formats(counters, int(max_sockets)),
        units=set(units),
        counters=counters,
        max_sockets=int(max_sockets),
        dist=bool(dist),
        estats=bool(estats),
        evars=EVARS,
        sample=bool(sample),
        sfields=SFIELDS,
        max_filters=MAX_FILTERS,
        filter_fields=FILTER_FIELDS,
    )


def render_probe_check(points: list[str]) -> str:
    """A script whose pass 2 tells which of ``points`` resolve on a kernel."""
    return _env().get_template("probe_check.stp.j2").render(points=points)


def script_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def module_args(filters: list[Filter], timeout_s: float | None, interval_s: float | None = None,
                count: int | None = None, sample_ms: float | None = None, on_cwnd_change: bool = False,
                drain_ms: int = 0) -> list[str]:
    """staprun NAME=VALUE arguments: numbers only, whatever the user typed."""
    args = [f"tis_nfilters={len(filters)}"]
    if drain_ms:
        args.append(f"tis_drain_ms={int(drain_ms)}")
    if sample_ms is not None:
        args.append(f"tis_sample_us={int(round(sample_ms * 1000))}")
        if on_cwnd_change:
            args.append("tis_sample_cwnd=1")
    for i, flt in enumerate(filters):
        # FILTER_FIELDS in order, each as the 16 hex digits of its 64 bits (the script's
        # strtol(.., 16) reads them back as the same signed 64-bit number)
        args.append(f"tis_f{i}=" + "".join(f"{int(v) & 0xFFFFFFFFFFFFFFFF:016x}" for v in flt.slots()))
    if timeout_s:
        args.append(f"tis_timeout_ms={int(round(timeout_s * 1000))}")
    if interval_s:
        args.append(f"tis_interval_ms={int(round(interval_s * 1000))}")
        if count:
            args.append(f"tis_count={int(count)}")
    return args
