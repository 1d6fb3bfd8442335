"""Owning processes of sockets that still exist (psutil), for tuples the probes
saw only in softirq context (no process to attribute them to)."""
from __future__ import annotations

import ipaddress
from typing import Iterable

from .model import SocketTotals
from .records import AF_INET6


def _norm(addr: str) -> int:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return int(ip.ipv4_mapped)
    return int(ip)


def fill_processes(sockets: Iterable[SocketTotals]) -> int:
    """Set pid/comm on sockets that have none and are still open. Returns how many."""
    want = {}
    for st in sockets:
        if not st.pid and not st.closed:
            t = st.tuple
            want[(t.laddr, t.lport, t.raddr, t.rport)] = st
    if not want:
        return 0
    try:
        import psutil
        conns = psutil.net_connections(kind="tcp")
    except Exception:  # psutil missing, or not permitted: a nicety, never an error
        return 0
    found = 0
    for c in conns:
        if not c.raddr or not c.pid:
            continue
        try:
            k = (_norm(c.laddr.ip), c.laddr.port, _norm(c.raddr.ip), c.raddr.port)
        except ValueError:
            continue
        st = want.get(k)
        if st is None or st.pid:
            continue
        try:
            name = psutil.Process(c.pid).name()
        except Exception:
            name = ""
        st.pid, st.comm = c.pid, name
        found += 1
    return found


__all__ = ["fill_processes", "AF_INET6"]
