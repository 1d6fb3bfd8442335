"""RFC 4898 (TCP Extended Statistics MIB) variables at close (--rfc4898).

When a socket the filters accept closes, the collector reads the variables below from
its struct tcp_sock and writes one ``E`` record (tcpipstat/records.py). This module is
the one list of them: the collector writes them (in this order, by these names), the
report shows them, the man page prints the table mapping each RFC name to its kernel
field. Variables of the RFC's Perf, Path, Stack and App tables that Linux does not keep
are listed in ``UNAVAILABLE`` with the reason, and shown as such.

How a collector reads each one is its own business (the SystemTap collector's
expressions: tcpipstat/render.py). A field that only some kernels have reads as -1
elsewhere, which the report shows as n/a: kernel differences are handled per field,
not by version checks.
"""
from __future__ import annotations

from dataclasses import dataclass

TABLES = ("Perf", "Path", "Stack", "App")


@dataclass(frozen=True)
class EVar:
    name: str           # the RFC's name, without the tcpEStats<Table> prefix
    table: str          # Perf | Path | Stack | App
    field: str          # where Linux keeps it (for the man page)
    agg: str            # rows of several sockets: sum | mean | min | max
    unit: str = ""      # "", octets, us, ms, segments
    description: str = ""


EVARS: tuple[EVar, ...] = (
    # Perf
    EVar("SegsOut", "Perf", "tp->segs_out", "sum", "segments",
         "segments sent, retransmissions included"),
    EVar("DataSegsOut", "Perf", "tp->data_segs_out", "sum", "segments",
         "segments sent that carried data, retransmissions included"),
    EVar("DataOctetsOut", "Perf", "tp->bytes_sent", "sum", "octets",
         "data octets sent, retransmissions included (HCDataOctetsOut)"),
    EVar("SegsRetrans", "Perf", "tp->total_retrans", "sum", "segments",
         "segments retransmitted"),
    EVar("OctetsRetrans", "Perf", "tp->bytes_retrans", "sum", "octets",
         "data octets retransmitted"),
    EVar("SegsIn", "Perf", "tp->segs_in", "sum", "segments", "segments received"),
    EVar("DataSegsIn", "Perf", "tp->data_segs_in", "sum", "segments",
         "segments received that carried data"),
    EVar("SmoothedRTT", "Perf", "tp->srtt_us >> 3", "mean", "us",
         "smoothed round-trip time"),
    EVar("CurRTO", "Perf", "icsk->icsk_rto (jiffies)", "mean", "ms",
         "current retransmission time-out"),
    EVar("CurMSS", "Perf", "tp->mss_cache", "mean", "octets", "current maximum segment size"),
    EVar("CurCwnd", "Perf", "tp->snd_cwnd x tp->mss_cache", "mean", "octets",
         "congestion window (the RFC counts octets; Linux keeps segments)"),
    EVar("CurSsthresh", "Perf", "tp->snd_ssthresh x tp->mss_cache", "mean", "octets",
         "slow-start threshold (n/a while still infinite: no loss yet)"),
    EVar("PipeSize", "Perf", "tcp_packets_in_flight() x tp->mss_cache", "mean", "octets",
         "octets in flight (sent, not yet acknowledged nor considered lost)"),
    EVar("Timeouts", "Perf", "tp->total_rto (Linux 6.7+)", "sum", "",
         "retransmission time-outs that expired (n/a on kernels without tp->total_rto)"),
    EVar("CurRwinSent", "Perf", "tp->rcv_wnd", "mean", "octets",
         "receive window last advertised"),
    EVar("CurRwinRcvd", "Perf", "tp->snd_wnd", "mean", "octets",
         "receive window last advertised by the peer"),
    EVar("MaxRwinRcvd", "Perf", "tp->max_window", "max", "octets",
         "largest window the peer advertised"),
    EVar("SndLimTimeRwin", "Perf", "tp->chrono_stat[TCP_CHRONO_RWND_LIMITED - 1] (jiffies)",
         "sum", "ms",
         "time the sender was limited by the peer's receive window (ended periods)"),
    EVar("SndLimTimeSnd", "Perf", "tp->chrono_stat[TCP_CHRONO_SNDBUF_LIMITED - 1] (jiffies)",
         "sum", "ms",
         "time the sender was limited by its own send buffer (ended periods)"),
    # Path
    EVar("MinRTT", "Path", "tp->rtt_min (windowed minimum)", "min", "us",
         "minimum round-trip time (Linux keeps it over a 5-minute window; n/a before the first "
         "sample)"),
    # Stack
    EVar("MSSSent", "Stack", "tp->advmss", "mean", "octets", "MSS this side advertised"),
    EVar("MSSRcvd", "Stack", "tp->rx_opt.mss_clamp", "mean", "octets",
         "MSS the peer advertised (or the clamp)"),
    EVar("WinScaleSent", "Stack", "tp->rx_opt.rcv_wscale", "mean", "",
         "window scale this side uses"),
    EVar("WinScaleRcvd", "Stack", "tp->rx_opt.snd_wscale", "mean", "",
         "window scale the peer uses"),
    EVar("SACK", "Stack", "tp->rx_opt.sack_ok", "sum", "",
         "1 when SACK was negotiated"),
    EVar("TimeStamps", "Stack", "tp->rx_opt.tstamp_ok", "sum", "",
         "1 when TCP timestamps were negotiated"),
    EVar("ECN", "Stack", "tp->ecn_flags & TCP_ECN_OK", "sum", "",
         "1 when ECN was negotiated"),
    EVar("DSACKDups", "Stack", "tp->dsack_dups", "sum", "segments",
         "duplicate segments reported by the peer's D-SACK blocks"),
    EVar("MaxReordering", "Stack", "tp->reordering", "max", "segments",
         "reordering degree the sender now assumes"),
    # App
    EVar("SndUna", "App", "tp->snd_una", "mean", "", "oldest unacknowledged sequence number"),
    EVar("SndNxt", "App", "tp->snd_nxt", "mean", "", "next sequence number to send"),
    EVar("RcvNxt", "App", "tp->rcv_nxt", "mean", "", "next sequence number expected"),
    EVar("ThruOctetsAcked", "App", "tp->bytes_acked", "sum", "octets",
         "octets the peer acknowledged (HCThruOctetsAcked)"),
    EVar("ThruOctetsReceived", "App", "tp->bytes_received", "sum", "octets",
         "octets received in sequence (HCThruOctetsReceived)"),
)

EVAR_BY_NAME = {v.name: v for v in EVARS}

# The RFC's variables Linux does not keep per socket (shown as unavailable, never 0).
UNAVAILABLE: tuple[tuple[str, str], ...] = (
    ("DataOctetsIn", "no per-socket count of data octets received with duplicates "
                     "(ThruOctetsReceived counts them in sequence)"),
    ("MaxRTT / SumRTT / CountRTT", "only the smoothed and minimum RTT are kept"),
    ("MaxRTO / MinRTO", "only the current RTO is kept"),
    ("CongSignals",
     "not counted by the kernel (--cong counts changes into Recovery, CWR and Loss)"),
    ("DupAcksIn / SACKsRcvd", "only counted system-wide (TcpExt), not per socket"),
    ("MaxPipeSize / MaxSsthresh / MaxCwnd", "no maximum is kept"),
    ("SndLimTimeCwnd", "tp->chrono_stat has busy time, not time limited by the congestion window"),
    ("ElapsedSecs / StartTimeStamp", "the socket's creation time is not kept"),
)
