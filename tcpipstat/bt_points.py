"""The probe points the bpftrace collector can use on the kernel it runs on.

Asked of bpftrace itself (``bpftrace -lv PATTERN``), through the same command that then runs
the program: in the kernel lab that command runs in a guest whose kernel is not this host's,
so nothing here reads this host's tracefs. Each kernel difference is one choice below, made
by what the kernel has (detected), never by its version number.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from .counters import CA_COUNTERS

# What is listed: the tracepoints of the sock and tcp systems, and whether fexit (kretfunc)
# can attach to tcp_sendmsg/tcp_recvmsg (it needs BTF and the kernel's BPF trampolines)
LISTINGS = ("tracepoint:sock:*", "tracepoint:tcp:*", "kfunc:tcp_*msg")
_PROBE = re.compile(r"(tracepoint:\w+:\w+|(?:kfunc|fentry):(?:\w+:)?\w+)\s*\Z")


@dataclass(frozen=True)
class KernelPoints:
    """Probe points (``tracepoint:SYS:NAME``, ``kfunc:NAME``) and their fields or arguments."""
    fields: dict[str, frozenset[str]]

    def has(self, point: str) -> bool:
        return point in self.fields

    def has_field(self, point: str, name: str) -> bool:
        return name in self.fields.get(point, ())

    @classmethod
    def newest(cls) -> "KernelPoints":
        """What a current kernel has (6.3 or later): for --dump-script where bpftrace is not
        there to ask."""
        return cls({"tracepoint:sock:sock_send_length": frozenset({"sk", "ret", "protocol"}),
                    "tracepoint:sock:sock_recv_length": frozenset({"sk", "ret", "protocol"}),
                    "tracepoint:sock:inet_sock_set_state": frozenset({"skaddr"}),
                    "tracepoint:tcp:tcp_retransmit_skb": frozenset({"skaddr", "err"}),
                    "tracepoint:tcp:tcp_destroy_sock": frozenset({"skaddr"}),
                    "tracepoint:tcp:tcp_cong_state_set": frozenset({"skaddr", "cong_state"})})


def parse_listing(text: str) -> dict[str, frozenset[str]]:
    """``bpftrace -lv`` output: a probe a line, then its fields indented ("__u8 saddr[4]").
    bpftrace 0.17 lists ``kfunc:vmlinux:NAME``, later ones ``fentry:vmlinux:NAME``: both are
    kept as ``kfunc:NAME``, the spelling every version accepts."""
    out: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if line[:1].isspace() and current is not None:
            words = line.split()
            if words:
                out[current].add(words[-1].split("[")[0].lstrip("*"))
            continue
        m = _PROBE.match(line.strip())
        current = None
        if m:
            kind, _, rest = m.group(1).partition(":")
            current = (f"kfunc:{rest.rpartition(':')[2]}" if kind in ("kfunc", "fentry")
                       else m.group(1))
            out.setdefault(current, set())
    return {k: frozenset(v) for k, v in out.items()}


def list_points(cmd: list[str], env: dict | None = None, timeout: float = 600) -> KernelPoints:
    """Ask ``cmd`` (bpftrace or its stand-in) for LISTINGS. A listing that fails (bpftrace
    0.17 aborts listing kfuncs where tracefs is locked) lists nothing: those points are
    not there to use."""
    fields: dict[str, frozenset[str]] = {}
    for pattern in LISTINGS:
        res = subprocess.run([*cmd, "-lv", pattern], capture_output=True, text=True,
                             errors="replace", env=env, timeout=timeout)
        if res.returncode == 0:
            fields.update(parse_listing(res.stdout))
    return KernelPoints(fields)


@dataclass(frozen=True)
class Choice:
    """Where the collector counts what, on one kernel (the template's variables)."""
    send: str           # SendBytes/SendMsgs: a tracepoint, a kretfunc or "" (not countable)
    recv: str           # RecvBytes/RecvMsgs
    retrans_err: bool   # tcp_retransmit_skb has its err field (it fires on failures too)
    destroy: bool       # tcp:tcp_destroy_sock: records are written as sockets are destroyed
    cong: bool = True   # tcp:tcp_cong_state_set: the cong group (--cong) can be counted

    @property
    def missing(self) -> frozenset[str]:
        """Counters this kernel gives no point for."""
        gone = set()
        if not self.send:
            gone |= {"SendBytes", "SendMsgs"}
        if not self.recv:
            gone |= {"RecvBytes", "RecvMsgs"}
        if not self.cong:
            gone |= set(CA_COUNTERS)
        return frozenset(gone)


def choose(points: KernelPoints) -> Choice:
    """The best point for each: the sock_*_length tracepoints (Linux 6.3, commit
    6e6eda44b939 "net: sock: add tracepoint for send recv length") count in sock_sendmsg()
    and sock_recvmsg() what the protocol returned; before them, fexit on tcp_sendmsg() and
    tcp_recvmsg() reads the same return value."""
    def pick(*candidates: str) -> str:
        return next((c for c in candidates if points.has(c.replace("kretfunc:", "kfunc:"))),
                    "")
    return Choice(
        send=pick("tracepoint:sock:sock_send_length", "kretfunc:tcp_sendmsg"),
        recv=pick("tracepoint:sock:sock_recv_length", "kretfunc:tcp_recvmsg"),
        # the err field came with the tracepoint firing on failed retransmissions too
        retrans_err=points.has_field("tracepoint:tcp:tcp_retransmit_skb", "err"),
        destroy=points.has("tracepoint:tcp:tcp_destroy_sock"),
        # (without it, congestion states are not seen: the cong group is n/a)
        cong=points.has("tracepoint:tcp:tcp_cong_state_set"))
