"""Workloads run inside the lab guest, with the counts they must produce, and the files
they need there (the tests' and bench/'s)."""
import lzma
import os
import shutil
import subprocess
from pathlib import Path

# Two servers, two clients, all on loopback: every connection's bytes are known.
# port 7001: 3 connections, 1000 bytes up / 100 down each; port 7002: 2 connections,
# 5000 up / 50 down each.
TCPWORK_V4 = ("tcpwork server 127.0.0.1 7001 100 3 & tcpwork server 127.0.0.1 7002 50 2 & "
              "tcpwork client 127.0.0.1 7001 3 1000; tcpwork client 127.0.0.1 7002 2 5000; wait")
TCPWORK_V4_PORTS = {7001: (3, 1000, 100), 7002: (2, 5000, 50)}   # port: (connections, up, down)

TCPWORK_V6 = "tcpwork server ::1 7003 7 2 & tcpwork client ::1 7003 2 10; wait"

# Three IPv6 connects to a closed port: the kernel answers each SYN with a reset
# sent from no socket (tcp_v6_send_reset()).
TCPWORK_V6_REFUSED_PORT, TCPWORK_V6_REFUSED_N = 7010, 3
TCPWORK_V6_REFUSED = f"tcpwork refused ::1 {TCPWORK_V6_REFUSED_PORT} {TCPWORK_V6_REFUSED_N}"

# Three connects to a closed port, then two connections: each refused SYN is answered by
# a reset sent without a socket.
REFUSED_PORT = 7013


def refused(host: str) -> str:
    return (f"tcpwork refused {host} {REFUSED_PORT} 3; tcpwork server {host} 7014 10 2 & "
            f"tcpwork client {host} 7014 2 1000; wait")


IPERF3 = "iperf3 -s -1 >/dev/null & iperf3 -4 -c 127.0.0.1 -t 2 >/dev/null 2>&1; wait"

# Interval mode: a pair of connections every 0.4 s for about 4.5 s (port 7007):
# every 1 s interval has traffic. 20 connections, 300 bytes up / 30 down each.
TCPWORK_PERIODIC = ("tcpwork server 127.0.0.1 7007 30 20 & "
                    "for i in 1 2 3 4 5 6 7 8 9 10; do "
                    "tcpwork client 127.0.0.1 7007 2 300; sleep 0.4; done; wait")

# Two programs at once, for index=comm: tcpwork's known counts beside iperf3.
TCPWORK_AND_IPERF3 = ("iperf3 -s -1 >/dev/null & tcpwork server 127.0.0.1 7008 100 3 & "
                      "tcpwork client 127.0.0.1 7008 3 1000; "
                      "iperf3 -4 -c 127.0.0.1 -t 1 >/dev/null 2>&1; wait")

# A server outside the -c command's process tree (LAB_BACKGROUND: started before the
# module, not by the command) and one the command starts and leaves behind (the
# subshell exits at once: the server is re-parented to init, still the command's).
OUTSIDE_SERVER = "tcpwork server 127.0.0.1 7009 10 2"
TREE_CLIENT = ("(tcpwork server 127.0.0.1 7011 10 2 &); tcpwork client 127.0.0.1 7009 2 100; "
               "tcpwork client 127.0.0.1 7011 2 100; sleep 1")

# 100 processes alive at once, all children of the command (busybox sh forks each).
HUNDRED_CHILDREN = "i=0; while [ $i -lt 100 ]; do sleep 4 & i=$((i + 1)); done; wait"

# More sockets active at once than --max-sockets 64 holds (80 parallel iperf3 streams
# and their server sides, 162 sockets): events are lost, and the tool must say how many.
TABLE_TOO_SMALL = ("iperf3 -s -1 >/dev/null & "
                   "iperf3 -4 -c 127.0.0.1 -P 80 -n 8M >/dev/null 2>&1; wait")

# Delay and loss on loopback (netem, in the lab guest): real fast retransmits, recoveries
# and congestion-state changes (RFC4898_HOLD below).
NETEM = "/usr/sbin/tc qdisc add dev lo root netem delay 5ms loss 2%"
_LISTENING = "/usr/bin/ss -Htln '( sport = :5201 )' | grep -q ."
_CONNECTED = ("[ \"$(/usr/bin/ss -Htn state established '( dport = :5201 )' | wc -l)\" "
              "-ge 2 ]")


def _until(condition: str, seconds: int = 10) -> str:
    """Shell: poll CONDITION every 20 ms until it holds, at most SECONDS."""
    return (f"i=0; until {condition} || [ $i -ge {seconds * 50} ]; do sleep 0.02; "
            "i=$((i + 1)); done")


def iperf3_netem_once_connected(netem: str) -> str:
    """A 2 s iperf3 run (the client sends, once the server listens) with `tc qdisc ...
    netem NETEM` put on loopback once both of its connections (control and data) are
    established. With the loss there from the start, a CI run lost SYNs (1 s each) and
    then timed out once more (the guest's TCPSynRetrans=2, TCPTimeouts=1): 25 data segments
    in all, where other runs send 900-2000 with 16-22 recoveries, and the tests that need
    recoveries or samples had none. Now no SYN can be lost."""
    return (f"iperf3 -s -1 >/dev/null & {_until(_LISTENING)}; "
            f"iperf3 -4 -c 127.0.0.1 -t 2 >/dev/null 2>&1 & {_until(_CONNECTED)}; "
            f"/usr/sbin/tc qdisc add dev lo root netem {netem}; wait")


# real recoveries and congestion-state changes in the whole 2 s
CONG_IPERF3 = iperf3_netem_once_connected("delay 5ms loss 2%")
# delay alone, in a queue too long to drop (netem's default holds 1000 packets): nothing is
# lost, so no timeout leaves a gap in the ACKs (the sampling-period test). Fast retransmits
# remain, spurious: netem on the 2-CPU guest's loopback reorders (TCPSACKReorder, undone).
DELAY_IPERF3 = iperf3_netem_once_connected("delay 5ms limit 100000")

# One connection under netem loss whose client holds it once all 300000 bytes are sent;
# as soon as the peer has acknowledged them all (ss shows bytes_acked:300001, the SYN
# included), `ss -tin`'s line goes to the guest log as "@@SS ..."; then the client shuts
# down, the server replies 1000 bytes and both close (RFC 4898 at close). The command then
# waits until no socket of port 7012 is left but in TIME-WAIT (netem may lose a FIN, and a
# resend takes an RTO or more): a socket still closing when the command ends has no end
# sample and no RFC 4898 variables (CI once saw the client's end sample missing after a
# fixed 2 s wait). At most 30 s.
_SS = "/usr/bin/ss -Htin '( dport = :7012 )'"
_SS_OPEN = ("/usr/bin/ss -Htn exclude time-wait exclude listening "
            "'( sport = :7012 or dport = :7012 )'")
_ALL_ACKED = f"{_SS} | grep -q 'bytes_acked:300001 '"
_ALL_CLOSED = f"[ -z \"$({_SS_OPEN})\" ]"
RFC4898_HOLD = (f"{NETEM}; tcpwork server 127.0.0.1 7012 1000 1 >/dev/null & "
                "TCPWORK_HOLD_MS=3000 tcpwork client 127.0.0.1 7012 1 300000 >/dev/null & "
                f"{_until(_ALL_ACKED, 5)}; echo \"@@SS $({_SS} | tr '\\n\\t' '  ')\"; wait; "
                f"{_until(_ALL_CLOSED, 30)}")


def lab_root(suite: str) -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("LAB_DIR") or Path(cache) / "tcpipstat-lab") / suite


def pathwork_files(suite: str, tmp: Path, *extra: Path) -> dict:
    """pathwork reaches the guest in the run's own overlay, as /pathwork (lab.sh's
    LAB_EXTRA_FILES), not in the shared initramfs. It is built here, static, from the
    source being tested: the lab root's copy is the source as it was at the last setup."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler to build lab/workload/pathwork.c (apt-get install gcc)")
    binary = tmp / "pathwork"
    source = Path(__file__).resolve().parent.parent / "lab/workload/pathwork.c"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-static", "-o", str(binary), str(source)],
                   check=True)
    return {"LAB_EXTRA_FILES": " ".join(map(str, (binary, *extra)))}


# the tls module and the crypto TLS 1.2 AES-GCM-128 needs (gcm(aes): gcm, ctr, ghash), as
# modprobe would load them: the guest has no modprobe, and the kernel's request_module()
# for a missing algorithm fails there. AES itself is built in on both suites.
TLS_MODULES = ("kernel/crypto/ghash-generic", "kernel/crypto/ctr", "kernel/crypto/gcm",
               "kernel/net/tls/tls")


def tls_modules(suite: str, tmp: Path) -> list[Path]:
    """TLS_MODULES and what they depend on (modules.dep), dependencies first, as plain .ko
    files (busybox insmod takes no .ko.xz); a module built into the kernel is left out."""
    root = lab_root(suite)
    mods = root / "lib/modules" / (root / ".lab-kver").read_text().strip()
    deps = {}
    for line in (mods / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name.split(".ko")[0]] = [d.split(".ko")[0] for d in rest.split()]
    order: list[str] = []
    for m in (m for m in TLS_MODULES if m in deps):
        order += [d for d in (*reversed(deps[m]), m) if d not in order]
    out = []
    for m in order:
        (packed,) = mods.glob(m + ".ko*")
        data = packed.read_bytes()
        out.append(tmp / (Path(m).name + ".ko"))
        out[-1].write_bytes(lzma.decompress(data) if packed.suffix == ".xz" else data)
    return out
