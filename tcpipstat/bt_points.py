"""The probe points the bpftrace collector can use on the kernel it runs on.

Asked of bpftrace itself (``bpftrace -lv PATTERN``), through the same command that then runs
the program: in the kernel lab that command runs in a guest whose kernel is not this host's,
so nothing here reads this host's tracefs. Each kernel difference is one choice below, made
by what the kernel has (detected), never by its version number.
"""
from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .counters import CA_COUNTERS

# What is listed: the tracepoints of the sock and tcp systems, and the tcp_* functions
# fentry/fexit (kfunc/kretfunc) can attach to (it needs BTF and the kernel's BPF
# trampolines; a function the compiler inlined is not there)
LISTINGS = ("tracepoint:sock:*", "tracepoint:tcp:*", "kfunc:tcp_*")
# kfuncs each counter needs, all of them (bt_templates/tcpipstat.bt.j2 says what each does)
KFUNCS = {
    "insegs": ("tcp_v4_rcv", "tcp_v6_rcv"),
    "rsts": ("tcp_v4_send_reset", "tcp_v6_send_reset", "tcp_send_active_reset"),
    "dack": ("tcp_delack_timer_handler", "tcp_delack_timer", "tcp_send_ack"),
    "listen": ("tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock"),
}
# What each choice below feeds (missing where the kernel gives it no point)
_FEEDS = {"insegs": ("InSegs",), "rsts": ("OutRsts",), "dack": ("DelayedACKs",),
          "listen": ("ListenOverflows", "ListenDrops")}
# Counters only a kernel's listing can make available (not known before bpftrace is asked)
ASKED = frozenset(c for feeds in _FEEDS.values() for c in feeds)
_PROBE = re.compile(r"(tracepoint:\w+:\w+|(?:kfunc|fentry):(?:\w+:)?\w+)\s*\Z")


@dataclass(frozen=True)
class KernelPoints:
    """Probe points (``tracepoint:SYS:NAME``, ``kfunc:NAME``) and their fields or arguments."""
    fields: dict[str, frozenset[str]]

    def has(self, point: str) -> bool:
        return point in self.fields

    def has_field(self, point: str, name: str) -> bool:
        return name in self.fields.get(point, ())

    def has_all(self, kfuncs) -> bool:
        return all(self.has(f"kfunc:{f}") for f in kfuncs)

    @classmethod
    def newest(cls) -> "KernelPoints":
        """What a current kernel has (6.10 or later, with BPF trampolines and the kfuncs of
        KFUNCS): for --dump-script where bpftrace is not there to ask."""
        sk, skb = frozenset({"sk"}), frozenset({"skb"})
        return cls({**{f"kfunc:{f}": sk for fs in KFUNCS.values() for f in fs},
                    "kfunc:tcp_v4_rcv": skb, "kfunc:tcp_v6_rcv": skb,
                    "tracepoint:tcp:tcp_send_reset": frozenset(
                        {"skbaddr", "skaddr", "state", "reason", "saddr", "daddr"}),
                    "tracepoint:sock:sock_send_length": frozenset({"sk", "ret", "protocol"}),
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
    def listing(pattern: str) -> str:
        res = subprocess.run([*cmd, "-lv", pattern], capture_output=True, text=True,
                             errors="replace", env=env, timeout=timeout)
        return res.stdout if res.returncode == 0 else ""

    # (all at once: each is a bpftrace start-up, and the run's start waits for them)
    with ThreadPoolExecutor(len(LISTINGS)) as pool:
        texts = list(pool.map(listing, LISTINGS))
    fields: dict[str, frozenset[str]] = {}
    for text in texts:
        fields.update(parse_listing(text))
    return KernelPoints(fields)


@dataclass(frozen=True)
class Choice:
    """Where the collector counts what, on one kernel (the template's variables)."""
    send: str           # SendBytes/SendMsgs: a tracepoint, a kretfunc or "" (not countable)
    recv: str           # RecvBytes/RecvMsgs
    retrans_err: bool   # tcp_retransmit_skb has its err field (it fires on failures too)
    destroy: bool       # tcp:tcp_destroy_sock: records are written as sockets are destroyed
    cong: bool = True   # tcp:tcp_cong_state_set: the cong group (--cong) can be counted
    rsts: str = ""      # OutRsts: "tracepoint" (tcp:tcp_send_reset), "kfunc" or "" (none)
    insegs: bool = False    # InSegs: kfuncs (KFUNCS, as each of the three below)
    dack: bool = False      # DelayedACKs
    listen: bool = False    # ListenOverflows, ListenDrops

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
        for what, feeds in _FEEDS.items():
            if not getattr(self, what):
                gone |= set(feeds)
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
        cong=points.has("tracepoint:tcp:tcp_cong_state_set"),
        rsts=_rsts(points),
        insegs=points.has_all(KFUNCS["insegs"]), dack=points.has_all(KFUNCS["dack"]),
        listen=points.has_all(KFUNCS["listen"]))


def _rsts(points: KernelPoints) -> str:
    """tcp:tcp_send_reset fires at every reset the kernel counts in OutRsts since Linux
    6.10 (commit 19822a980e19 "trace: tcp: fully support trace_tcp_send_reset"): the same
    commit gave it one sockaddr per side (saddr, daddr), in place of the per-family
    fields (saddr_v6...) of the event class it had shared with tcp_retransmit_skb. Before
    it, a reset answering a segment without a full socket (a closed port, TIME-WAIT) was
    not traced: the kfuncs where the stap collector counts them stand in."""
    tp = "tracepoint:tcp:tcp_send_reset"
    if points.has_field(tp, "saddr") and not points.has_field(tp, "saddr_v6"):
        return "tracepoint"
    return "kfunc" if points.has_all(KFUNCS["rsts"]) else ""
