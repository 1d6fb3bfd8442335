"""A loopback workload with known counts, for the native bpftrace tier
(tests/test_native_bpftrace.py): ``python3 bpf_workload.py HOST PORT CONNS SEND REPLY``.

A server on HOST:PORT accepts CONNS connections; each client sends SEND bytes in one
send(), the server reads them all and answers REPLY bytes in one send(), the client
reads them and both close. Each send() is taken whole by the kernel (small sizes), so
the messages are exact: one send and at least one receive per direction.
Prints one JSON line: the client ports and the receive calls that returned data.
"""
import json
import socket
import sys
import threading


def _recv_all(s: socket.socket, n: int) -> int:
    """Read n bytes; returns the recv() calls that returned data."""
    calls = 0
    while n > 0:
        data = s.recv(n)
        if not data:
            raise SystemExit("peer closed early")
        n -= len(data)
        calls += 1
    return calls


def main() -> None:
    host, port, conns, send, reply = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(conns)
    calls = {"server": 0, "client": 0}

    def serve() -> None:
        for _ in range(conns):
            c, _ = server.accept()
            with c:
                calls["server"] += _recv_all(c, send)
                c.sendall(b"r" * reply)
                c.shutdown(socket.SHUT_WR)
                c.recv(1)          # the client's close

    t = threading.Thread(target=serve)
    t.start()
    ports = []
    for _ in range(conns):
        with socket.create_connection((host, port)) as c:
            ports.append(c.getsockname()[1])
            c.sendall(b"s" * send)
            calls["client"] += _recv_all(c, reply)
    t.join()
    server.close()
    print(json.dumps({"ports": ports, "recv_calls": calls}))


if __name__ == "__main__":
    main()
