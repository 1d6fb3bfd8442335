"""One side of a loopback workload with known counts, for the native attribution tier
(tests/test_native_bt_attribution.py), run in a cgroup and a network namespace of its own:

    python3 bpf_place_workload.py server HOST PORT_FILE CONNS SEND REPLY
    python3 bpf_place_workload.py client HOST PORT_FILE CONNS SEND REPLY

The server listens on a port the kernel picks (written to PORT_FILE once it listens) and
accepts CONNS connections; each client sends SEND bytes in one send(). The server reads
them only once they have all arrived (SIOCINQ shows them queued: the kernel received them
in softirq context, in whatever task ran then), answers REPLY bytes and closes; the client
reads them and closes.
"""
import fcntl
import os
import socket
import struct
import sys
import termios
import time


def _queued(s: socket.socket) -> int:
    """Bytes in the socket's receive queue (SIOCINQ, which is FIONREAD's number)."""
    return struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0\0\0\0"))[0]


def _recv_all(s: socket.socket, n: int) -> None:
    while n > 0:
        data = s.recv(n)
        if not data:
            raise SystemExit("peer closed early")
        n -= len(data)


def serve(host: str, port_file: str, conns: int, send: int, reply: int) -> None:
    with socket.create_server((host, 0)) as server:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(server.getsockname()[1]))
        os.rename(tmp, port_file)           # (the client never reads a half-written file)
        for _ in range(conns):
            c, _ = server.accept()
            with c:
                deadline = time.monotonic() + 60
                while _queued(c) < send:
                    if time.monotonic() > deadline:
                        raise SystemExit("the client's bytes never all arrived")
                    time.sleep(0.01)
                _recv_all(c, send)
                c.sendall(b"r" * reply)


def connect(host: str, port_file: str, conns: int, send: int, reply: int) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file):
        if time.monotonic() > deadline:
            raise SystemExit("the server never listened")
        time.sleep(0.01)
    with open(port_file) as f:
        port = int(f.read())
    for _ in range(conns):
        with socket.create_connection((host, port)) as c:
            c.sendall(b"s" * send)
            _recv_all(c, reply)


if __name__ == "__main__":
    role, host, port_file = sys.argv[1:4]
    counts = [int(x) for x in sys.argv[4:7]]
    (serve if role == "server" else connect)(host, port_file, *counts)
