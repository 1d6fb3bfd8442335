"""A loopback workload for --rfc4898 on the bpftrace collector
(tests/test_native_bt_estats.py): ``python3 bpf_estats_workload.py HOST PORT CONNS SEND
REPLY OUT``.

A server on HOST:PORT accepts CONNS connections, one after the other; each client sends
SEND bytes, the server reads them, answers REPLY bytes and shuts its side down, the client
reads them to the end and shuts down too. (So each side has read all its data before its
socket reaches CLOSE.) Then each side waits until its socket is in CLOSE: the connection
has ended, the kernel changed the state to CLOSE (the moment the collector reads the
variables) and nothing changes them afterwards. Only then does it read
getsockopt(TCP_INFO) and close() the socket. OUT gets one JSON line per socket: its role,
ports and the TCP_INFO fields below.
"""
import json
import socket
import struct
import sys
import threading
import time

TCP_CLOSE = 7
# struct tcp_info (include/uapi/linux/tcp.h): name -> (offset, struct format)
TCP_INFO = {
    "state": (0, "B"), "options": (5, "B"), "wscale": (6, "B"), "rto": (8, "I"),
    "snd_mss": (16, "I"), "rcv_mss": (20, "I"), "unacked": (24, "I"), "sacked": (28, "I"),
    "lost": (32, "I"), "retrans": (36, "I"), "rtt": (68, "I"), "snd_ssthresh": (76, "I"),
    "snd_cwnd": (80, "I"), "advmss": (84, "I"), "reordering": (88, "I"),
    "total_retrans": (100, "I"), "bytes_acked": (120, "Q"), "bytes_received": (128, "Q"),
    "segs_out": (136, "I"), "segs_in": (140, "I"), "min_rtt": (148, "I"),
    "data_segs_in": (152, "I"), "data_segs_out": (156, "I"), "rwnd_limited": (176, "Q"),
    "sndbuf_limited": (184, "Q"), "bytes_sent": (200, "Q"), "bytes_retrans": (208, "Q"),
    "dsack_dups": (216, "I"), "snd_wnd": (228, "I"), "rcv_wnd": (232, "I"),
    "total_rto": (240, "H"),
}


def tcp_info(s: socket.socket) -> dict:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return {k: struct.unpack_from(fmt, raw, off)[0] for k, (off, fmt) in TCP_INFO.items()}


def _read(s: socket.socket, n: int | None) -> int:
    """Read n bytes, or to the end when n is None; the bytes read."""
    got = 0
    while n is None or got < n:
        data = s.recv(65536 if n is None else n - got)
        if not data:
            break
        got += len(data)
    return got


def _ended(s: socket.socket, role: str, ports: tuple[int, int]) -> dict:
    """TCP_INFO once the socket is in CLOSE (at most 10 s), with its role and ports."""
    for _ in range(1000):
        info = tcp_info(s)
        if info["state"] == TCP_CLOSE:
            return {"role": role, "lport": ports[0], "rport": ports[1], **info}
        time.sleep(0.01)
    raise SystemExit(f"{role} socket never reached CLOSE")


def _ports(s: socket.socket) -> tuple[int, int]:
    return s.getsockname()[1], s.getpeername()[1]


def main() -> None:
    host, port, conns, send, reply = sys.argv[1], *map(int, sys.argv[2:6])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(conns)
    out: list[dict] = []

    def serve() -> None:
        for _ in range(conns):
            c, _ = server.accept()
            with c:
                ports = _ports(c)
                if _read(c, send) != send:
                    raise SystemExit("server: short read")
                c.sendall(b"r" * reply)
                c.shutdown(socket.SHUT_WR)
                if _read(c, None):
                    raise SystemExit("server: more than it was sent")
                out.append(_ended(c, "server", ports))

    t = threading.Thread(target=serve)
    t.start()
    for _ in range(conns):
        with socket.create_connection((host, port)) as c:
            ports = _ports(c)
            c.sendall(b"s" * send)
            if _read(c, None) != reply:
                raise SystemExit("client: short read")
            c.shutdown(socket.SHUT_WR)
            out.append(_ended(c, "client", ports))
    t.join()
    server.close()
    with open(sys.argv[6], "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in out)


if __name__ == "__main__":
    main()
