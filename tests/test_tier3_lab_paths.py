"""Tier 3: the Socket counters of both collectors (SystemTap; bpftrace: its tracepoints or
fexit on tcp_sendmsg/tcp_recvmsg, and fexit on the paths around them) on every send and
receive path, per socket, exact against the workload's own counts and the kernel's
tcp_info (pathwork, lab/workload/pathwork.c), on Linux 6.1 (sendfile() and splice() into a
socket reach tcp_sendpage()) and 6.12 (they reach tcp_sendmsg() with MSG_SPLICE_PAGES);
and a busybox httpd serving a file with sendfile() to five wget clients.

Lab runs are slow: one collector run (one guest boot) runs pathwork once per pair.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from .test_tier3_lab import clean_run

pytestmark = pytest.mark.lab

SIZE = 100_001            # (not a multiple of any buffer or page size)
# every send path and every receive path at least once, each pair on its own connection
PAIRS = (("write", "read"), ("sendmsg", "recvmsg"), ("sendmmsg", "recvmmsg"),
         ("writev", "readv"), ("sendfile", "splice"), ("splice", "zerocopy"),
         ("vmsplice", "read"), ("zerocopy", "zerocopy"))


def _pathwork(suite: str) -> dict:
    """pathwork is built into the lab root by lab/setup and reaches the guest in the run's
    own overlay, as /pathwork (lab.sh's LAB_EXTRA_FILES), not in the shared initramfs."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    lab = Path(os.environ.get("LAB_DIR") or Path(cache) / "tcpipstat-lab")
    binary = lab / suite / "usr/local/bin/pathwork"
    if not binary.is_file():
        pytest.fail(f"no pathwork in the {suite} lab root: run `sudo lab/setup {suite}`")
    return {"LAB_EXTRA_FILES": str(binary)}


def _said(meta: str) -> dict[tuple[str, str, str], dict]:
    """pathwork's lines, by (send path, receive path, side): numbers as ints."""
    out = {}
    for line in meta.splitlines():
        if line.startswith("@@PATHWORK "):
            f = dict(kv.split("=", 1) for kv in line.split()[1:])
            out[f["send"], f["recv"], f["side"]] = {
                k: v if k in ("send", "recv", "side") else int(v) for k, v in f.items()}
    return out


def _check_pair(rows: list[dict], said: dict, send: str, recv: str, why: str) -> None:
    c, s = said[send, recv, "client"], said[send, recv, "server"]
    assert c["port"] == s["port"], why
    (client,) = [o["counters"] for o in rows if o["lport"] == c["port"]]
    (server,) = [o["counters"] for o in rows if o["rport"] == c["port"]]
    pair = f"{send}->{recv}: ours {client} / {server}, pathwork's {c} / {s}{why}"
    # the kernel's own counts: bytes_acked counts the client's SYN too; the server read its
    # tcp_info before it answered, the client after the answer (which acknowledges all)
    assert client["SendBytes"] == c["sent"] == SIZE == c["bytes_acked"] - 1, pair
    assert server["RecvBytes"] == s["received"] == SIZE == s["bytes_received"], pair
    assert client["RecvBytes"] == c["received"] == c["bytes_received"] == 1, pair
    assert server["SendBytes"] == s["sent"] == 1, pair
    # messages: the workload's calls that moved bytes (one message each, by FIELDS)
    assert (client["SendMsgs"], client["RecvMsgs"]) == (c["send_calls"], 1), pair
    assert (server["RecvMsgs"], server["SendMsgs"]) == (s["recv_calls"], 1), pair


@pytest.fixture(params=("stap", "bpftrace"))
def backend(request) -> str:
    return request.param


def test_every_path_exact_against_tcp_info_and_the_workload(suite, backend, tmp_path):
    cmd = "; ".join(f"/pathwork {a} {b} {SIZE} || echo @@PATHWORK_FAILED {a} {b}"
                    for a, b in PAIRS)
    # exact counts need a run in which the collector skipped no probe hit: the Socket
    # group only (the per-packet probes are where emulation makes kprobes miss)
    r = clean_run(suite, tmp_path, "--backend", backend, "--json", "--groups", "socket",
                  "--all-processes", "*:*-*:*", "-c", cmd, env=_pathwork(suite))
    why = r.explain()
    assert r.rc == 0 and "@@PATHWORK_FAILED" not in r.meta, why
    assert r.skipped() + r.faults() == 0, why
    # no path is missed on either kernel: nothing said to be (bpftrace: Choice.missed)
    assert not [n for n in r.outcome["notes"] if " miss " in n], why
    said, rows = _said(r.meta), r.json()
    assert len(said) == 2 * len(PAIRS), why
    for send, recv in PAIRS:
        _check_pair(rows, said, send, recv, why)
    # TCP_ZEROCOPY_RECEIVE took bytes itself (mapped or copied), not only through recv()
    for send in ("splice", "zerocopy"):
        s = said[send, "zerocopy", "server"]
        assert s["zc_mapped"] + s["zc_copied"] > 0, (s, why)
    # one sendfile()/splice() call of at most 64 KiB is one message on both kernels
    assert said["sendfile", "splice", "client"]["send_calls"] == -(-SIZE // 32768), why


BODY = 50_000
# busybox httpd sends file bodies with sendfile(); five wget clients fetch a 50,000-byte
# file one after the other; then the command waits for the sockets to close (their
# RFC 4898 variables are taken at close)
HTTPD = ("mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/f bs=50000 count=1 2>/dev/null; "
         "httpd -f -p 127.0.0.1:80 -h /tmp/www & h=$!; "
         "i=0; while [ $i -lt 100 ] && ! /usr/bin/ss -Htln '( sport = :80 )' | grep -q .; do "
         "sleep 0.1; i=$((i + 1)); done; "
         "for i in 1 2 3 4 5; do wget -q -O /dev/null http://127.0.0.1/f || echo @@WGET_FAILED; "
         "done; kill $h; sleep 1")


def test_sendfile_web_server_exact(suite, backend, tmp_path):
    r = clean_run(suite, tmp_path, "--backend", backend, "--json", "--rfc4898", "--groups",
                  "socket", "--all-processes", "*.*.*.*:80-*:*", "*:*-*:80", "-c", HTTPD)
    why = r.explain()
    assert r.rc == 0 and "@@WGET_FAILED" not in r.meta, why
    if r.skipped() + r.faults():
        pytest.skip(f"{backend} skipped {r.skipped()} probe hits: counts may be low")
    rows = r.json()
    servers = [o for o in rows if o["lport"] == 80 and o["rport"]]
    clients = {o["lport"]: o for o in rows if o["rport"] == 80}
    assert len(servers) == len(clients) == 5, why
    heads = set()
    for o in servers:
        peer = clients[o["rport"]]
        sc, cc = o["counters"], peer["counters"]
        # the kernel's own counts at close: the data and the FIN
        assert sc["SendBytes"] == cc["RecvBytes"] == o["rfc4898"]["ThruOctetsAcked"] - 1, why
        assert cc["RecvBytes"] == peer["rfc4898"]["ThruOctetsReceived"] - 1, why
        assert sc["RecvBytes"] == cc["SendBytes"] == o["rfc4898"]["ThruOctetsReceived"] - 1, why
        heads.add(sc["SendBytes"] - BODY)
    # the body and the same response header on each connection
    (head,) = heads
    assert 100 < head < 1000, why
