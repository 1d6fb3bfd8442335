"""Connections -> the model's report rows (tcpipstat/model.py's GroupKey and Row),
grouped by the index like the live tool's sockets, so the same report layer
prints them.

Counts add up across the connections of a row. Measurements cannot: RttMin and
RttMax are the extremes, RttAvg the mean over every sample, and HandshakeRtt,
FirstByte, TransferTime and Duration the mean over the connections that have one
(fields.py's ``agg``).
"""
from __future__ import annotations

from typing import Iterable

from ..model import GroupKey, Row, in_key_order
from ..records import Tuple
from .fields import FIELDS
from .flows import Conn, counters


def conn_tuple(conn: Conn) -> Tuple:
    return Tuple(conn.family, int.from_bytes(conn.laddr, "big"), conn.lport,
                 int.from_bytes(conn.raddr, "big"), conn.rport)


def build_rows(conns: Iterable[Conn], index: str, counters_of=counters) -> list[Row]:
    """The rows of ``conns`` grouped by ``index``; ``counters_of(conn)``: the counters of a
    connection (flows.counters(), or its port for the compiled path's connections)."""
    rows: dict[GroupKey, Row] = {}
    sums: dict[GroupKey, dict[str, list[float]]] = {}
    for conn in conns:
        if not conn.packets:
            continue
        c = counters_of(conn)
        key = GroupKey.of(index, conn_tuple(conn))
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(key)
            sums[key] = {}
        row.sockets += 1
        row.closed += conn.closed
        row.opened_during_collection &= conn.opened or conn.synack_n > 0
        _add(row.counters, sums[key], c)
    for key, row in rows.items():
        for name, (total, weight) in sums[key].items():
            row.counters[name] = round(total / weight, 3)
    return in_key_order(rows.values())


def _add(totals: dict[str, int | float], means: dict[str, list[float]], c: dict) -> None:
    """One connection's counters ``c`` into its row's: counts summed, the extremes kept,
    the means' weighted sums and weights accumulated in ``means`` (the row's rounded means
    replace the values of those names in ``totals`` at the end)."""
    if not totals:                           # its first connection: the sums start from it
        totals.update(c)
        for name, weight in _MEANS:
            if name in c:
                w = c[weight] if weight else 1
                means[name] = [0.0 + c[name] * w, 0 + w]
        return
    for name, v in c.items():
        agg, weight = _AGG[name]
        if agg == "sum":
            totals[name] = totals.get(name, 0) + v
        elif agg == "min":
            totals[name] = min(totals.get(name, v), v)
        elif agg == "max":
            totals[name] = max(totals.get(name, v), v)
        else:                                # a mean, over samples (weight) or over connections
            w = c[weight] if weight else 1
            acc = means.setdefault(name, [0.0, 0])
            acc[0] += v * w
            acc[1] += w


_AGG = {f.name: (f.agg, f.weight) for f in FIELDS}      # (looked up once per counter)
_MEANS = tuple((f.name, f.weight) for f in FIELDS if f.agg == "mean")
