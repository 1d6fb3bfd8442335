"""The counter catalogue: what tcpipstat can count, where in the kernel, and how it is shown.

A *unit* is one probe handler of the collector (for the SystemTap collector, the block
of the same name in tcpipstat/stp_templates/units.stp.j2). Its ``points`` are the probe
points it is attached to, as backend-neutral :class:`Probe` values (a function's entry
or return, a tracepoint) that each collector writes in its own syntax. A unit whose
points do not all resolve on a kernel (the probe check: stap -p2 of
render.render_probe_check) is left out of the script, and the counters it feeds are
reported as unavailable there: :func:`select` decides it. A counter fed by several units
(InSegs for IPv4 and IPv6, say) is available when at least one of its *primary* units is.

Groups are what the user selects with ``--groups``; sections are how reports
are laid out (like the classic tcpipstat.stp: Socket / Ip / Tcp / TcpExt).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping

GROUPS = ("socket", "tcp", "ip", "ext", "cong")
# cong (--cong) is not a default: without the tracepoint it is a probe on every ACK
DEFAULT_GROUPS = ("socket", "tcp", "ip", "ext")
SECTIONS = ("Socket", "Ip", "Tcp", "TcpExt", "Congestion")
# enum tcp_ca_state (include/uapi/linux/tcp.h), in its order: TCP_CA_Open = 0 ... TCP_CA_Loss = 4
CA_STATES = ("Open", "Disorder", "Cwr", "Recovery", "Loss")


@dataclass(frozen=True)
class Probe:
    """A probe point, whatever the collector: a kernel function's entry (``kprobe``) or
    return (``kretprobe``), or a tracepoint (``tracepoint``, target ``subsystem:event``).
    ``module``: the function is a module's (tls), not the kernel image's; ``module_file``:
    where its file is under /lib/modules/RELEASE (without a compression suffix)."""
    kind: str
    target: str
    module: str = ""
    module_file: str = ""


def kprobe(function: str) -> Probe:
    return Probe("kprobe", function)


def kretprobe(function: str) -> Probe:
    return Probe("kretprobe", function)


def module_kretprobe(module: str, file: str, function: str) -> Probe:
    return Probe("kretprobe", function, module, file)


def tracepoint(name: str) -> Probe:
    return Probe("tracepoint", name)


@dataclass(frozen=True)
class Counter:
    name: str
    section: str
    group: str
    description: str
    gauge: bool = False  # may go negative (a change, not a count)
    ipv4_only: bool = False  # probed on IPv4 paths only: n/a for IPv6 rows, not 0
    time_us: bool = False  # a duration in microseconds (tables show ms unless --us)


@dataclass(frozen=True)
class Unit:
    name: str
    group: str
    points: tuple[Probe, ...]
    counters: tuple[str, ...]
    primary: bool = True  # False: only adds coverage (e.g. IPv6) to a counter
    note: str = ""
    fallback_for: str = ""  # used only where the named unit's points do not resolve
    proc: bool = False      # runs in the process using the socket: tells which one it is
    ca_state: str = ""      # sees congestion states, this way (the report says it)

    @property
    def tracepoint(self) -> bool:
        """Does it need a tracepoint (left out with --kprobes-only)?"""
        return any(p.kind == "tracepoint" for p in self.points)


# Probes every collector has, whatever the groups (they feed no counter of their own)
SET_STATE = kprobe("tcp_set_state")        # closes (and the StateChanges unit)
ACK_RETURN = kretprobe("tcp_ack")          # --sample (and the CongStateK unit)
NEW_TASK = kprobe("wake_up_new_task")      # forks: the -c command's process tree
EXIT = kprobe("do_exit")                   # exits: the same tree
CORE_PROBES = {"set_state": SET_STATE, "ack_return": ACK_RETURN, "new_task": NEW_TASK,
               "exit": EXIT}

COUNTERS: tuple[Counter, ...] = (
    Counter("SendBytes", "Socket", "socket", "bytes the socket's users handed it and the kernel "
            "accepted: tcp_sendmsg() (write, send, sendmsg, sendmmsg, writev, MSG_ZEROCOPY, "
            "io_uring's IORING_OP_SEND, SENDMSG and SEND_ZC, which reach it through "
            "sock_sendmsg(); since Linux 6.5 sendfile(), splice() and vmsplice() into the socket "
            "too, as MSG_SPLICE_PAGES) and, before Linux 6.5, tcp_sendpage() (sendfile(), splice() "
            "and vmsplice() into the socket). On a kTLS socket (TCP_ULP tls, software crypto): "
            "the plaintext its users wrote, at the tls module's tls_sw_sendmsg(); the records tls "
            "hands TCP itself (tcp_sendmsg_locked(), before 6.5 do_tcp_sendpages(); 29 bytes more "
            "a record with TLS 1.2 AES-GCM) are not counted again. That needs the tls module's "
            "debug information (linux-image-*-dbg: found by the module's name on Debian 12, "
            "Linux 6.1; by its debug file's path where the module is compressed, as Debian 13's "
            "tls.ko.xz) and the module loaded before collection starts (SystemTap 4.8 does not "
            "probe a module loaded later; the report says when it was not). The bpftrace "
            "collector counts the same plaintext at its tracepoint (Linux 6.12), and where it "
            "probes tcp_sendmsg() (Linux 6.1) at the exit of tls_sw_sendmsg() and "
            "tls_sw_sendpage(), where the tls module was loaded, with its BTF, when bpftrace "
            "listed its probe points (kept for the boot); where not, its report says what it "
            "misses. On kTLS sockets sendfile() and splice() count "
            "as on others: before Linux 6.5 at tls_sw_sendpage(), since at tls_sw_sendmsg(). "
            "Not counted: kTLS with NIC offload (tls_device_sendmsg())"),
    Counter("SendMsgs", "Socket", "socket", "sends that moved at least one byte: one per write(), "
            "send(), sendmsg() or writev() call, per message of sendmmsg() and per io_uring send "
            "completion (a SEND_ZC once, not its notification; with MSG_WAITALL io_uring resends "
            "what a short send left: one per attempt); for sendfile() "
            "and splice() one per batch of pipe buffers handed to TCP (at most 16 pages with "
            "the default pipe: one per call of at most 64 KiB), a tcp_sendmsg() call since "
            "Linux 6.5, before it the batch's last tcp_sendpage() call (the one without "
            "MSG_SENDPAGE_NOTLAST); on a kTLS socket one per write() however many records"),
    Counter("RecvBytes", "Socket", "socket", "bytes the socket's users took from it: "
            "tcp_recvmsg() (read, recv, recvmsg, recvmmsg, readv, io_uring's IORING_OP_RECV and "
            "RECVMSG, through sock_recvmsg()), "
            "tcp_splice_read() (splice() out of the socket) and tcp_zerocopy_receive() "
            "(getsockopt TCP_ZEROCOPY_RECEIVE: the bytes it mapped plus those it copied to its "
            "copy buffer; what it leaves to recv(), its recv_skip_hint, counts there); the same "
            "on Linux 6.1 and 6.12. On a kTLS socket: the plaintext its users read, at the tls "
            "module's tls_sw_recvmsg() (tls takes the records from TCP's receive queue itself: "
            "not counted), with SendBytes' conditions (debug information, module loaded first; "
            "bpftrace: its tracepoint, or tls_sw_recvmsg()'s exit where it probes tcp_recvmsg()), "
            "and splice() out of a kTLS socket at tls_sw_splice_read() (both collectors). "
            "Not what kernel users read "
            "with tcp_read_sock() (strparser, NFS)"),
    Counter("RecvMsgs", "Socket", "socket", "receives that moved at least one byte: one per "
            "read(), recv(), recvmsg() or readv() call, per message of recvmmsg(), per io_uring "
            "receive completion (with MSG_WAITALL: per attempt), per splice() "
            "out of the socket and per getsockopt(TCP_ZEROCOPY_RECEIVE)"),
    Counter("InReceives", "Ip", "ip", "IP datagrams received carrying TCP (ip_rcv_core; IPv6: "
            "ip6_rcv_core: where the kernel counts InReceives, on both the single and the "
            "batched (GRO list) receive path)"),
    Counter("OutRequests", "Ip", "ip", "IP datagrams carrying TCP passed to ip_output() (IPv6: "
            "ip6_xmit(), where the kernel counts Ip6OutRequests for TCP)"),
    Counter("InDiscards", "Ip", "ip", "received datagrams dropped by ip_rcv_core() (InDiscards, "
            "InHdrErrors, InTruncatedPkts, checksum errors); IPv6: by ip6_rcv_core() (the "
            "kernel's Ip6InDiscards, Ip6InHdrErrors and Ip6InTruncatedPkts)"),
    Counter("InNoRoutes", "Ip", "ip", "received datagrams with no route (ENETUNREACH)",
            ipv4_only=True),
    Counter("InAddrErrors", "Ip", "ip",
            "received datagrams with an invalid destination (EHOSTUNREACH)", ipv4_only=True),
    Counter("InUnknownProtos", "Ip", "ip", "datagrams answered by ICMP protocol unreachable",
            ipv4_only=True),
    Counter("ForwDatagrams", "Ip", "ip", "datagrams forwarded (ip_forward_finish)",
            ipv4_only=True),
    Counter("ReasmTimeout", "Ip", "ip", "reassembly time-outs answered by ICMP", ipv4_only=True),
    Counter("ReasmReqds", "Ip", "ip", "fragments passed to ip_defrag()", ipv4_only=True),
    Counter("FragOKs", "Ip", "ip", "datagrams fragmented successfully", ipv4_only=True),
    Counter("FragFails", "Ip", "ip", "datagrams that needed fragmenting but could not be",
            ipv4_only=True),
    Counter("ActiveOpens", "Tcp", "tcp",
            "connections opened by connect() (tcp_connect() succeeded)"),
    Counter("PassiveOpens", "Tcp", "tcp", "child sockets created from a listener for an "
            "incoming connection; like the kernel, counts the rare duplicate child built when "
            "two CPUs complete the same handshake at once"),
    Counter("AttemptFails", "Tcp", "tcp", "connections that died in SYN-SENT or SYN-RECV"),
    Counter("EstabResets", "Tcp", "tcp",
            "ESTABLISHED or CLOSE-WAIT sockets that went straight to CLOSED"),
    Counter("CurrEstab", "Tcp", "tcp",
            "change in ESTABLISHED/CLOSE-WAIT sockets (+1 in, -1 out)", gauge=True),
    Counter("InSegs", "Tcp", "tcp", "TCP segments received (tcp_v4_rcv/tcp_v6_rcv)"),
    Counter("OutSegs", "Tcp", "tcp",
            "TCP segments sent, retransmissions excluded (as the kernel counts)"),
    Counter("RetransSegs", "Tcp", "tcp",
            "segments retransmitted (tcp_retransmit_skb() succeeded)"),
    Counter("OutRsts", "Tcp", "tcp", "resets sent"),
    Counter("DelayedACKs", "TcpExt", "ext", "ACKs sent by the delayed-ACK timer"),
    Counter("ListenOverflows", "TcpExt", "ext",
            "handshakes dropped because the accept queue was full"),
    Counter("ListenDrops", "TcpExt", "ext", "handshakes dropped at the listener (any reason)"),
    Counter("TCPMemoryPressures", "TcpExt", "ext", "times TCP entered memory pressure"),
    Counter("CaOpenUs", "Congestion", "cong", "time in the Open congestion state (no loss "
            "suspected), from the connection's establishment or, for a socket open before "
            "collection, from its first state change seen", time_us=True),
    Counter("CaDisorderUs", "Congestion", "cong", "time in Disorder (duplicate ACKs or SACKs "
            "seen, no reduction yet)", time_us=True),
    Counter("CaCwrUs", "Congestion", "cong",
            "time in CWR (window reduced for ECN or local congestion)", time_us=True),
    Counter("CaRecoveryUs", "Congestion", "cong", "time in Recovery (fast retransmit)",
            time_us=True),
    Counter("CaLossUs", "Congestion", "cong", "time in Loss (after a retransmission time-out)",
            time_us=True),
    Counter("CaChanges", "Congestion", "cong", "congestion-state changes"),
)

# the time in each congestion state, in CA_STATES order
CA_TIME_COUNTERS = tuple(f"Ca{s}Us" for s in CA_STATES)
CA_COUNTERS = CA_TIME_COUNTERS + ("CaChanges",)

_k, _r = kprobe, kretprobe
_TLS = "kernel/net/tls/tls.ko"      # net/tls/ since Linux 4.13, where kTLS came in
UNITS: tuple[Unit, ...] = (
    Unit("sendmsg", "socket", (_r("tcp_sendmsg"),), ("SendBytes", "SendMsgs"), proc=True),
    Unit("sendpage", "socket", (_r("tcp_sendpage"),), ("SendBytes", "SendMsgs"), primary=False,
         proc=True, note="sendfile()/splice() into a socket before Linux 6.5; from 6.5 they "
         "reach tcp_sendmsg() (MSG_SPLICE_PAGES) and tcp_sendpage() is gone"),
    Unit("recvmsg", "socket", (_r("tcp_recvmsg"),), ("RecvBytes", "RecvMsgs"), proc=True),
    Unit("splice_read", "socket", (_r("tcp_splice_read"),), ("RecvBytes", "RecvMsgs"),
         primary=False, proc=True, note="splice() out of a socket; it reads through "
         "tcp_read_sock(), which kernel users call too: not probed"),
    Unit("zerocopy_receive", "socket", (_r("tcp_zerocopy_receive"),), ("RecvBytes", "RecvMsgs"),
         primary=False, proc=True, note="getsockopt(TCP_ZEROCOPY_RECEIVE); its copies go "
         "through tcp_recvmsg_locked(), not tcp_recvmsg()"),
    # kTLS (software crypto): a socket with TCP_ULP "tls" and TLS_TX/TLS_RX has its
    # sendmsg/recvmsg replaced by the tls module's, which move the application's plaintext
    # and never call tcp_sendmsg()/tcp_recvmsg(); the records they hand TCP (through
    # tcp_sendmsg_locked(), before Linux 6.5 do_tcp_sendpages()) or read from it (its own
    # parser, over tcp_read_sock()) are not counted again. A module's function: the unit
    # resolves where the module's debug information is, and counts once the module loads.
    Unit("tls_sendmsg", "socket", (module_kretprobe("tls", _TLS, "tls_sw_sendmsg"),),
         ("SendBytes", "SendMsgs"), primary=False, proc=True,
         note="kTLS: the plaintext of write()/send()/sendmsg() on a kTLS socket"),
    Unit("tls_sendpage", "socket", (module_kretprobe("tls", _TLS, "tls_sw_sendpage"),),
         ("SendBytes", "SendMsgs"), primary=False, proc=True,
         note="kTLS before Linux 6.5: sendfile()/splice() into a kTLS socket (from 6.5 they "
         "reach tls_sw_sendmsg(), as MSG_SPLICE_PAGES, and tls_sw_sendpage() is gone)"),
    Unit("tls_recvmsg", "socket", (module_kretprobe("tls", _TLS, "tls_sw_recvmsg"),),
         ("RecvBytes", "RecvMsgs"), primary=False, proc=True,
         note="kTLS: the plaintext read()/recv()/recvmsg() took from a kTLS socket"),
    Unit("tls_splice_read", "socket", (module_kretprobe("tls", _TLS, "tls_sw_splice_read"),),
         ("RecvBytes", "RecvMsgs"), primary=False, proc=True,
         note="kTLS: the plaintext splice() took out of a kTLS socket"),
    Unit("accept", "socket", (_r("inet_csk_accept"),), (), proc=True,
         note="no counter: tells which process owns an accepted socket"),
    Unit("InReceives", "ip", (_k("ip_rcv_core"),), ("InReceives",),
         note="IPv4: both ip_rcv() and ip_list_rcv() (GRO batches) call it"),
    Unit("InReceives6", "ip", (_k("ip6_rcv_core"),), ("InReceives",), primary=False,
         note="IPv6: both ipv6_rcv() and ipv6_list_rcv() (GRO batches) call it"),
    Unit("OutRequests", "ip", (_k("ip_output"),), ("OutRequests",), note="IPv4"),
    Unit("OutRequests6", "ip", (_k("ip6_xmit"),), ("OutRequests",), primary=False,
         note="IPv6: every TCP datagram goes out through ip6_xmit()"),
    Unit("InDiscards", "ip", (_r("ip_rcv_core"),), ("InDiscards",), note="IPv4"),
    Unit("InDiscards6", "ip", (_r("ip6_rcv_core"),), ("InDiscards",), primary=False,
         note="IPv6"),
    Unit("InRouteErrors", "ip", (_r("ip_route_input_noref"),), ("InNoRoutes", "InAddrErrors")),
    Unit("IcmpErrors", "ip", (_k("__icmp_send"),), ("InUnknownProtos", "ReasmTimeout"),
         note="icmp_send() is an inline wrapper of __icmp_send() since Linux 5.7"),
    Unit("ForwDatagrams", "ip", (_k("ip_forward_finish"),), ("ForwDatagrams",)),
    Unit("ReasmReqds", "ip", (_k("ip_defrag"),), ("ReasmReqds",)),
    Unit("Frag", "ip", (_r("ip_fragment"),), ("FragOKs", "FragFails")),
    Unit("ActiveOpens", "tcp", (_r("tcp_connect"),), ("ActiveOpens",), proc=True),
    Unit("PassiveOpens", "tcp", (_r("tcp_v4_syn_recv_sock"),), ("PassiveOpens",)),
    Unit("PassiveOpens6", "tcp", (_r("tcp_v6_syn_recv_sock"),), ("PassiveOpens",),
         primary=False),
    Unit("AttemptFails", "tcp", (_k("tcp_done"),), ("AttemptFails",)),
    Unit("StateChanges", "tcp", (SET_STATE,), ("EstabResets", "CurrEstab")),
    Unit("InSegs", "tcp", (_k("tcp_v4_rcv"),), ("InSegs",)),
    Unit("InSegs6", "tcp", (_k("tcp_v6_rcv"),), ("InSegs",), primary=False),
    Unit("OutSegs", "tcp", (_k("__tcp_transmit_skb"),), ("OutSegs",)),
    Unit("OutSegsCtl", "tcp", (_k("tcp_v4_send_ack"), _k("tcp_v4_send_reset")),
         ("OutSegs", "OutRsts"), primary=False),
    Unit("OutSegsCtl6", "tcp", (_k("tcp_v6_send_response"),), ("OutSegs", "OutRsts"),
         primary=False, note="IPv6 ACKs and resets sent without a full socket"),
    Unit("OutSegsSynack", "tcp", (_k("tcp_make_synack"),), ("OutSegs",), primary=False),
    Unit("RetransSegs", "tcp", (_r("tcp_retransmit_skb"),), ("RetransSegs",)),
    Unit("OutRsts", "tcp", (_k("tcp_send_active_reset"),), ("OutRsts",)),
    Unit("DelayedACKs", "ext", (_k("tcp_delack_timer_handler"), _r("tcp_delack_timer_handler"),
                                _r("tcp_delack_timer"), _k("tcp_send_ack")), ("DelayedACKs",)),
    Unit("ListenDrops", "ext", (_r("tcp_v4_syn_recv_sock"),), ("ListenOverflows", "ListenDrops")),
    Unit("ListenDrops6", "ext", (_r("tcp_v6_syn_recv_sock"),),
         ("ListenOverflows", "ListenDrops"), primary=False),
    Unit("TCPMemoryPressures", "ext", (_k("tcp_enter_memory_pressure"),),
         ("TCPMemoryPressures",)),
    # Congestion states. The kernel changes icsk_ca_state only in tcp_set_ca_state(), an
    # inline function: its tracepoint (tcp:tcp_cong_state_set, added by the kernel change
    # "tcp: Add tracepoint for tcp_set_ca_state") sees every change. Where it does not
    # resolve (older kernels, or a stap that cannot use the kernel's tracepoints: trixie's
    # 5.1 with 6.12) the state is read after the functions that change it return: tcp_ack()
    # (every state change made while an ACK is processed: fast retransmit, recovery, undo,
    # TLP, CWR's end), tcp_enter_loss() (RTO) and tcp_simple_retransmit() (path MTU). A
    # change made elsewhere is seen at the next of those calls.
    Unit("CongState", "cong", (tracepoint("tcp:tcp_cong_state_set"),), CA_COUNTERS,
         ca_state="tracepoint tcp:tcp_cong_state_set"),
    Unit("CongStateK", "cong", (ACK_RETURN, _r("tcp_enter_loss"), _r("tcp_simple_retransmit")),
         CA_COUNTERS, fallback_for="CongState",
         ca_state="kprobes: tcp_ack, tcp_enter_loss, tcp_simple_retransmit"),
)


@dataclass(frozen=True)
class Selection:
    """What a collector holds for some groups on one kernel."""
    units: tuple[Unit, ...]           # the units it runs, in catalogue order
    available: tuple[str, ...]        # the counters they feed, in catalogue order
    unavailable: tuple[str, ...]      # the groups' counters this kernel cannot feed
    cong: str                         # how congestion states are seen ("": not at all)
    # how stap names a point where it is not its usual spelling (render.stap_spellings)
    spelled: Mapping[Probe, str] = field(default_factory=dict)

    @property
    def proc(self) -> bool:
        """Does some unit tell which process uses a socket?"""
        return any(u.proc for u in self.units)


def units_for_groups(groups: Collection[str], tracepoints: bool = True) -> list[Unit]:
    """The groups' units; tracepoints=False (--kprobes-only): none that needs a tracepoint."""
    return [u for u in UNITS if u.group in groups and (tracepoints or not u.tracepoint)]


def counters_for_units(units: Iterable[Unit]) -> list[str]:
    """Counters fed by a primary unit among ``units``, in catalogue order."""
    fed = {c for u in units if u.primary for c in u.counters}
    return [c.name for c in COUNTERS if c.name in fed]


def select(groups: Collection[str], tracepoints: bool = True,
           resolved: Collection[Probe] | None = None) -> Selection:
    """The units to run for ``groups`` where the probe points ``resolved`` exist (None:
    all of them, e.g. for --dump-script; a mapping: each with its spelling in stap's
    syntax, render.resolve_points); tracepoints=False (--kprobes-only): none that
    needs a tracepoint. A fallback runs only without the unit it stands in for, and a
    secondary unit only with a primary unit of its counter (its array would not exist)."""
    wanted = units_for_groups(groups, tracepoints)
    ok = [u for u in wanted if resolved is None or all(p in resolved for p in u.points)]
    names = {u.name for u in ok}
    ok = [u for u in ok if u.fallback_for not in names]
    fed = set(counters_for_units(ok))
    units = tuple(u for u in ok if u.primary or u.counters[0] in fed)
    available = tuple(counters_for_units(units))
    unavailable = tuple(c for c in counters_for_units(wanted) if c not in available)
    cong = next((u.ca_state for u in units if u.ca_state), "")
    spelled = dict(resolved) if isinstance(resolved, Mapping) else {}
    return Selection(units, available, unavailable, cong, spelled)


def all_points() -> list[Probe]:
    return points_for_groups(GROUPS)


def points_for_groups(groups: Collection[str], tracepoints: bool = True) -> list[Probe]:
    """The probe points of the groups' units, each once, in catalogue order: what the
    probe check asks about. Per group set, because resolving a tracepoint (the cong
    group's) makes stap build a helper module against the kernel headers, which costs
    tens of seconds the first time: runs without --cong (or with --kprobes-only,
    tracepoints=False) must not pay it."""
    seen: dict[Probe, None] = {}
    for u in units_for_groups(groups, tracepoints):
        for p in u.points:
            seen.setdefault(p, None)
    return list(seen)
