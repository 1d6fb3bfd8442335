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

# What is listed: the tracepoints of the sock and tcp systems, the tcp_* functions
# fentry/fexit (kfunc/kretfunc) can attach to (it needs BTF and the kernel's BPF
# trampolines; a function the compiler inlined is not there), and two structs from BTF,
# which every kernel with BTF lists: whether struct proto still has the sendpage method
# (PATHS) and whether TCP_ZEROCOPY_RECEIVE has a copy buffer (copybuf_len, Linux 5.11)
LISTINGS = ("tracepoint:sock:*", "tracepoint:tcp:*", "kfunc:tcp_*", "struct proto",
            "struct tcp_zerocopy_receive", "kfunc:tls:tls_sw_*")
# kfuncs each counter needs, all of them (bt_templates/tcpipstat.bt.j2 says what each does)
KFUNCS = {
    "insegs": ("tcp_v4_rcv", "tcp_v6_rcv"),
    "rsts": ("tcp_v4_send_reset", "tcp_v6_send_reset", "tcp_send_active_reset"),
    "dack": ("tcp_delack_timer_handler", "tcp_delack_timer", "tcp_send_ack"),
    "listen": ("tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock"),
}
# Paths of the Socket group that do not pass sock_sendmsg() or sock_recvmsg(), where the
# sock_*_length tracepoints fire (nor tcp_sendmsg() or tcp_recvmsg(), their fallbacks): the
# kfunc whose exit counts each, and what the path is, as notes name it
PATHS = {"sendpage": ("tcp_sendpage", "sendfile(), splice() and vmsplice() into a socket "
                      "(tcp_sendpage(), before Linux 6.5)"),
         "splice_read": ("tcp_splice_read", "splice() out of a socket (tcp_splice_read())"),
         "zc_recv": ("tcp_zerocopy_receive", "getsockopt(TCP_ZEROCOPY_RECEIVE) "
                     "(tcp_zerocopy_receive())")}
PATH_COUNTERS = {"sendpage": ("SendBytes", "SendMsgs"), "splice_read": ("RecvBytes", "RecvMsgs"),
                 "zc_recv": ("RecvBytes", "RecvMsgs")}
# kTLS (software crypto): the tls module's functions that move a kTLS socket's plaintext,
# below sock_sendmsg()/sock_recvmsg() only for sendpage (before Linux 6.5) and splice();
# listed (and attached) where the module is loaded and has BTF: the counters they feed and
# what the path is, as notes name it
TLS_PATHS = {"tls:tls_sw_sendmsg": (("SendBytes", "SendMsgs"), "kTLS sockets' sends "
                                    "(tls_sw_sendmsg())"),
             "tls:tls_sw_sendpage": (("SendBytes", "SendMsgs"), "sendfile() and splice() into "
                                     "kTLS sockets (tls_sw_sendpage(), before Linux 6.5)"),
             "tls:tls_sw_recvmsg": (("RecvBytes", "RecvMsgs"), "kTLS sockets' receives "
                                    "(tls_sw_recvmsg())"),
             "tls:tls_sw_splice_read": (("RecvBytes", "RecvMsgs"), "splice() out of kTLS "
                                        "sockets (tls_sw_splice_read())")}
# What each choice below feeds (missing where the kernel gives it no point)
_FEEDS = {"insegs": ("InSegs",), "rsts": ("OutRsts",), "dack": ("DelayedACKs",),
          "listen": ("ListenOverflows", "ListenDrops")}
# Counters only a kernel's listing can make available (not known before bpftrace is asked)
ASKED = frozenset(c for feeds in _FEEDS.values() for c in feeds)
_PROBE = re.compile(r"(tracepoint:\w+:\w+|(?:kfunc|fentry):(?:\w+:)?\w+)\s*\Z")
_STRUCT = re.compile(r"struct (\w+) \{\s*\Z")
# a struct member's name: a function pointer's "(*name)", else the last word before ";"
_MEMBER = re.compile(r"\(\*(\w+)\)|(\w+)(?:\[[^]]*\])*;")


@dataclass(frozen=True)
class KernelPoints:
    """Probe points (``tracepoint:SYS:NAME``, ``kfunc:NAME``) and their fields or arguments,
    and structs (``struct:NAME``) and their members."""
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
                    "kfunc:tcp_splice_read": frozenset({"sock", "retval"}),
                    "kfunc:tcp_zerocopy_receive": frozenset({"sk", "zc", "retval"}),
                    "struct:proto": frozenset({"sendmsg", "recvmsg", "splice_eof"}),
                    "struct:tcp_zerocopy_receive": frozenset({"length", "copybuf_len"}),
                    "tracepoint:tcp:tcp_send_reset": frozenset(
                        {"skbaddr", "skaddr", "state", "reason", "saddr", "daddr"}),
                    "tracepoint:sock:sock_send_length": frozenset({"sk", "ret", "protocol"}),
                    "tracepoint:sock:sock_recv_length": frozenset({"sk", "ret", "protocol"}),
                    "tracepoint:sock:inet_sock_set_state": frozenset({"skaddr"}),
                    "tracepoint:tcp:tcp_retransmit_skb": frozenset({"skaddr", "err"}),
                    "tracepoint:tcp:tcp_destroy_sock": frozenset({"skaddr"}),
                    "tracepoint:tcp:tcp_cong_state_set": frozenset({"skaddr", "cong_state"})})


def parse_listing(text: str) -> dict[str, frozenset[str]]:
    """``bpftrace -lv`` output: a probe a line, then its fields indented ("__u8 saddr[4]"),
    or a struct ("struct NAME {", its members indented, "};"): ``struct:NAME``.
    bpftrace 0.17 lists ``kfunc:vmlinux:NAME``, later ones ``fentry:vmlinux:NAME``: both are
    kept as ``kfunc:NAME``, the spelling every version accepts; a module's function as
    ``kfunc:MODULE:NAME``."""
    out: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if line[:1].isspace() and current is not None:
            words = line.split()
            if current.startswith("struct:"):
                m = _MEMBER.search(line)
                out[current].update([m.group(1) or m.group(2)] if m else [])
            elif words:
                out[current].add(words[-1].split("[")[0].lstrip("*"))
            continue
        m, st = _PROBE.match(line.strip()), _STRUCT.match(line.strip())
        current = None
        if st:
            current = f"struct:{st.group(1)}"
            out.setdefault(current, set())
        elif m:
            kind, _, rest = m.group(1).partition(":")
            current = (f"kfunc:{rest.removeprefix('vmlinux:')}" if kind in ("kfunc", "fentry")
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
    # the PATHS' kretfuncs ("": not attached; on a kernel that has the path, it is missed)
    sendpage: str = ""
    splice_read: str = ""
    zc_recv: str = ""
    unseen: tuple[str, ...] = ()    # PATHS this kernel has that no point here counts
    tls: tuple[str, ...] = ()       # TLS_PATHS counted at their kretfuncs

    def missed(self) -> list[tuple[tuple[str, ...], str]]:
        """(counters, path) for each path of an available counter that this kernel has and
        the collector does not see: the counters are partial there, and said to be."""
        return [(PATH_COUNTERS[p], PATHS[p][1]) for p in self.unseen
                if not set(PATH_COUNTERS[p]) & self.missing]

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
    tcp_recvmsg() reads the same return value. The paths around both (PATHS) are counted
    at their own functions' exits, where the kernel lets BPF attach to them."""
    def pick(*candidates: str) -> str:
        return next((c for c in candidates if points.has(c.replace("kretfunc:", "kfunc:"))),
                    "")
    paths = _paths(points)
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
        listen=points.has_all(KFUNCS["listen"]),
        sendpage=paths.get("sendpage", ""), splice_read=paths.get("splice_read", ""),
        zc_recv=paths.get("zc_recv", ""), unseen=tuple(p for p in PATHS if p not in paths
                                                       and _has_path(points, p)),
        tls=_tls_paths(points))


def _tls_paths(points: KernelPoints) -> tuple[str, ...]:
    """The TLS_PATHS counted at their kretfuncs here: those listed, less the sends and
    receives the sock_*_length tracepoints count (they fire in sock_sendmsg() and
    sock_recvmsg(), above the tls module's functions: counted once)."""
    above = {"tls:tls_sw_sendmsg": "tracepoint:sock:sock_send_length",
             "tls:tls_sw_recvmsg": "tracepoint:sock:sock_recv_length"}
    return tuple(f for f in TLS_PATHS if points.has(f"kfunc:{f}")
                 and not points.has(above.get(f, "")))


def _paths(points: KernelPoints) -> dict[str, str]:
    """The PATHS whose kretfunc this kernel allows (TCP_ZEROCOPY_RECEIVE's only where its
    struct has the copy buffer the template reads)."""
    out = {p: f"kretfunc:{f}" for p, (f, _) in PATHS.items() if points.has(f"kfunc:{f}")}
    if not points.has_field("struct:tcp_zerocopy_receive", "copybuf_len"):
        out.pop("zc_recv", None)
    return out


def _has_path(points: KernelPoints, path: str) -> bool:
    """Does this kernel have the path, whether or not BPF can attach to it? Splice out of
    a socket and TCP_ZEROCOPY_RECEIVE (Linux 4.18) every kernel with BTF has; sendfile()
    and splice() into a socket reach tcp_sendpage() only while struct proto has the
    sendpage method (gone in Linux 6.5, commit dc97391e6610 "sock: Remove ->sendpage*() in
    favour of sendmsg(MSG_SPLICE_PAGES)"), which BTF tells where no kfunc is listed."""
    if path != "sendpage":
        return True
    return points.has("kfunc:tcp_sendpage") or points.has_field("struct:proto", "sendpage")


def ktls_missed(choice: Choice) -> list[tuple[tuple[str, ...], str]]:
    """(counters, path) of the kTLS paths ``choice`` does not see, for a host whose tls
    module is loaded (bpftrace cannot tell which sockets use it). The tracepoints see kTLS
    sends and receives; tls_sw_sendpage() exists only with tcp_sendpage() (gone in Linux
    6.5 with struct proto's sendpage, which tells)."""
    seen = set(choice.tls)
    if choice.send.startswith("tracepoint:"):
        seen.add("tls:tls_sw_sendmsg")
    if choice.recv.startswith("tracepoint:"):
        seen.add("tls:tls_sw_recvmsg")
    if not choice.sendpage and "sendpage" not in choice.unseen:
        seen.add("tls:tls_sw_sendpage")
    return [TLS_PATHS[f] for f in TLS_PATHS if f not in seen]


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
