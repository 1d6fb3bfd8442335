"""Tier 3n: the bytes of every send and receive path the bpftrace collector sees, per
socket, exact against the workload and the kernel's own tcp_info (tests/bpf_paths_workload.py).

sock:sock_send_length fires in sock_sendmsg(): since Linux 6.5 (commit 2dc334f1a63a,
"splice, net: Use sendmsg(MSG_SPLICE_PAGES) rather than ->sendpage()") sendfile() and
splice() into a socket go through it too. sock:sock_recv_length fires in sock_recvmsg():
splice() out of a socket (tcp_splice_read) and TCP_ZEROCOPY_RECEIVE do not; they are counted
at their functions' exits where BPF may attach to them, and where it may not (this host) the
report's notes say that RecvBytes and RecvMsgs miss them.

io_uring's send and receive operations (IORING_OP_SEND, _SENDMSG, _SEND_ZC, _RECV,
_RECVMSG) call sock_sendmsg()/sock_recvmsg() (or ____sys_sendmsg/____sys_recvmsg, which
reach sock_sendmsg_nosec/sock_recvmsg_nosec, where the tracepoints are): the lab's pathwork
(lab/workload/pathwork.c), compiled here, drives them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tcpipstat.bt_points import PATHS, list_points

from .test_native_bpftrace import ROOT, _free_port, _native
from .test_tier3_lab_paths import _check_pair, _said
from .conftest import json_rows

WORKLOAD = Path(__file__).resolve().parent / "bpf_paths_workload.py"
SIZE = 300_001            # (not a multiple of any buffer or page size)


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int(release[1].split("-")[0])) >= (major, minor)


def _paths_run(send_path: str, recv_path: str, outcome: Path) -> tuple[list[dict], dict]:
    port = _free_port()
    cmd = f"{sys.executable} {WORKLOAD} {send_path} {recv_path} {SIZE} {port}"
    res = subprocess.run([sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--json",
                          "--outcome-json", str(outcome), f"*:*-*:{port}", f"*:{port}-*:*",
                          "-c", cmd], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    said = [x for x in res.stderr.splitlines() if x.startswith("{")]
    assert len(said) == 1, res.stderr
    return json_rows(res.stdout), json.loads(said[0])


def _missed_here() -> list[str]:
    """The receive paths this host's kernel lets no BPF program see (bt_points.PATHS)."""
    points = list_points(["bpftrace"])
    return [what for f, what in (PATHS["splice_read"], PATHS["zc_recv"])
            if not points.has(f"kfunc:{f}")]


@pytest.mark.native
@pytest.mark.parametrize("send_path, recv_path", [
    ("sendall", "recv"), ("sendfile", "recv_into"), ("splice", "recvmsg_into"),
    ("sendmsg", "recv")])
def test_path_bytes_exact_against_tcp_info(send_path, recv_path, tmp_path):
    _native()
    if send_path in ("sendfile", "splice") and not _kernel_at_least(6, 5):
        pytest.skip("before Linux 6.5 sendfile/splice bypass sock_sendmsg (tcp_sendpage)")
    rows, said = _paths_run(send_path, recv_path, tmp_path / "outcome.json")
    # what RecvBytes and RecvMsgs miss here is said, in the notes under the report
    notes = json.loads((tmp_path / "outcome.json").read_text())["notes"]
    missed = _missed_here()
    assert [n for n in notes if " miss " in n] == (
        [f"bpftrace: RecvBytes and RecvMsgs miss {' and '.join(missed)} on this kernel: BPF "
         "cannot attach to " + ("that function" if len(missed) == 1 else "those functions")
         + " here"] if missed else []), notes
    (client,) = [r for r in rows if r["lport"] == said["client_port"]]
    (server,) = [r for r in rows if r["rport"] == said["client_port"]]
    c, s = client["counters"], server["counters"]
    # bytes_acked counts the SYN too; bytes_received counts data only
    assert c["SendBytes"] == SIZE == said["client"]["bytes_acked"] - 1
    assert s["RecvBytes"] == SIZE == said["server"]["bytes_received"]
    assert (c["RecvBytes"], s["SendBytes"], s["SendMsgs"], c["RecvMsgs"]) == (1, 1, 1, 1)
    assert c["SendMsgs"] >= 1 and s["RecvMsgs"] >= 1


HALF_CLOSE = """
import socket, struct, sys, threading
port, reply = int(sys.argv[1]), int(sys.argv[2])
srv = socket.create_server(("127.0.0.1", port))
def serve():
    c, _ = srv.accept()
    while c.recv(65536):
        pass
    c.sendall(b"r" * reply)
    c.close()
t = threading.Thread(target=serve)
t.start()
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"s" * 1000)
s.shutdown(socket.SHUT_WR)
t.join()
# the server's FIN ends this socket (FIN-WAIT-2 -> TIME-WAIT: state CLOSE) while the
# reply still waits in its queue: wait for that, then read it
for _ in range(100000):
    if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7:
        break
else:
    sys.exit("the socket never reached CLOSE")
got = 0
while (b := s.recv(65536)):
    got += len(b)
assert got == reply, got
s.close()
"""


@pytest.mark.native
def test_bytes_read_after_the_socket_closed_count_on_it(tmp_path):
    """A client that shuts down its side first: the server's FIN moves its socket to CLOSE
    before it reads the reply. Those bytes are the socket's own, in its one record."""
    _native()
    port, script = _free_port(), tmp_path / "half_close.py"
    script.write_text(HALF_CLOSE)
    res = subprocess.run([sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--json",
                          f"*:*-*:{port}", f"*:{port}-*:*", "-c",
                          f"{sys.executable} {script} {port} 321"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = json_rows(res.stdout)
    (client,) = [r for r in rows if r["rport"] == port]
    (server,) = [r for r in rows if r["lport"] == port]
    assert len(rows) == 2, rows
    assert (client["counters"]["SendBytes"], client["counters"]["RecvBytes"]) == (1000, 321)
    assert (server["counters"]["RecvBytes"], server["counters"]["SendBytes"]) == (1000, 321)
    assert client["closed"] == 1 and client["lport"] != 0


URING_PAIRS = (("uring_send", "uring_recv"), ("uring_sendmsg", "uring_recvmsg"),
               ("uring_sendzc", "read"), ("write", "uring_recv"))


@pytest.mark.native
def test_io_uring_paths_exact_against_tcp_info_and_the_workload(tmp_path):
    _native()
    if not _kernel_at_least(6, 0):
        pytest.skip("IORING_OP_SEND_ZC came with Linux 6.0")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build lab/workload/pathwork.c (apt-get install gcc)")
    binary = tmp_path / "pathwork"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(binary),
                    str(ROOT / "lab/workload/pathwork.c")], check=True)
    from .test_tier3_lab_paths import SIZE as size
    cmd = "; ".join(f"{binary} {a} {b} {size} || echo @@PATHWORK_FAILED {a} {b} >&2"
                    for a, b in URING_PAIRS)
    res = subprocess.run([sys.executable, "-m", "tcpipstat", "--backend", "bpftrace", "--json",
                          "--groups", "socket", "*:*-*:*", "-c", f"sh -c '{cmd}'"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    # (pathwork's @@PATHWORK lines: the command's output reaches tcpipstat's stderr)
    assert res.returncode == 0 and "@@PATHWORK_FAILED" not in res.stderr, res.stderr
    said, rows = _said(res.stderr), json_rows(res.stdout)
    assert len(said) == 2 * len(URING_PAIRS), res.stderr
    for send, recv in URING_PAIRS:
        _check_pair(rows, said, send, recv, "")
