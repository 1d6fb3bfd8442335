"""Workloads run inside the lab guest, with the counts they must produce."""

# Two servers, two clients, all on loopback: every connection's bytes are known.
# port 7001: 3 connections, 1000 bytes up / 100 down each; port 7002: 2 connections,
# 5000 up / 50 down each.
TCPWORK_V4 = ("tcpwork server 127.0.0.1 7001 100 3 & tcpwork server 127.0.0.1 7002 50 2 & "
              "tcpwork client 127.0.0.1 7001 3 1000; tcpwork client 127.0.0.1 7002 2 5000; wait")
TCPWORK_V4_PORTS = {7001: (3, 1000, 100), 7002: (2, 5000, 50)}   # port: (connections, up, down)

TCPWORK_V6 = "tcpwork server ::1 7003 7 2 & tcpwork client ::1 7003 2 10; wait"

IPERF3 = "iperf3 -s -1 >/dev/null & iperf3 -4 -c 127.0.0.1 -t 2 >/dev/null 2>&1; wait"
