"""The counters a capture can show: the report's catalogue for ``--read`` (the live
tool's is tcpipstat/counters.py).

One report row is one TCP connection (or, with ``index=``, a group of them). A
capture sees both ends of a connection, so *local* is a convention: the side that
opened it (sent the SYN); *remote* is the side that answered. When the capture
begins after the handshake, remote is the side with the lower port (the server's:
a port below 1024, well known, always is the lower one; with equal ports, local is
the sender of the first packet seen, as tcptrace takes it always) and the row is
marked as opened before the capture.

``Out`` counts what local sent, ``In`` what remote sent. Counts add up across the
connections of a row; measurements (``unit`` set) do not: see ``agg``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..report import Catalogue

SECTIONS = ("Out", "In", "Tcp", "Timing")


@dataclass(frozen=True)
class Field:
    name: str
    section: str
    description: str
    unit: str = ""             # "ms": a measurement (absent when there was nothing to measure)
    agg: str = "sum"           # across the connections of a row: sum, min, max, mean (over the
    weight: str = ""           # connections that have one) or, with weight, the mean over samples
    ipv4_only: bool = False    # (the report layer asks; no capture counter is)


def _dir(out_name: str, in_name: str, what: str, **kw) -> tuple[Field, Field]:
    return (Field(out_name, "Out", what.format(who="local", Who="Local", other="remote"), **kw),
            Field(in_name, "In", what.format(who="remote", Who="Remote", other="local"), **kw))


_PAIRS = (
    _dir("OutSegs", "InSegs", "segments {who} sent, retransmissions and pure ACKs included "
         "(unlike the live OutSegs, which leaves out retransmissions: on the wire they are "
         "segments like any other), network duplicates left out"),
    _dir("SendBytes", "RecvBytes", "payload bytes {who} sent for the first time: the bytes of "
         "the stream (tcptrace: unique bytes sent)"),
    _dir("RetransSegs", "InRetransSegs", "segments {who} sent again: they carry sequence space "
         "(data, SYN or FIN) the capture had already seen {who} send or {other} acknowledge"),
    _dir("RetransBytes", "InRetransBytes", "payload bytes {who} sent again (SYN and FIN, which "
         "tcptrace counts as one byte each, are not payload)"),
    _dir("OutOfOrder", "InOutOfOrder", "segments of {who} that carried only new data but arrived "
         "below the highest sequence already seen: a hole filled late at the capture point (a "
         "segment lost before it, or reordered)"),
    _dir("DupAcks", "InDupAcks", "duplicate ACKs {who} sent (RFC 5681): no data, no SYN, FIN or "
         "RST, the same acknowledgment number and window as {who}'s previous ACK, while {other} "
         "had data outstanding: the capture saw {other} send sequence space above that "
         "acknowledgment number, or resend some (a keep-alive's one old byte aside) since "
         "{who}'s previous ACK. Network duplicates are not counted. tcptrace's and tshark's "
         "definitions differ: see Captures (--read)"),
    _dir("NetDups", "InNetDups", "packets of {who} the network (or the capture setup) "
         "delivered twice: IPv4 packets with the same IP ID, sequence and acknowledgment "
         "numbers, flags, window and length as one of the last 8 {who} sent (tcptrace: "
         "hardware duplicates). {Who} sent them once, so they count as nothing else: not in "
         "Segs, not as retransmissions (their segment keeps its RTT sample), not as duplicate "
         "ACKs. IPv6 has no IP ID and an IP ID of 0 tells nothing (some stacks send it in many "
         "packets): such packets are never counted here"),
    _dir("ZeroWindows", "InZeroWindows", "ACKs in which {who} advertised a zero receive window "
         "(resets left out)"),
    _dir("OutRsts", "InRsts", "resets {who} sent"),
    _dir("RttSamples", "InRttSamples", "round-trip samples for {who}'s segments: the time from "
         "a segment to the first ACK from {other} that acknowledges exactly its end, for segments "
         "sent once and with nothing below them resent after them, acknowledged already or not "
         "(Karn's rule, as tcptrace: such an ACK may answer the resend)"),
    _dir("RttMin", "InRttMin", "the smallest of those samples", unit="ms", agg="min"),
    _dir("RttAvg", "InRttAvg", "the mean of those samples", unit="ms", agg="mean",
         weight="RttSamples"),
    _dir("RttMax", "InRttMax", "the largest of those samples", unit="ms", agg="max"),
)

FIELDS: tuple[Field, ...] = (
    *(p[0] for p in _PAIRS),
    *(p[1] for p in _PAIRS),
    Field("ActiveOpens", "Tcp", "the local side's SYN is in the capture (it opened the "
          "connection: connect())"),
    Field("PassiveOpens", "Tcp", "the remote side's SYN-ACK is in the capture (it accepted the "
          "connection); counted for the connection, not for local"),
    Field("AttemptFails", "Tcp", "a SYN that never got a SYN-ACK: refused with a reset, or "
          "unanswered until the capture ended"),
    Field("HandshakeRtt", "Timing", "from the SYN to the ACK of the SYN-ACK: the path's round trip "
          "wherever the capture was taken (absent when the SYN or the SYN-ACK was retransmitted, "
          "which makes it ambiguous)", unit="ms", agg="mean"),
    Field("FirstByte", "Timing", "from the first payload byte local sent to the first payload "
          "byte remote sent after it: a request's time to first response byte", unit="ms",
          agg="mean"),
    Field("TransferTime", "Timing", "from the first to the last segment that carried payload, "
          "either way", unit="ms", agg="mean"),
    Field("Duration", "Timing", "from the connection's first to its last packet in the capture "
          "(tcptrace: elapsed time)", unit="ms", agg="mean"),
)

# the In-side mean is weighted by the In-side samples
FIELDS = tuple(Field(f.name, f.section, f.description, f.unit, f.agg,
                     ("InRttSamples" if f.name == "InRttAvg" else f.weight))
               for f in FIELDS)
FIELD_BY_NAME = {f.name: f for f in FIELDS}
NAMES = tuple(f.name for f in FIELDS)

CATALOGUE = Catalogue(
    FIELDS, SECTIONS, noun="connection",
    empty="No TCP connection in the capture was accepted by the filters.",
    partial="(open before the capture started: partial totals)")
