"""man/tcpipstat.8, generated from the same definitions as --help (cli.OPTIONS) and
the counter catalogue (counters.COUNTERS):

    python3 -m tcpipstat.manpage > man/tcpipstat.8

tests/test_manpage.py fails when the committed page is out of date.
"""
from __future__ import annotations

from . import __version__
from .cli import OPTIONS, PROG, SUMMARY
from .counters import COUNTERS, GROUPS, SECTIONS, UNITS
from .render import stap_point
from .estats import EVARS, TABLES as ESTATS_TABLES, UNAVAILABLE as ESTATS_UNAVAILABLE
from .series import FIELDS as SERIES_FIELDS
from .capture.fields import FIELDS as CAPTURE_FIELDS
from .filters import MAX_FILTERS


def _sentence(text: str) -> str:
    """A catalogue description as a man-page sentence: capitalised, a full stop, escaped."""
    return _esc(text[0].upper() + text[1:] + ".")


def _esc(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + l) if l.startswith((".", "'")) else l for l in out.split("\n"))


def _opt_line(o) -> str:
    flags = ", ".join(f"\\fB{_esc(f)}\\fR" + (f" \\fI{_esc(o.metavar)}\\fR" if o.metavar and o.action in ("store", "append") else "")
                      for f in o.flags)
    if o.classic:
        flags += f", \\fB{o.classic}=\\fR\\fIVALUE\\fR"
    return flags


def render_man() -> str:
    L: list[str] = []
    a = L.append
    a(f'.TH TCPIPSTAT 8 "" "{PROG} {__version__}" "System Manager\'s Manual"')
    a(".SH NAME")
    a(f"{PROG} \\- {_esc(SUMMARY)}")
    a(".SH SYNOPSIS")
    a(f".B {PROG}")
    a("[\\fIoptions\\fR] [\\fBindex=\\fR\\fItuple|laddr|raddr|lport|rport|pid|comm\\fR] [\\fBtimeout=\\fR\\fIN\\fR] "
      "[\\fBinterval=\\fR\\fIN\\fR] [\\fBnozeros=\\fR\\fI0|1\\fR] [\\fBonclose=\\fR\\fI0|1\\fR] [\\fIFILTER\\fR ...]")
    a(".br")
    a(f".B {PROG} --check")
    a("[\\fB-r\\fR \\fIKVER\\fR] [\\fB--json\\fR]")
    a(".br")
    a(f".B {PROG} --read")
    a("\\fIFILE\\fR [\\fBindex=\\fR\\fItuple|laddr|raddr|lport|rport\\fR] [\\fB--json\\fR|\\fB--csv\\fR] "
      "[\\fB--sort\\fR \\fICOUNTER\\fR] [\\fIFILTER\\fR ...]")
    a(".SH DESCRIPTION")
    a(_esc("tcpipstat counts the kernel's SNMP MIB events (the Tcp, Ip and TcpExt counters of "
           "netstat -s) and the bytes and messages sent and received, per TCP socket or per group of "
           "sockets. It generates a SystemTap script, compiles it once per kernel (the module is cached: "
           "filters and other options are passed at run time and never recompile), loads it with staprun, "
           "reads the records it writes and prints a report: tables, NDJSON (--json) or CSV (--csv)."))
    a(".PP")
    a(_esc("It keeps the command language of SystemTap's classic tcpipstat.stp example (index=, timeout=, "
           "nozeros=, onclose=, address filters) and adds IPv6 and v4-mapped sockets, CIDR prefixes, port "
           "ranges, the process that uses each socket (index=pid, index=comm, -x PID; with -c only the "
           "command's own process tree), interval snapshots, sorting and --top, a host diagnosis (--check) "
           "and machine-readable output."))
    a(".SS Processes")
    a(_esc("A socket belongs to the process in whose context the kernel last sent, received, connected or "
           "accepted on it (taken inside the probe, so processes that live for milliseconds are caught). "
           "Sockets only ever touched in softirq context (a handshake that never completed, a reset to a "
           "closed port) have no process: index=pid and index=comm show them as unknown, and -x and the "
           "-c process tree leave them out. The -c process tree is the command and every process it "
           "starts, followed at fork (a daemon it leaves behind, re-parented to init, still counts). "
           "Process attribution comes from the socket group's probes."))
    a(".SS Intervals")
    a(_esc("With interval=N (--interval N) the collector writes out everything it holds every N seconds, "
           "followed by a mark; each snapshot shows the counts since the previous one, so the snapshots add "
           "up to the whole run. What happens after the last full interval is printed as a last, partial "
           "snapshot. In NDJSON and CSV every row carries interval, time (UTC, ISO 8601) and final."))
    a(".SS Captures (\\-\\-read)")
    a(_esc("With --read FILE, tcpipstat reports a packet capture instead of collecting: pcap (microsecond "
           "or nanosecond) or pcapng, of Ethernet (VLAN tags included), Linux cooked (SLL, SLL2: tcpdump -i any), "
           "raw IP or BSD loopback, IPv4 and IPv6. No root, SystemTap or debuginfo is needed. One row is one TCP "
           "connection; the capture sees both of its ends, so local is a convention: the side that opened the "
           "connection (sent the SYN), remote the side that accepted it; when the capture began after the "
           "handshake, local is the sender of the first packet seen and the row is marked as open before the "
           "capture. Filters apply to that orientation ('*:*-*:80' selects connections to port 80), "
           "index=tuple|laddr|raddr|lport|rport group as live; index=pid and index=comm are not available (a "
           "capture does not say which process used a connection). The counters are those a capture can "
           "show (see FIELDS, From a capture): per direction segments, bytes, retransmissions, out-of-order segments, "
           "duplicate ACKs, zero windows and resets, opens, and times: round-trip samples, handshake, time to "
           "first response byte, transfer time. Their definitions follow tcptrace's (tcptrace -l -r), and the "
           "test suite compares the two on the same captures. A packet cut by the snapshot length still counts "
           "its bytes (from its IP header); one cut inside its headers, one of an unsupported link type in a "
           "pcapng file, or an IPv4 fragment is skipped and counted in a note. A file that is not a capture, or "
           "of an unsupported link type, is an error (exit status 2); a file that ends inside a packet (a "
           "truncated capture) is reported up to there, then the error is printed (exit status 1). The file is "
           "read as a stream: memory grows with the number of connections, not with the number of packets."))
    a(".SH OPTIONS")
    for o in OPTIONS:
        a(".TP")
        a(_opt_line(o))
        a(_sentence(o.help))
    a(".SH FILTERS")
    a(_esc("A filter is <laddr>:<lport>-<raddr>:<rport>. Several filters are ORed (at most "
           f"{MAX_FILTERS}); with none, every socket is counted."))
    a(".TP\n.B *")
    a(_esc("Any address of either family, or any port."))
    a(".TP\n.B 10.*.*.*")
    a(_esc("Dotted IPv4; each octet may be *. *.*.*.* is any IPv4 address (IPv6 sockets are not matched)."))
    a(".TP\n.B 10.0.0.0/8")
    a(_esc("An IPv4 prefix."))
    a(".TP\n.B [::1], [2001:db8::/32]")
    a(_esc("An IPv6 address or prefix, in brackets."))
    a(".TP\n.B 8000..8080")
    a(_esc("A port range, both ends included."))
    a(".PP")
    a(_esc("Sockets of the AF_INET6 family that carry IPv4 (v4-mapped, e.g. accepted by a listener on ::) "
           "are shown and filtered as IPv4, with their real addresses."))
    a(".SH FIELDS")
    a(_esc("Counters are grouped as the report shows them (" + " / ".join(SECTIONS) + "). Each belongs "
           "to a group selectable with --groups (" + ", ".join(GROUPS) + "). A counter whose probe does "
           "not exist on the running kernel is reported as unavailable (n/a, null in JSON, empty in CSV), "
           "never as 0."))
    for sec in SECTIONS:
        a(f".SS {sec}")
        for c in COUNTERS:
            if c.section != sec:
                continue
            where = sorted({stap_point(p) for u in UNITS if c.name in u.counters for p in u.points})
            a(".TP")
            a(f"\\fB{c.name}\\fR ({c.group})")
            v4 = " IPv4 only: n/a (null) in rows of IPv6 sockets." if c.ipv4_only else ""
            a(_esc(c.description[0].upper() + c.description[1:] + ". Probes: " + ", ".join(where) + "." + v4))
    a(".SH CONGESTION")
    a(_esc("--cong (or --groups ...,cong) measures, per socket, how long it spent in each of the kernel's "
           "congestion states (enum tcp_ca_state, the icsk_ca_state field): Open (all is well), Disorder "
           "(duplicate ACKs or SACKs, nothing reduced yet), CWR (window reduced for ECN or local "
           "congestion), Recovery (fast retransmit) and Loss (after a retransmission time-out), and how "
           "often it changed state. Times are kept in microseconds (CaOpenUs ...; JSON and CSV carry "
           "them so) and tables show milliseconds (-u/--us: microseconds). A connection established "
           "during collection is in Open from its establishment; a socket open before collection starts "
           "counting at its first congestion event. Interval snapshots and spills split the time at the "
           "snapshot, so snapshots add up to the run. --dist adds, per row, log2 histograms of how long "
           "each stay in each state lasted (NDJSON: dist_us, state -> {lowest µs of the bucket: stays}; "
           "a stay still going at the end counts, cut short); CSV leaves them out."))
    a(_esc("Where the kernel has it and stap can use it, the tracepoint tcp:tcp_cong_state_set sees every "
           "change. Elsewhere (e.g. trixie's stap 5.1 with Linux 6.12) the state is read after tcp_ack(), "
           "tcp_enter_loss() and tcp_simple_retransmit() return, which costs a kretprobe per ACK and sees "
           "a change made elsewhere only at the next of those calls; a stay that begins and ends within "
           "one of them is not seen. The report says which was used; --kprobes-only takes the second "
           "where the tracepoint exists too (to compare them)."))
    a(".SH SERIES")
    a(_esc("--sample MS samples each connection the filters accept right after the kernel has processed an "
           "ACK for it (tcp_ack() returned): the first ACK once MS milliseconds have passed since the "
           "connection's previous sample (0: every ACK), or, with --on-cwnd-change, only when the congestion "
           "window differs from that sample too. Each connection gets an end sample when it closes "
           "(connections still open when collection stops have none). The report shows, per row, sparklines "
           "of cwnd and srtt over its samples with their range and last value (NDJSON: a series object); "
           "--series FILE writes every sample (CSV, or NDJSON for .ndjson/.json: t_s, event ack|end, the "
           "connection, then the fields below); --plot FILE.png draws cwnd and srtt over time, one line per "
           "connection (the 12 with most samples). The period and mode are module parameters: changing them "
           "does not recompile. A sample costs one record on the collector's output; every-ACK sampling of "
           "a fast transfer writes one per ACK."))
    for f in SERIES_FIELDS:
        a(".TP")
        a(f"\\fB{f.name}\\fR \\(em {_esc(f.field)}")
        a(_sentence(f.description))
    a(".SH RFC 4898")
    a(_esc("--rfc4898 writes, as each socket the filters accept closes (any way: close, reset, time-out; "
           "listening sockets have none), the variables of RFC 4898 (TCP Extended Statistics MIB) that Linux "
           "keeps in the socket's struct tcp_sock, read at that moment. Tables show them under each row, "
           "one line per RFC table; NDJSON has an rfc4898 object; CSV has rfc4898.NAME columns. A row of "
           "several sockets (index other than tuple) shows each variable's sum, mean, minimum or maximum "
           "over the sockets that closed, as listed. A variable a kernel does not keep is n/a (null). "
           "Sockets still open at the end have none (the report says how many)."))
    for table in ESTATS_TABLES:
        a(f".SS {table}")
        for v in EVARS:
            if v.table != table:
                continue
            a(".TP")
            a(f"\\fB{v.name}\\fR ({v.unit + ', ' if v.unit else ''}{v.agg}) \\(em {_esc(v.field)}")
            a(_sentence(v.description))
    a(".SS Not kept by Linux")
    for name, why in ESTATS_UNAVAILABLE:
        a(".TP")
        a(f"\\fB{_esc(name)}\\fR")
        a(_sentence(why))
    a(".SS From a capture (\\-\\-read)")
    a(_esc("Out is what local (the side that opened the connection) sent, In what remote sent. Counts add "
           "up over the connections of a row; times (in milliseconds, to the microsecond) do not: RttMin and "
           "RttMax are the extremes, RttAvg the mean over every sample, HandshakeRtt, FirstByte, TransferTime and "
           "Duration the mean over the connections that have one. A time with nothing to measure is n/a (null "
           "in JSON, empty in CSV), never 0."))
    for c in CAPTURE_FIELDS:
        a(".TP")
        a(f"\\fB{c.name}\\fR ({c.section}{', ' + c.unit if c.unit else ''})")
        a(_sentence(c.description))
    a(".SS Row keys")
    a(_esc("index, family, laddr, lport, raddr, rport (those of the index), sockets (socket tuples in "
           "the row), closed (of which closed during collection), processes (pid and name of the process "
           "in whose context the socket was last used; for sockets only seen in softirq context, the "
           "owner found with psutil if the socket still exists; pid and comm as row keys with index=pid and "
           "index=comm), opened_during_collection (false: the "
           "socket was open before tcpipstat started, so its totals are partial)."))
    a(".SH EXAMPLES")
    for cmd, what in (
        ("tcpipstat timeout=60", "Per-socket statistics of every TCP socket for 60 seconds."),
        ("tcpipstat index=raddr '*.*.*.*:80-*:*'", "Who is talking to my web server?"),
        ("tcpipstat index=rport '*:*-192.168.1.103:*'", "Which services of 192.168.1.103 does this host use?"),
        ("tcpipstat index=lport", "Which local services are busy?"),
        ("tcpipstat -c 'iperf3 -c 127.0.0.1 -t 5' '*:*-*:5201'", "What did one iperf3 run do to TCP?"),
        ("tcpipstat onclose=1 '[::1]:*-*:*'", "A report for each IPv6 loopback socket as it closes."),
        ("tcpipstat --json timeout=10 > run.ndjson", "NDJSON for other tools, one object per socket."),
        ("tcpipstat index=comm timeout=30", "Which programs use TCP, and how much?"),
        ("tcpipstat -x 1234 --sort RetransSegs --top 5", "The five sockets of process 1234 that retransmit most."),
        ("tcpipstat -T interval=1 --count 10 index=lport '*:443-*:*'", "Ten one-second snapshots of the HTTPS service."),
        ("tcpipstat -c 'curl -s https://example.org/' --all-processes", "Everything TCP did while curl ran, not only curl's sockets."),
        ("tcpipstat --check", "Can this host collect? What is missing, and the command that installs it."),
        ("tcpipstat --cong --dist index=raddr timeout=30",
         "How long did the connections to each peer spend in Recovery and Loss, and how long did each stay last?"),
        ("tcpipstat --sample 50 --series cwnd.csv --plot cwnd.png -c 'iperf3 -c 10.0.0.2 -t 10'",
         "cwnd and srtt of each iperf3 connection every 50 ms: a file for other tools and a picture."),
        ("tcpipstat --rfc4898 --json '*:*-*:443'", "RFC 4898 variables of each HTTPS client socket as it closes."),
        ("tcpipstat --save-records r.txt timeout=10; tcpipstat --from-records r.txt index=raddr",
         "Collect once, report in several ways."),
        ("tcpdump -i any -s 96 -w web.pcap port 443; tcpipstat --read web.pcap index=rport --sort RttMax",
         "No root on the box that analyses, no debuginfo: per-connection counters and times of a capture."),
    ):
        a(".TP")
        a(f"\\fB{_esc(cmd)}\\fR")
        a(_esc(what))
    a(".SH OVERHEAD")
    a(_esc("Every TCP segment in and out and every IP datagram carrying TCP runs a probe handler (a "
           "kprobe; tcp_sendmsg, tcp_recvmsg, ip_rcv_core and a few rare functions use kretprobes). A handler "
           "reads the socket tuple (from the socket, or a few wide reads of the packet headers), checks the "
           "filters and adds to one counter array keyed by the tuple: it write-locks only that array, so "
           "probes of different counters never wait for each other; process attribution and the table's "
           "fill gauge are per-CPU statistics. Select fewer --groups (socket,tcp is the cheapest useful set) "
           "to probe less; bench/RESULTS.md in the source tree has measured figures. The collector holds at "
           "most --max-sockets tuples per counter: every 10 ms it checks, and when a table is half full it "
           "hands everything to tcpipstat, which adds records up per tuple, so nothing is lost on a long run "
           "or under heavy connection churn (a smaller table only means more records). Closed sockets are "
           "handed over within 0.1 s. The limit is the number of sockets active (or closed in the last "
           "0.1 s) within one check: more than half of --max-sockets at once, or a timer the machine "
           "delays, fills a table; the events that find it full are lost, counted and reported, and the "
           "exit status is 1 (raise --max-sockets; the default 8192 holds 4096 sockets busy at once). "
           "The process table wraps instead (the report says when it was full: some sockets may then "
           "show no process). Probe hits that SystemTap skips are counted and reported: the counters are then "
           "low by at most that number. Most are kprobes that fire while another probe's handler runs on "
           "the same CPU (kprobes do not nest: an interrupt arriving as a handler ends can run the network "
           "softirq there); the rest are missed kretprobes and lock waits. A missed hit counts once per "
           "probe at that function, so the number is an upper bound; stap -t (--stap-arg=-t) lists them "
           "per probe. stap's overhead guard "
           "can stop collection on slow or emulated machines: --no-overload-guard disables it. "
           "The options beyond the counters cost: --cong a tracepoint hit per congestion-state change, or, "
           "without the tracepoint, a kretprobe on every ACK (tcp_ack) that write-locks the per-socket state "
           "table; --sample a kretprobe on every ACK and a record per sample (every-ACK sampling of a fast "
           "transfer is one record per ACK); --rfc4898 one record per closing socket. "
           "At the end of a run (timeout, --count, the end of the -c command, Ctrl-C) the collector writes "
           "out everything it holds and only then exits: with SystemTap before 5.1 it waits 0.5 s more, "
           "because stapio before 5.1 drops output it has not read when the module exits (SystemTap "
           "PR31597). The -c command runs in a shell that tells the collector it has ended "
           "(/proc/systemtap/MODULE/finish)."))
    a(".SH REQUIREMENTS")
    a(_esc("SystemTap (stap, staprun), root, the headers (linux-headers-$(uname -r)) and debug information "
           "(linux-image-$(uname -r)-dbg on Debian, the -dbgsym package on Ubuntu, kernel-debuginfo on "
           "Fedora/RHEL) of the running kernel, and a kernel that loads modules (no lockdown; with Secure "
           "Boot, signed modules). --dump-script and --from-records need none of it. On a machine that "
           "cannot load modules, the kernel lab of the source tree (lab/) runs tcpipstat in a QEMU guest."))
    a(".SH EXIT STATUS")
    a(".TP\n.B 0\nSuccess (with --check: collection can work on this host).")
    a(".TP\n.B 1\n" + _esc("stap or staprun failed, or the host is not ready (the message names the fix; --check lists every "
                           "problem). "
                           "A report of what was collected is still printed."))
    a(".TP\n.B 2\n" + _esc("Bad command line; nothing was run. The message names the bad word."))
    a(".TP\n.B 130\n" + _esc("Interrupted with Ctrl-C; during collection the report of what was collected "
                             "is printed first. The first Ctrl-C ends collection the normal way (the "
                             "collector writes out what it holds); a second one stops staprun at once."))
    a(".SH SEE ALSO")
    a("stap(1), staprun(8), netstat(8), ss(8), nstat(8)")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    print(render_man(), end="")
