"""One loopback connection that moves SIZE bytes through one send path and one receive
path, for the native bpftrace tier (tests/test_native_bt_paths.py):

    python3 bpf_paths_workload.py SEND_PATH RECV_PATH SIZE PORT

The client sends SIZE bytes (send paths: sendall, sendfile, splice from a pipe, sendmsg
of three buffers); the server reads them (receive paths: recv, recv_into, recvmsg_into of
two buffers), answers one byte, and both read the kernel's own counts with
getsockopt(TCP_INFO) at a moment they cannot change: the server once it has read SIZE
bytes (the client waits for the answer before it closes), the client once the answer has
come (it acknowledges all SIZE bytes). Prints one JSON line: ports and those counts.
"""
import json
import os
import socket
import struct
import sys
import tempfile
import threading

# struct tcp_info (include/uapi/linux/tcp.h): offsets of the fields read here
TCPI = {"bytes_acked": (120, "Q"), "bytes_received": (128, "Q"), "segs_out": (136, "I"),
        "segs_in": (140, "I"), "data_segs_in": (152, "I"), "data_segs_out": (156, "I")}


def tcp_info(s: socket.socket) -> dict:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return {k: struct.unpack_from("=" + f, raw, off)[0] for k, (off, f) in TCPI.items()}


def send(s: socket.socket, path: str, data: bytes, blob: str) -> None:
    if path == "sendall":
        s.sendall(data)
    elif path == "sendfile":
        with open(blob, "rb") as f:
            s.sendfile(f)
    elif path == "splice":
        r, w = os.pipe()
        with open(blob, "rb") as f:
            while (n := os.splice(f.fileno(), w, 65536)):
                while n:
                    n -= os.splice(r, s.fileno(), n)
    elif path == "sendmsg":
        third = len(data) // 3
        view = memoryview(data)
        parts = [view[:third], view[third:2 * third], view[2 * third:]]
        while parts:
            n = s.sendmsg(parts)
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if parts:
                parts[0] = parts[0][n:]
    else:
        raise SystemExit(f"unknown send path {path!r}")


def recv(c: socket.socket, path: str, size: int) -> None:
    got = 0
    a, b = bytearray(4096), bytearray(60000)
    while got < size:
        want = size - got
        if path == "recv":
            n = len(c.recv(min(want, 65536)))
        elif path == "recv_into":
            n = c.recv_into(b, min(want, len(b)))
        elif path == "recvmsg_into":
            n = c.recvmsg_into([memoryview(a)[:min(want, len(a))], b])[0]
        else:
            raise SystemExit(f"unknown receive path {path!r}")
        if n == 0:
            raise SystemExit("peer closed early")
        got += n


def main() -> None:
    send_path, recv_path, size, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    data = os.urandom(size)
    with tempfile.NamedTemporaryFile(prefix="tcpipstat-paths-") as blob:
        blob.write(data)
        blob.flush()
        srv = socket.create_server(("127.0.0.1", port))
        out = {}

        def serve() -> None:
            c, _ = srv.accept()
            with c:
                recv(c, recv_path, size)
                out["server"] = tcp_info(c)
                c.sendall(b"k")
                c.recv(1)                    # (the client's close)

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(("127.0.0.1", port)) as s:
            out["client_port"] = s.getsockname()[1]
            send(s, send_path, data, blob.name)
            assert s.recv(1) == b"k"
            out["client"] = tcp_info(s)
        t.join()
        srv.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
