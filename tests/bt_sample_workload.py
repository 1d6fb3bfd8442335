"""A loopback transfer of known size, with the kernel's own view of both ends, for the
native --sample tests (tests/test_native_bt_sample.py):
``python3 bt_sample_workload.py HOST PORT SEND CHUNK PAUSE_MS CLOSE OUT.json``.

The client sends SEND bytes, CHUNK bytes at a time with PAUSE_MS between them; the
server reads them all and answers one byte; the client reads it (every byte it sent is
then acknowledged) and reads its getsockopt(TCP_INFO), then closes: CLOSE ``rst`` with
SO_LINGER 0 (the socket goes to CLOSE at once, as it is: nothing arrives between that
read and the close), ``fin`` the usual way. The server reads TCP_INFO once the client's
close has reached it, then closes. OUT.json gets the client's port and both TCP_INFOs.
"""
import json
import socket
import struct
import sys
import threading
import time

# struct tcp_info (include/uapi/linux/tcp.h): the fields the tests compare, by offset
TCP_INFO = {"rto": 8, "snd_mss": 16, "unacked": 24, "lost": 32, "retrans": 36, "rtt": 68,
            "rttvar": 72, "snd_ssthresh": 76, "snd_cwnd": 80, "total_retrans": 100,
            "segs_in": 140, "snd_wnd": 228}
TCP_INFO_U64 = {"bytes_acked": 120, "bytes_received": 128}


def tcp_info(s: socket.socket) -> dict:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    info = {k: struct.unpack_from("I", raw, o)[0] for k, o in TCP_INFO.items()}
    info.update({k: struct.unpack_from("Q", raw, o)[0] for k, o in TCP_INFO_U64.items()})
    return info


def serve(server: socket.socket, send: int, out: dict) -> None:
    c, _ = server.accept()
    with c:
        got = 0
        while got < send:
            data = c.recv(1 << 16)
            if not data:
                raise SystemExit("client closed early")
            got += len(data)
        c.sendall(b"d")
        try:
            c.recv(1)              # EOF (fin) or a reset (rst)
        except ConnectionResetError:
            pass
        out["server"] = tcp_info(c)


def main() -> None:
    host, port, send, chunk, pause_ms = sys.argv[1], *map(int, sys.argv[2:6])
    close, path = sys.argv[6], sys.argv[7]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out: dict = {}
    with socket.socket(family) as server:
        server.bind((host, port))
        server.listen(1)
        t = threading.Thread(target=serve, args=(server, send, out))
        t.start()
        c = socket.create_connection((host, port))
        out["client_port"] = c.getsockname()[1]
        for at in range(0, send, chunk):
            c.sendall(b"s" * min(chunk, send - at))
            time.sleep(pause_ms / 1000)
        if c.recv(1) != b"d":
            raise SystemExit("no answer")
        out["client"] = tcp_info(c)
        if close == "rst":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        t.join()
    with open(path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
