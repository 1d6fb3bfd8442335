"""Sampled per-connection time series (--sample): what each sample holds, and the
outputs made of them (CSV / NDJSON files, a picture, the report's sparklines).

The collector samples a connection's struct tcp_sock after the kernel has processed an
ACK for it (tcp_ack() returned): the first ACK of each sampling period, or every ACK
(period 0), or with --on-cwnd-change only when the congestion window changed since the
connection's previous sample. When the connection closes, an ``end`` sample marks it.
``S`` records carry them (tcpipstat/records.py); ``FIELDS`` is the one list of what
they hold, feeding the collector (the SystemTap collector's expressions:
tcpipstat/render.py), the parser, the files and the man page.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class SField:
    name: str
    field: str          # the kernel's (for the man page)
    description: str


FIELDS: tuple[SField, ...] = (
    SField("cwnd", "tp->snd_cwnd", "congestion window, segments"),
    SField("ssthresh", "tp->snd_ssthresh",
           "slow-start threshold, segments (empty / null while still infinite)"),
    SField("snd_wnd", "tp->snd_wnd", "the peer's receive window, bytes"),
    SField("srtt_us", "tp->srtt_us >> 3", "smoothed RTT, microseconds"),
    SField("rttvar_us", "tp->mdev_us >> 2",
           "RTT variation, microseconds (as ss and tcp_info show it)"),
    SField("rto_ms", "icsk->icsk_rto", "retransmission time-out, ms"),
    SField("lost", "tp->lost_out", "segments now considered lost"),
    SField("retrans", "tp->retrans_out", "retransmitted segments not yet acknowledged"),
    SField("total_retrans", "tp->total_retrans",
           "segments retransmitted since the connection began"),
    SField("inflight", "tcp_packets_in_flight()",
           "segments in flight (sent, not acknowledged, not lost)"),
    SField("rqueue", "tp->rcv_nxt - tp->copied_seq",
           "bytes received, not yet read by the application"),
    SField("wqueue", "tp->write_seq - tp->snd_una",
           "bytes written by the application, not yet acknowledged"),
    SField("snd_nxt", "tp->snd_nxt", "next sequence number to send"),
    SField("snd_una", "tp->snd_una", "oldest unacknowledged sequence number"),
    SField("mss", "tp->mss_cache", "current MSS, bytes"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
SAMPLE_KINDS = ("ack", "end")


@dataclass(frozen=True)
class Sample:
    t_us: int                      # since collection started
    kind: str                      # ack | end
    values: tuple                  # in FIELD_NAMES order (None: not known)

    def get(self, name: str):
        return self.values[FIELD_NAMES.index(name)]


def _conn(t) -> dict:
    return {"laddr": t.addr_str("l"), "lport": t.lport, "raddr": t.addr_str("r"), "rport": t.rport,
            "family": "ipv6" if t.family == 10 else "ipv4"}


def write_series(path: str, series: dict, fmt: str) -> int:
    """Every sample of every connection, in time order per connection: CSV (a header,
    one line a sample) or NDJSON (one object a sample). Returns the number written."""
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        if w:
            w.writerow(["t_s", "event", "family", "laddr", "lport", "raddr", "rport", *FIELD_NAMES])
        for t, samples in series.items():
            conn = _conn(t)
            for s in samples:
                if w:
                    w.writerow([f"{s.t_us / 1e6:.6f}", s.kind, conn["family"], conn["laddr"],
                                conn["lport"], conn["raddr"], conn["rport"],
                                *("" if v is None else v for v in s.values)])
                else:
                    obj = {"t_s": round(s.t_us / 1e6, 6), "event": s.kind, **conn,
                           **dict(zip(FIELD_NAMES, s.values))}
                    f.write(json.dumps(obj, separators=(",", ":")) + "\n")
                n += 1
    return n


BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 24) -> str:
    """Values (in time order) squeezed into ``width`` bins (each bin's mean), as bars."""
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) > width:
        step = len(vals) / width
        bins = (vals[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]
                for i in range(width))
        vals = [sum(b) / len(b) for b in bins]
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return BARS[0] * len(vals)
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / (hi - lo) * len(BARS)))] for v in vals)


def summary(samples: Iterable[Sample]) -> dict | None:
    """cwnd and srtt over a row's samples (all its connections, in time order)."""
    ss = sorted((s for s in samples if s.kind == "ack"), key=lambda s: s.t_us)
    if not ss:
        return None
    cw = [s.get("cwnd") for s in ss]
    rt = [s.get("srtt_us") for s in ss]
    return {"samples": len(ss),
            "cwnd": {"min": min(cw), "max": max(cw), "last": cw[-1], "spark": sparkline(cw)},
            "srtt_ms": {"min": min(rt) / 1000, "max": max(rt) / 1000, "last": rt[-1] / 1000,
                        "spark": sparkline(rt)},
            "total_retrans": max(s.get("total_retrans") for s in ss)}


def summary_line(sm: dict) -> str:
    c, r = sm["cwnd"], sm["srtt_ms"]
    return (f" cwnd {c['spark']} {c['min']}..{c['max']} (last {c['last']})   "
            f"srtt {r['spark']} {r['min']:.1f}..{r['max']:.1f} ms (last {r['last']:.1f})   "
            f"{sm['samples']:,} samples")


def plot(path: str, series: dict, title: str = "tcpipstat") -> int:
    """cwnd and srtt over time, one line per connection; returns connections drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import UsageError
        raise UsageError("--plot needs matplotlib: pip install 'tcpipstat[plot]' (or apt-get "
                         "install python3-matplotlib)") from None
    conns = [(t, [s for s in ss if s.kind == "ack"]) for t, ss in series.items()]
    conns = [(t, ss) for t, ss in conns if ss]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    for t, ss in sorted(conns, key=lambda c: -len(c[1]))[:12]:
        label = f"{t.addr_str('l')}:{t.lport} > {t.addr_str('r')}:{t.rport}"
        xs = [s.t_us / 1e6 for s in ss]
        ax1.step(xs, [s.get("cwnd") for s in ss], where="post", label=label)
        ax2.step(xs, [s.get("srtt_us") / 1000 for s in ss], where="post", label=label)
    ax1.set_ylabel("cwnd (segments)")
    ax2.set_ylabel("srtt (ms)")
    ax2.set_xlabel("time since collection started (s)")
    ax1.set_title(title)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    if conns:
        ax1.legend(fontsize="small", loc="best")
    else:
        ax1.text(0.5, 0.5, "no samples", ha="center", transform=ax1.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return min(len(conns), 12)
