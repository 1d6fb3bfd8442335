"""RFC 4898 (TCP Extended Statistics MIB) variables at close (--rfc4898).

When a socket the filters accept closes, the collector reads the variables below from
its struct tcp_sock and writes one ``E`` record (tcpipstat/records.py). This module is
the one list of them: the template reads ``expr``, the report shows them, the man page
prints the table mapping each RFC name to its kernel field. Variables of the RFC's
Perf, Path, Stack and App tables that Linux does not keep are listed in
``UNAVAILABLE`` with the reason, and shown as such.

``expr`` is a SystemTap expression over ``t_t`` (the tcp_sock, cast by the template's
``T`` macro). A field that only some kernels have is read under ``@defined`` and
gives -1 elsewhere, which the report shows as n/a: kernel differences are handled per
field, not by version checks.
"""
from __future__ import annotations

from dataclasses import dataclass

T = '@cast(t_t, "tcp_sock", "kernel")'
ICSK = '@cast(t_t, "inet_connection_sock", "kernel")'
TABLES = ("Perf", "Path", "Stack", "App")


@dataclass(frozen=True)
class EVar:
    name: str           # the RFC's name, without the tcpEStats<Table> prefix
    table: str          # Perf | Path | Stack | App
    field: str          # where Linux keeps it (for the man page)
    expr: str           # stap expression; -1 means "not on this kernel"
    agg: str            # rows of several sockets: sum | mean | min | max
    unit: str = ""      # "", octets, us, ms, segments
    description: str = ""


def _opt(field: str, expr: str | None = None) -> str:
    """A tcp_sock field some kernels lack: -1 where it does not exist."""
    e = expr or f"{T}->{field}"
    return f"(@defined({T}->{field}) ? {e} : -1)"


_MSS = f"{T}->mss_cache"
# The option bits of tp->rx_opt (struct tcp_options_received) are bitfields in the u16
# right after rcv_tsecr: saw_tstamp:1, tstamp_ok:1, dsack:1, wscale_ok:1, sack_ok:3,
# smc_ok:1, snd_wscale:4, rcv_wscale:4 (the same in Linux 6.1 and 6.12). They are read
# as that word: stap 4.8 read every one of them as 0 from Debian 6.1's debuginfo (seen
# in the lab, where 5.1 with 6.12 reads them right); tier 3 checks both.
_RXW = f"(kernel_short(&{T}->rx_opt->rcv_tsecr + 4) & 0xffff)"
_FLIGHT = f"({T}->packets_out - ({T}->sacked_out + {T}->lost_out) + {T}->retrans_out)"

EVARS: tuple[EVar, ...] = (
    # Perf
    EVar("SegsOut", "Perf", "tp->segs_out", f"{T}->segs_out", "sum", "segments",
         "segments sent, retransmissions included"),
    EVar("DataSegsOut", "Perf", "tp->data_segs_out", f"{T}->data_segs_out", "sum", "segments",
         "segments sent that carried data, retransmissions included"),
    EVar("DataOctetsOut", "Perf", "tp->bytes_sent", f"{T}->bytes_sent", "sum", "octets",
         "data octets sent, retransmissions included (HCDataOctetsOut)"),
    EVar("SegsRetrans", "Perf", "tp->total_retrans", f"{T}->total_retrans", "sum", "segments",
         "segments retransmitted"),
    EVar("OctetsRetrans", "Perf", "tp->bytes_retrans", f"{T}->bytes_retrans", "sum", "octets",
         "data octets retransmitted"),
    EVar("SegsIn", "Perf", "tp->segs_in", f"{T}->segs_in", "sum", "segments", "segments received"),
    EVar("DataSegsIn", "Perf", "tp->data_segs_in", f"{T}->data_segs_in", "sum", "segments",
         "segments received that carried data"),
    EVar("SmoothedRTT", "Perf", "tp->srtt_us >> 3", f"({T}->srtt_us >> 3)", "mean", "us",
         "smoothed round-trip time"),
    EVar("CurRTO", "Perf", "icsk->icsk_rto (jiffies)", f"({ICSK}->icsk_rto * 1000 / HZ())", "mean", "ms",
         "current retransmission time-out"),
    EVar("CurMSS", "Perf", "tp->mss_cache", _MSS, "mean", "octets", "current maximum segment size"),
    EVar("CurCwnd", "Perf", "tp->snd_cwnd x tp->mss_cache", f"({T}->snd_cwnd * {_MSS})", "mean", "octets",
         "congestion window (the RFC counts octets; Linux keeps segments)"),
    EVar("CurSsthresh", "Perf", "tp->snd_ssthresh x tp->mss_cache",
         f"({T}->snd_ssthresh >= 0x7fffffff ? -1 : {T}->snd_ssthresh * {_MSS})", "mean", "octets",
         "slow-start threshold (n/a while still infinite: no loss yet)"),
    EVar("PipeSize", "Perf", "tcp_packets_in_flight() x tp->mss_cache", f"({_FLIGHT} * {_MSS})", "mean", "octets",
         "octets in flight (sent, not yet acknowledged nor considered lost)"),
    EVar("Timeouts", "Perf", "tp->total_rto (Linux 6.7+)", _opt("total_rto"), "sum", "",
         "retransmission time-outs that expired (n/a on kernels without tp->total_rto)"),
    EVar("CurRwinSent", "Perf", "tp->rcv_wnd", f"{T}->rcv_wnd", "mean", "octets",
         "receive window last advertised"),
    EVar("CurRwinRcvd", "Perf", "tp->snd_wnd", f"{T}->snd_wnd", "mean", "octets",
         "receive window last advertised by the peer"),
    EVar("MaxRwinRcvd", "Perf", "tp->max_window", f"{T}->max_window", "max", "octets",
         "largest window the peer advertised"),
    EVar("SndLimTimeRwin", "Perf", "tp->chrono_stat[TCP_CHRONO_RWND_LIMITED - 1] (jiffies)",
         f"({T}->chrono_stat[1] * 1000 / HZ())", "sum", "ms",
         "time the sender was limited by the peer's receive window (ended periods)"),
    EVar("SndLimTimeSnd", "Perf", "tp->chrono_stat[TCP_CHRONO_SNDBUF_LIMITED - 1] (jiffies)",
         f"({T}->chrono_stat[2] * 1000 / HZ())", "sum", "ms",
         "time the sender was limited by its own send buffer (ended periods)"),
    # Path
    EVar("MinRTT", "Path", "tp->rtt_min (windowed minimum)",
         f"({T}->rtt_min->s[0]->v == 0xffffffff ? -1 : {T}->rtt_min->s[0]->v)", "min", "us",
         "minimum round-trip time (Linux keeps it over a 5-minute window; n/a before the first sample)"),
    # Stack
    EVar("MSSSent", "Stack", "tp->advmss", f"{T}->advmss", "mean", "octets", "MSS this side advertised"),
    EVar("MSSRcvd", "Stack", "tp->rx_opt.mss_clamp", f"{T}->rx_opt->mss_clamp", "mean", "octets",
         "MSS the peer advertised (or the clamp)"),
    EVar("WinScaleSent", "Stack", "tp->rx_opt.rcv_wscale", f"(({_RXW} >> 12) & 15)", "mean", "",
         "window scale this side uses"),
    EVar("WinScaleRcvd", "Stack", "tp->rx_opt.snd_wscale", f"(({_RXW} >> 8) & 15)", "mean", "",
         "window scale the peer uses"),
    EVar("SACK", "Stack", "tp->rx_opt.sack_ok", f"((({_RXW} >> 4) & 7) != 0)", "sum", "",
         "1 when SACK was negotiated"),
    EVar("TimeStamps", "Stack", "tp->rx_opt.tstamp_ok", f"(({_RXW} >> 1) & 1)", "sum", "",
         "1 when TCP timestamps were negotiated"),
    EVar("ECN", "Stack", "tp->ecn_flags & TCP_ECN_OK", f"({T}->ecn_flags & 1)", "sum", "",
         "1 when ECN was negotiated"),
    EVar("DSACKDups", "Stack", "tp->dsack_dups", f"{T}->dsack_dups", "sum", "segments",
         "duplicate segments reported by the peer's D-SACK blocks"),
    EVar("MaxReordering", "Stack", "tp->reordering", f"{T}->reordering", "max", "segments",
         "reordering degree the sender now assumes"),
    # App
    EVar("SndUna", "App", "tp->snd_una", f"{T}->snd_una", "mean", "", "oldest unacknowledged sequence number"),
    EVar("SndNxt", "App", "tp->snd_nxt", f"{T}->snd_nxt", "mean", "", "next sequence number to send"),
    EVar("RcvNxt", "App", "tp->rcv_nxt", f"{T}->rcv_nxt", "mean", "", "next sequence number expected"),
    EVar("ThruOctetsAcked", "App", "tp->bytes_acked", f"{T}->bytes_acked", "sum", "octets",
         "octets the peer acknowledged (HCThruOctetsAcked)"),
    EVar("ThruOctetsReceived", "App", "tp->bytes_received", f"{T}->bytes_received", "sum", "octets",
         "octets received in sequence (HCThruOctetsReceived)"),
)

EVAR_BY_NAME = {v.name: v for v in EVARS}

# The RFC's variables Linux does not keep per socket (shown as unavailable, never 0).
UNAVAILABLE: tuple[tuple[str, str], ...] = (
    ("DataOctetsIn", "no per-socket count of data octets received with duplicates (ThruOctetsReceived "
                     "counts them in sequence)"),
    ("MaxRTT / SumRTT / CountRTT", "only the smoothed and minimum RTT are kept"),
    ("MaxRTO / MinRTO", "only the current RTO is kept"),
    ("CongSignals", "not counted by the kernel (--cong counts changes into Recovery, CWR and Loss)"),
    ("DupAcksIn / SACKsRcvd", "only counted system-wide (TcpExt), not per socket"),
    ("MaxPipeSize / MaxSsthresh / MaxCwnd", "no maximum is kept"),
    ("SndLimTimeCwnd", "tp->chrono_stat has busy time, not time limited by the congestion window"),
    ("ElapsedSecs / StartTimeStamp", "the socket's creation time is not kept"),
)
