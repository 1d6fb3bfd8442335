"""Plan -> SystemTap script text (Jinja templates in tcpipstat/stp_templates/).

Only the probe units and the table size reach the script text; everything else
the user chooses travels as module parameters (see :func:`module_args`), so the
compiled module is reused for every filter, index, timeout and report option.
Nothing the user types is ever placed into the script text.

This is the SystemTap collector's side of the catalogue: the probe points of
tcpipstat/counters.py written in stap's syntax (:func:`stap_point`), and the stap
expressions that read the RFC 4898 variables (tcpipstat/estats.py) and the sampled
fields (tcpipstat/series.py) from a struct tcp_sock.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import jinja2

from . import __version__
from .counters import CA_TIME_COUNTERS, CORE_PROBES, Probe, Selection
from .estats import EVARS
from .filters import FILTER_FIELDS, MAX_FILTERS, Filter
from .records import FORMAT_VERSION, HEADER, MAGIC, SPECS
from .series import FIELDS as SFIELDS


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tcpipstat", "stp_templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,           # a line holding only a {% tag %} leaves nothing
        lstrip_blocks=True,
        autoescape=False,
    )


def stap_point(p: Probe, module: str = "") -> str:
    """A probe point in stap's syntax; ``module``: how to name its module, if not by name."""
    if p.kind == "tracepoint":
        return f'kernel.trace("{p.target}")'
    where = f'module("{module or p.module}")' if p.module else "kernel"
    return f'{where}.function("{p.target}")' + (".return" if p.kind == "kretprobe" else "")


def stap_spellings(p: Probe, kver: str) -> list[str]:
    """The ways to name ``p`` on kernel ``kver``, best first.

    Quirk (Debian and Ubuntu kernels with compressed modules, e.g. Debian 13's 6.12): the
    module is tls.ko.xz, its debug information (linux-image-*-dbg) is
    /usr/lib/debug/lib/modules/RELEASE/kernel/net/tls/tls.ko, and there are no build-id links
    for modules: stap's search by the module's own file name finds no DWARF ("cannot find
    module tls debuginfo"). Naming the debug file itself works: stap takes the module's
    name from it and checks its build id against the loaded module's when it loads."""
    first = stap_point(p)
    if not p.module_file:
        return [first]
    return [first, stap_point(p, f"/usr/lib/debug/lib/modules/{kver}/{p.module_file}")]


def render_probe_check(points: Iterable[str]) -> str:
    """A script whose pass 2 tells which of ``points`` (stap's syntax) resolve on a
    kernel."""
    return _env().get_template("probe_check.stp.j2").render(points=list(points))


def probe_check_points(points: Iterable[Probe], kver: str) -> list[str]:
    """What the probe check asks about: every spelling of every point."""
    return [t for p in points for t in stap_spellings(p, kver)]


def probe_check(points: Iterable[Probe], kver: str) -> tuple[list[str], str]:
    """The probe check of ``points`` on ``kver``: what it asks about, and its script (also
    the key under which the toolchain keeps its answer)."""
    texts = probe_check_points(points, kver)
    return texts, render_probe_check(texts)


def resolve_points(tc, points: Iterable[Probe], kver: str) -> dict[Probe, str]:
    """Which of ``points`` exist on kernel ``kver``, each with its first spelling that
    resolves: the probe check, run by the toolchain ``tc`` (stap.Toolchain), which
    answers in stap's syntax."""
    points = list(points)
    texts, script = probe_check(points, kver)
    resolved = tc.resolve(texts, kver, script)
    found = {}
    for p in points:
        spelled = next((t for t in stap_spellings(p, kver) if t in resolved), None)
        if spelled:
            found[p] = spelled
    return found


# ---- the stap expressions of the fields read from a struct tcp_sock (t_t) ----
# (@tp and @icsk: the template's macros for t_t cast to a tcp_sock / inet_connection_sock)
T = "@tp"
ICSK = "@icsk"
_MSS = f"{T}->mss_cache"
# Quirk (stap 4.8): the option bits of tp->rx_opt (struct tcp_options_received) are
# bitfields in the u16 right after rcv_tsecr: saw_tstamp:1, tstamp_ok:1, dsack:1,
# wscale_ok:1, sack_ok:3, smc_ok:1, snd_wscale:4, rcv_wscale:4 (the same in Linux 6.1 and
# 6.12). They are read as that word: stap 4.8 read every one of them as 0 from Debian
# 6.1's debuginfo (seen in the lab, where 5.1 with 6.12 reads them right); tier 3 checks
# both.
_RXW = f"(kernel_short(&{T}->rx_opt->rcv_tsecr + 4) & 0xffff)"
_FLIGHT = f"({T}->packets_out - ({T}->sacked_out + {T}->lost_out) + {T}->retrans_out)"
_RTO_MS = f"({ICSK}->icsk_rto * 1000 / HZ())"


def _opt(field: str) -> str:
    """Quirk (kernel: tcp_sock fields that only some versions have, e.g. total_rto since
    Linux 6.7): -1 where the field does not exist (per field, no version checks)."""
    return f"(@defined({T}->{field}) ? {T}->{field} : -1)"


# RFC 4898 variables (estats.EVARS), by name; -1 means "not on this kernel"
STAP_EVARS = {
    "SegsOut": f"{T}->segs_out",
    "DataSegsOut": f"{T}->data_segs_out",
    "DataOctetsOut": f"{T}->bytes_sent",
    "SegsRetrans": f"{T}->total_retrans",
    "OctetsRetrans": f"{T}->bytes_retrans",
    "SegsIn": f"{T}->segs_in",
    "DataSegsIn": f"{T}->data_segs_in",
    "SmoothedRTT": f"({T}->srtt_us >> 3)",
    "CurRTO": _RTO_MS,
    "CurMSS": _MSS,
    "CurCwnd": f"({T}->snd_cwnd * {_MSS})",
    "CurSsthresh": f"({T}->snd_ssthresh >= 0x7fffffff ? -1 : {T}->snd_ssthresh * {_MSS})",
    "PipeSize": f"({_FLIGHT} * {_MSS})",
    "Timeouts": _opt("total_rto"),
    "CurRwinSent": f"{T}->rcv_wnd",
    "CurRwinRcvd": f"{T}->snd_wnd",
    "MaxRwinRcvd": f"{T}->max_window",
    "SndLimTimeRwin": f"({T}->chrono_stat[1] * 1000 / HZ())",
    "SndLimTimeSnd": f"({T}->chrono_stat[2] * 1000 / HZ())",
    "MinRTT": f"({T}->rtt_min->s[0]->v == 0xffffffff ? -1 : {T}->rtt_min->s[0]->v)",
    "MSSSent": f"{T}->advmss",
    "MSSRcvd": f"{T}->rx_opt->mss_clamp",
    "WinScaleSent": f"(({_RXW} >> 12) & 15)",
    "WinScaleRcvd": f"(({_RXW} >> 8) & 15)",
    "SACK": f"((({_RXW} >> 4) & 7) != 0)",
    "TimeStamps": f"(({_RXW} >> 1) & 1)",
    "ECN": f"({T}->ecn_flags & 1)",
    "DSACKDups": f"{T}->dsack_dups",
    "MaxReordering": f"{T}->reordering",
    "SndUna": f"{T}->snd_una",
    "SndNxt": f"{T}->snd_nxt",
    "RcvNxt": f"{T}->rcv_nxt",
    "ThruOctetsAcked": f"{T}->bytes_acked",
    "ThruOctetsReceived": f"{T}->bytes_received",
}

# Sampled fields (series.FIELDS), by name; -1: not known yet
STAP_SFIELDS = {
    "cwnd": f"{T}->snd_cwnd",
    "ssthresh": f"({T}->snd_ssthresh >= 0x7fffffff ? -1 : {T}->snd_ssthresh)",
    "snd_wnd": f"{T}->snd_wnd",
    "srtt_us": f"({T}->srtt_us >> 3)",
    "rttvar_us": f"({T}->mdev_us >> 2)",
    "rto_ms": _RTO_MS,
    "lost": f"{T}->lost_out",
    "retrans": f"{T}->retrans_out",
    "total_retrans": f"{T}->total_retrans",
    "inflight": _FLIGHT,
    "rqueue": f"(({T}->rcv_nxt - {T}->copied_seq) & 0xffffffff)",
    "wqueue": f"(({T}->write_seq - {T}->snd_una) & 0xffffffff)",
    "snd_nxt": f"{T}->snd_nxt",
    "snd_una": f"{T}->snd_una",
    "mss": f"{T}->mss_cache",
}


def _stap_string(text: str) -> str:
    """``text`` as the inside of a stap string literal."""
    return (text.replace("\\", "\\\\").replace('"', '\\"')
            .replace("\t", "\\t").replace("\n", "\\n"))


def record_formats(counters: Iterable[str], max_sockets: int) -> dict[str, str]:
    """Each record kind's printf format (records.py's specs), as stap string literals'
    text; the header's constants are written into its format."""
    consts = {HEADER.kind: dict(MAGIC=MAGIC, FORMAT=FORMAT_VERSION, VERSION=__version__,
                                MAX_SOCKETS=max_sockets, COUNTERS=",".join(counters))}
    return {s.kind: _stap_string(s.printf(**consts.get(s.kind, {}))) for s in SPECS}


def render_script(sel: Selection, max_sockets: int, dist: bool = False,
                  estats: bool = False, sample: bool = False, place: bool = False) -> str:
    """The collector of the units ``sel`` chose (counters.select). dist: also keep log2
    histograms of congestion-state episodes (--dist); estats: write each closing socket's
    RFC 4898 variables (--rfc4898); sample: sample connections after ACKs (--sample;
    period and mode are module parameters); place: read each socket's cgroup and network
    namespace (an attribution index, --cgroup or --netns)."""
    return _env().get_template("tcpipstat.stp.j2").render(
        version=__version__,
        format_version=FORMAT_VERSION,
        fmt=record_formats(sel.available, int(max_sockets)),
        units=sel.units,
        points={u.name: [sel.spelled.get(p) or stap_point(p) for p in u.points]
                for u in sel.units},
        counters=sel.available,
        proc=sel.proc,
        place=bool(place),
        cong=bool(sel.cong),
        ca_time=CA_TIME_COUNTERS,
        at={name: stap_point(p) for name, p in CORE_PROBES.items()},
        max_sockets=int(max_sockets),
        dist=bool(dist),
        estats=bool(estats),
        evars=[(v.name, STAP_EVARS[v.name]) for v in EVARS],
        sample=bool(sample),
        sfields=[(f.name, STAP_SFIELDS[f.name]) for f in SFIELDS],
        max_filters=MAX_FILTERS,
        filter_fields=FILTER_FIELDS,
    )


def module_args(filters: list[Filter], timeout_s: float | None, interval_s: float | None = None,
                count: int | None = None, sample_ms: float | None = None,
                on_cwnd_change: bool = False, drain_ms: int = 0) -> list[str]:
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
        args.append(f"tis_f{i}=" + "".join(f"{int(v) & 0xFFFFFFFFFFFFFFFF:016x}"
                                           for v in flt.slots()))
    if timeout_s:
        args.append(f"tis_timeout_ms={int(round(timeout_s * 1000))}")
    if interval_s:
        args.append(f"tis_interval_ms={int(round(interval_s * 1000))}")
        if count:
            args.append(f"tis_count={int(count)}")
    return args
