"""The indexes a report groups its rows by (``index=NAME``): one registry entry each.

An :class:`Index` says which fields of a row's :class:`GroupKey` it fills (they are
the row's key fields in NDJSON and CSV), how a row is titled in tables, how the key
is built from a socket's totals, what it needs from the collector and whether a
capture (``--read``) can group by it. The model, the reports, the command line and
the man page all read this registry; adding an index is adding an entry here.

The place indexes (cgroup, container, netns) name where a socket belongs from the
numbers its records carry, resolved on this host (tcpipstat/attribution.py).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import Callable, NamedTuple

from . import attribution

AF_INET6 = 10     # (records.AF_INET6: the address family the collector writes)


class GroupKey(NamedTuple):
    """What a report row groups by (a NamedTuple: built and hashed in C, once per socket).
    An index fills its own fields (:attr:`Index.fields`); the others stay None, so all
    keys of one index compare and sort as plain tuples."""
    index: str
    family: int | None = None
    laddr: int | None = None
    lport: int | None = None
    raddr: int | None = None
    rport: int | None = None
    pid: int | None = None          # 0: no process context was ever seen
    comm: str | None = None         # "": unknown
    cgroup: str | None = None       # its path; "": unknown (see cgroup_id)
    cgroup_id: int | None = None    # 0: not recorded
    container: str | None = None    # "-": the host; "": unknown
    runtime: str | None = None      # what runs it (docker, ..., systemd); "": none known
    netns: int | None = None        # the namespace's inode; 0: not recorded
    netns_name: str | None = None   # its ip netns name; "": none

    @classmethod
    def of(cls, index: str, t) -> "GroupKey":
        """The key of address tuple ``t`` (a records.Tuple) under an index that the tuple
        alone decides (every index but the process ones)."""
        ix = BY_NAME.get(index)
        if ix is None or ix.of_tuple is None:
            raise ValueError(index)
        return ix.of_tuple(t)


_new = tuple.__new__     # (a GroupKey made without NamedTuple's Python-level __new__)
_AFTER_TUPLE = (None,) * (len(GroupKey._fields) - 6)     # (index=tuple's unused fields)


@lru_cache(maxsize=65536)
def addr_text(family: int | None, value: int | None) -> str:
    """An address of a key as text; ``*`` when the key has none."""
    if value is None:
        return "*"
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(value))
    return str(ipaddress.IPv4Address(value & 0xFFFFFFFF))


def _family_text(key: GroupKey) -> str:
    return "ipv6" if key.family == AF_INET6 else "ipv4"


# How each key field is written in NDJSON and CSV (the value json/csv is given)
FIELD_VALUE: dict[str, Callable[[GroupKey], object]] = {
    "family": _family_text,
    "laddr": lambda k: addr_text(k.family, k.laddr),
    "lport": lambda k: k.lport,
    "raddr": lambda k: addr_text(k.family, k.raddr),
    "rport": lambda k: k.rport,
    "pid": lambda k: k.pid,
    "comm": lambda k: k.comm,
    # (unknown: null in NDJSON, empty in CSV)
    "cgroup": lambda k: k.cgroup or None,
    "cgroup_id": lambda k: k.cgroup_id or None,
    "container": lambda k: k.container or None,
    "runtime": lambda k: k.runtime or None,
    "netns": lambda k: k.netns or None,
    "netns_name": lambda k: k.netns_name or None,
}


def _tuple_title(k: GroupKey) -> str:
    la, ra = addr_text(k.family, k.laddr), addr_text(k.family, k.raddr)
    if k.family == AF_INET6:
        return f"[{la}]:{k.lport} <-> [{ra}]:{k.rport}"
    return f"{la}:{k.lport} <-> {ra}:{k.rport}"


def _unknown(what: str, value) -> str:
    return f"{what}: {value}" if value else f"{what}: unknown (no process context seen)"


_NOT_RECORDED = "unknown (not recorded)"


def _cgroup_key(st) -> GroupKey:
    return GroupKey("cgroup", cgroup=attribution.cgroups().path(st.cgroup) or "",
                    cgroup_id=st.cgroup)


def _cgroup_title(k: GroupKey) -> str:
    if not k.cgroup_id:
        return f"Cgroup: {_NOT_RECORDED}"
    return f"Cgroup: {k.cgroup or f'{k.cgroup_id} (no such cgroup now)'}"


def _container_key(st) -> GroupKey:
    path = attribution.cgroups().path(st.cgroup)
    cid, runtime = attribution.container_of(path)
    return GroupKey("container", container=cid, runtime=runtime)


def _container_title(k: GroupKey) -> str:
    if not k.container:
        return "Container: unknown (its cgroup is not known)"
    if k.container == attribution.HOST:
        return "Container: - (the host)"
    return f"Container: {k.container} ({k.runtime})"


def _netns_key(st) -> GroupKey:
    return GroupKey("netns", netns=st.netns, netns_name=attribution.netns_names().name(st.netns))


def _netns_title(k: GroupKey) -> str:
    if not k.netns:
        return f"Network namespace: {_NOT_RECORDED}"
    return f"Network namespace: {k.netns}" + (f" ({k.netns_name})" if k.netns_name else "")


@dataclass(frozen=True)
class Index:
    name: str
    fields: tuple[str, ...]          # the GroupKey fields it fills, in key order
    help: str                        # what it groups by (--help, the man page)
    title: Callable[[GroupKey], str]                 # a row's title in tables
    of_socket: Callable[[object], GroupKey]          # a socket's totals -> its row's key
    of_tuple: Callable[[object], GroupKey] | None = None   # an address tuple -> the key
    needs_process: bool = False      # needs the collector's process attribution
    offline: bool = True             # can group a capture (--read)
    place: bool = False              # groups by where sockets belong: its key fields are
                                     # CSV columns of its own reports only


INDEXES: tuple[Index, ...] = (
    Index("tuple", ("family", "laddr", "lport", "raddr", "rport"), "the whole socket tuple",
          _tuple_title,
          # (the fields of a records.Tuple follow the key's, in its order)
          lambda st: _new(GroupKey, ("tuple", *st.tuple, *_AFTER_TUPLE)),
          lambda t: _new(GroupKey, ("tuple", *t, *_AFTER_TUPLE))),
    Index("laddr", ("family", "laddr"), "the local address",
          lambda k: f"Local address: {addr_text(k.family, k.laddr)}",
          lambda st: GroupKey("laddr", st.tuple.family, laddr=st.tuple.laddr),
          lambda t: GroupKey("laddr", t.family, laddr=t.laddr)),
    Index("raddr", ("family", "raddr"), "the remote address",
          lambda k: f"Remote address: {addr_text(k.family, k.raddr)}",
          lambda st: GroupKey("raddr", st.tuple.family, raddr=st.tuple.raddr),
          lambda t: GroupKey("raddr", t.family, raddr=t.raddr)),
    Index("lport", ("lport",), "the local port",
          lambda k: f"Local port: {k.lport}",
          lambda st: GroupKey("lport", lport=st.tuple.lport),
          lambda t: GroupKey("lport", lport=t.lport)),
    Index("rport", ("rport",), "the remote port",
          lambda k: f"Remote port: {k.rport}",
          lambda st: GroupKey("rport", rport=st.tuple.rport),
          lambda t: GroupKey("rport", rport=t.rport)),
    Index("pid", ("pid",), "the process that last used the socket",
          lambda k: _unknown("Process", k.pid),
          lambda st: GroupKey("pid", pid=st.pid),
          needs_process=True, offline=False),
    Index("comm", ("comm",), "the command name of the process that last used the socket",
          lambda k: _unknown("Command", k.comm),
          lambda st: GroupKey("comm", comm=st.comm if st.pid else ""),
          needs_process=True, offline=False),
    Index("cgroup", ("cgroup", "cgroup_id"), "the socket's cgroup (v2)",
          _cgroup_title, _cgroup_key, offline=False, place=True),
    Index("container", ("container", "runtime"), "the container (or pod, or systemd "
          "service) the socket's cgroup is in, - for the host", _container_title,
          _container_key, offline=False, place=True),
    Index("netns", ("netns", "netns_name"), "the socket's network namespace",
          _netns_title, _netns_key, offline=False, place=True),
)

BY_NAME: dict[str, Index] = {ix.name: ix for ix in INDEXES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
OFFLINE_NAMES: tuple[str, ...] = tuple(ix.name for ix in INDEXES if ix.offline)
# The key fields of every index but the place ones, in key order: the key columns of
# every CSV report (a place index's report adds its own: csv_key_fields)
KEY_FIELDS: tuple[str, ...] = tuple(f for f in GroupKey._fields[1:]
                                    if any(f in ix.fields for ix in INDEXES if not ix.place))


def csv_key_fields(index: str) -> tuple[str, ...]:
    """The key columns of a CSV report grouped by ``index``, the index's name first."""
    return ("index", *KEY_FIELDS, *(f for f in BY_NAME[index].fields if f not in KEY_FIELDS))


def key_fields(key: GroupKey) -> dict[str, object]:
    """A row key's fields as NDJSON and CSV write them: the index, then its fields."""
    out: dict[str, object] = {"index": key.index}
    for f in BY_NAME[key.index].fields:
        out[f] = FIELD_VALUE[f](key)
    return out


def key_json(key: GroupKey) -> str:
    """:func:`key_fields` as compact JSON without its closing brace (what
    ``json.dumps(..., separators=(",", ":"))`` writes): the start of a row's object."""
    if key.index == "tuple":     # nearly every row of a large report: one format
        return (f'{{"index":"tuple","family":"{_family_text(key)}",'
                f'"laddr":"{addr_text(key.family, key.laddr)}","lport":{key.lport},'
                f'"raddr":"{addr_text(key.family, key.raddr)}","rport":{key.rport}')
    parts = ['{"index":' + encode_basestring_ascii(key.index)]
    for f in BY_NAME[key.index].fields:
        v = FIELD_VALUE[f](key)
        parts.append(f'"{f}":' + (encode_basestring_ascii(v) if type(v) is str
                                  else "null" if v is None else str(v)))
    return ",".join(parts)


def key_title(key: GroupKey) -> str:
    return BY_NAME[key.index].title(key)
