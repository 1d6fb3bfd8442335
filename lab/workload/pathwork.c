/* pathwork - one loopback TCP connection that moves SIZE bytes through one send path and
 * one receive path, for tcpipstat's lab tests (tests/test_tier3_lab_paths.py).
 *
 *   pathwork SEND RECV SIZE
 *
 * SEND: write sendmsg sendmmsg writev sendfile splice (file -> pipe -> socket)
 *       vmsplice (user memory -> pipe -> socket) zerocopy (send(MSG_ZEROCOPY), then its
 *       completions read from the error queue) uring_send uring_sendmsg uring_sendzc
 *       (io_uring IORING_OP_SEND, _SENDMSG, _SEND_ZC: one operation in flight, each
 *       completion waited for; _SEND_ZC's also its notification) ktls (write() on a
 *       kTLS socket: TCP_ULP "tls", TLS 1.2 AES-GCM-128 TLS_TX with fixed test keys)
 *       ktls_sendfile (sendfile() into such a socket)
 * RECV: read recvmsg recvmmsg readv splice (socket -> pipe) zerocopy (getsockopt
 *       TCP_ZEROCOPY_RECEIVE into an mmap of the socket, with a copy buffer for small
 *       leftovers; what it does not take, its recv_skip_hint, is read with recv())
 *       uring_recv uring_recvmsg (io_uring IORING_OP_RECV, _RECVMSG, without MSG_WAITALL)
 *       ktls (read() on a kTLS socket, TLS_RX with the same keys: only with SEND ktls*)
 *       ktls_splice (splice() out of such a socket)
 *
 * The client (a child process) sends SIZE bytes in calls of at most CHUNK bytes (one call
 * hands the kernel at most 16 pages: one message on every path and kernel), waits for the
 * server's one-byte answer and reads its own tcp_info; the server reads SIZE bytes, reads
 * its tcp_info (nothing can move on the connection then: the client waits for the answer),
 * answers one byte and reads until EOF. Each side prints one line:
 *
 *   @@PATHWORK side=S send=P recv=P size=N port=CLIENT_PORT sent=B send_calls=C
 *       received=B recv_calls=C zc_mapped=B zc_copied=B bytes_acked=.. bytes_received=..
 *       bytes_sent=.. segs_in=.. segs_out=.. data_segs_in=.. data_segs_out=.. total_retrans=..
 *
 * sent/received: the bytes the side moved, answer included; *_calls: its calls that moved
 * at least one byte (recvmmsg and sendmmsg: one per message; TCP_ZEROCOPY_RECEIVE: one per
 * getsockopt; io_uring: one per completion with a positive result); zc_mapped, zc_copied:
 * bytes TCP_ZEROCOPY_RECEIVE mapped, copied to its copy buffer. With ktls, sent and
 * received are plaintext bytes; TCP carries each record's 29 more (5 header, 8 explicit
 * nonce, 16 tag), a record per at most 16 KiB of one call. Built statically by lab.sh
 * setup (and by the tests, from this source).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/errqueue.h>
#include <linux/io_uring.h>
#include <linux/tcp.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHUNK 32768L
#define ZC_MAP 65536L
#define ZC_COPY 4096L
#ifndef SOL_TLS
#define SOL_TLS 282
#endif

struct side { long sent, send_calls, received, recv_calls, zc_mapped, zc_copied; };

static void die(const char *what) { perror(what); exit(1); }

static long want(long size, long done) { return size - done < CHUNK ? size - done : CHUNK; }

/* ---- io_uring, with raw system calls (no liburing): one operation at a time ---- */

struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static void *ring_map(int fd, size_t len, off_t what) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, what);
    if (p == MAP_FAILED) die("mmap of the io_uring");
    return p;
}

static void ring_init(struct ring *r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->fd = syscall(__NR_io_uring_setup, 4, &p);
    if (r->fd < 0) die("io_uring_setup");
    char *sq = ring_map(r->fd, p.sq_off.array + p.sq_entries * sizeof(unsigned),
                        IORING_OFF_SQ_RING);
    char *cq = ring_map(r->fd, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
                        IORING_OFF_CQ_RING);
    r->sqes = ring_map(r->fd, p.sq_entries * sizeof(struct io_uring_sqe), IORING_OFF_SQES);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

/* the next completion's result and flags */
static void ring_reap(struct ring *r, int *res, unsigned *flags) {
    for (;;) {
        unsigned h = *r->cq_head;
        if (h != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            *res = r->cqes[h & *r->cq_mask].res;
            *flags = r->cqes[h & *r->cq_mask].flags;
            __atomic_store_n(r->cq_head, h + 1, __ATOMIC_RELEASE);
            return;
        }
        if (syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0
            && errno != EINTR) die("io_uring_enter (wait)");
    }
}

/* submits one operation on `sock` and returns its result; a SEND_ZC's completion says
 * (IORING_CQE_F_MORE) that a notification follows when the kernel let go of the buffer:
 * waited for too, so that the operation is over when this returns */
static long ring_op(struct ring *r, int op, int sock, void *addr, unsigned len) {
    unsigned t = *r->sq_tail, i = t & *r->sq_mask;
    memset(&r->sqes[i], 0, sizeof r->sqes[i]);
    r->sqes[i].opcode = op;
    r->sqes[i].fd = sock;
    r->sqes[i].addr = (unsigned long)addr;
    r->sqes[i].len = len;
    r->sq_array[i] = i;
    __atomic_store_n(r->sq_tail, t + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, r->fd, 1, 0, 0, NULL, 0) != 1) die("io_uring_enter");
    int res, notif;
    unsigned flags, nflags;
    ring_reap(r, &res, &flags);
    if (flags & IORING_CQE_F_MORE) ring_reap(r, &notif, &nflags);
    if (res < 0) { errno = -res; return -1; }
    return res;
}

/* io_uring's send and receive operations: IORING_OP_SEND/RECV take a buffer, _SENDMSG and
 * _RECVMSG a msghdr (len 1: one message) */
static long uring_io(const char *path, int sock, char *buf, long n) {
    static struct ring r;
    if (!r.sqes) ring_init(&r);
    struct iovec iv[2] = {{buf, n / 3}, {buf + n / 3, n - n / 3}};
    struct msghdr m = {.msg_iov = iv, .msg_iovlen = 2};
    const char *op = path + strlen("uring_");
    if (!strcmp(op, "send")) return ring_op(&r, IORING_OP_SEND, sock, buf, n);
    if (!strcmp(op, "sendzc")) return ring_op(&r, IORING_OP_SEND_ZC, sock, buf, n);
    if (!strcmp(op, "recv")) return ring_op(&r, IORING_OP_RECV, sock, buf, n);
    if (!strcmp(op, "sendmsg")) return ring_op(&r, IORING_OP_SENDMSG, sock, &m, 1);
    if (!strcmp(op, "recvmsg")) return ring_op(&r, IORING_OP_RECVMSG, sock, &m, 1);
    fprintf(stderr, "pathwork: unknown io_uring path %s\n", path);
    exit(2);
}

/* ---- kTLS: both ends use the same fixed TLS 1.2 AES-GCM-128 key (a test, no handshake) */

static void ktls(int sock, int dir) {
    struct tls12_crypto_info_aes_gcm_128 ci;
    memset(&ci, 0, sizeof ci);
    ci.info.version = TLS_1_2_VERSION;
    ci.info.cipher_type = TLS_CIPHER_AES_GCM_128;
    memset(ci.key, 0x42, sizeof ci.key);
    memset(ci.iv, 0x24, sizeof ci.iv);
    memset(ci.salt, 0x17, sizeof ci.salt);
    if (setsockopt(sock, IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls"))
        die("setsockopt TCP_ULP tls (is the tls module loaded?)");
    if (setsockopt(sock, SOL_TLS, dir, &ci, sizeof ci)) die("setsockopt SOL_TLS");
}

/* ---- send paths: each returns when SIZE bytes are in the socket ---- */

static void count(struct side *s, long n) { if (n > 0) { s->sent += n; s->send_calls++; } }

static int blob(const char *buf, long size) {
    char name[] = "/tmp/pathwork-XXXXXX";
    int f = mkstemp(name);
    if (f < 0) die("mkstemp");
    unlink(name);
    for (long off = 0; off < size;) {
        long n = write(f, buf + off, size - off);
        if (n <= 0) die("write blob");
        off += n;
    }
    if (lseek(f, 0, SEEK_SET)) die("lseek");
    return f;
}

static void splice_out(int pr, int sock, long n, struct side *s) {
    while (n > 0) {     /* pipe -> socket: each call that moved bytes is one message */
        long m = splice(pr, NULL, sock, NULL, n, 0);
        if (m <= 0) die("splice to socket");
        count(s, m);
        n -= m;
    }
}

static void send_mmsg(int sock, char *buf, long n, struct side *s) {
    struct iovec iv[2] = {{buf, n / 2}, {buf + n / 2, n - n / 2}};
    struct mmsghdr mm[2];
    memset(mm, 0, sizeof mm);
    mm[0].msg_hdr.msg_iov = &iv[0]; mm[0].msg_hdr.msg_iovlen = 1;
    mm[1].msg_hdr.msg_iov = &iv[1]; mm[1].msg_hdr.msg_iovlen = 1;
    int k = sendmmsg(sock, mm, n / 2 ? 2 : 1, 0);
    if (k <= 0) die("sendmmsg");
    for (int i = 0; i < k; i++) count(s, mm[i].msg_len);
    if (mm[0].msg_len + (k > 1 ? mm[1].msg_len : 0) != (unsigned long)n) {
        fprintf(stderr, "pathwork: short sendmmsg\n"); exit(1);
    }
}

static long send_one(const char *path, int sock, char *buf, long n, int file, int *pp,
                     struct side *s) {
    struct iovec iv[2] = {{buf, n / 3}, {buf + n / 3, n - n / 3}};
    struct msghdr m = {.msg_iov = iv, .msg_iovlen = 2};
    long r = -1;
    if (!strcmp(path, "write") || !strcmp(path, "ktls")) r = write(sock, buf, n);
    else if (!strncmp(path, "uring_", 6)) r = uring_io(path, sock, buf, n);
    else if (!strcmp(path, "sendmsg")) r = sendmsg(sock, &m, 0);
    else if (!strcmp(path, "writev")) r = writev(sock, iv, 2);
    else if (!strcmp(path, "zerocopy")) r = send(sock, buf, n, MSG_ZEROCOPY);
    else if (!strcmp(path, "sendfile") || !strcmp(path, "ktls_sendfile"))
        r = sendfile(sock, file, NULL, n);
    else if (!strcmp(path, "sendmmsg")) { send_mmsg(sock, buf, n, s); return n; }
    else if (!strcmp(path, "splice") || !strcmp(path, "vmsplice")) {
        struct iovec v = {buf, n};
        r = path[0] == 's' ? splice(file, NULL, pp[1], NULL, n, 0) : vmsplice(pp[1], &v, 1, 0);
        if (r <= 0) die("splice/vmsplice into the pipe");
        splice_out(pp[0], sock, r, s);
        return r;
    } else { fprintf(stderr, "pathwork: unknown send path %s\n", path); exit(2); }
    if (r <= 0) die(path);
    count(s, r);
    return r;
}

/* MSG_ZEROCOPY: wait until the kernel has released all `sends` buffers (their
 * completions come on the error queue, read with recvmsg(MSG_ERRQUEUE)) */
static void zerocopy_done(int sock, long sends) {
    long next = 0;
    while (next < sends) {
        char ctl[128];
        struct msghdr m = {.msg_control = ctl, .msg_controllen = sizeof ctl};
        struct pollfd p = {sock, 0, 0};
        poll(&p, 1, 1000);
        if (recvmsg(sock, &m, MSG_ERRQUEUE) < 0) {
            if (errno == EAGAIN) continue;
            die("recvmsg MSG_ERRQUEUE");
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            struct sock_extended_err *e = (struct sock_extended_err *)CMSG_DATA(c);
            if (e->ee_origin == SO_EE_ORIGIN_ZEROCOPY) next = (long)e->ee_data + 1;
        }
    }
}

static void send_all(const char *path, int sock, long size, struct side *s) {
    char *buf = aligned_alloc(4096, size + 4096);
    for (long i = 0; i < size; i++) buf[i] = (char)(i * 7 + 1);
    int file = blob(buf, size), pp[2], one = 1;
    if (pipe(pp)) die("pipe");
    if (!strcmp(path, "zerocopy") && setsockopt(sock, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one))
        die("SO_ZEROCOPY");
    if (!strncmp(path, "ktls", 4)) ktls(sock, TLS_TX);
    long sends = 0;
    for (long done = 0; done < size; sends++)
        done += send_one(path, sock, buf + done, want(size, done), file, pp, s);
    if (!strcmp(path, "zerocopy")) zerocopy_done(sock, sends);
    close(file); close(pp[0]); close(pp[1]); free(buf);
}

/* ---- receive paths: each reads exactly SIZE bytes ---- */

static void got(struct side *s, long n) {
    if (n < 0) die("receive");
    if (n == 0) { fprintf(stderr, "pathwork: peer closed early\n"); exit(1); }
    s->received += n; s->recv_calls++;
}

static void recv_mmsg(int c, char *buf, long n, struct side *s) {
    struct iovec iv[2] = {{buf, n / 2 ? n / 2 : n}, {buf + n / 2, n - n / 2}};
    struct mmsghdr mm[2];
    memset(mm, 0, sizeof mm);
    mm[0].msg_hdr.msg_iov = &iv[0]; mm[0].msg_hdr.msg_iovlen = 1;
    mm[1].msg_hdr.msg_iov = &iv[1]; mm[1].msg_hdr.msg_iovlen = 1;
    /* MSG_WAITFORONE: the second message only if bytes are there already */
    int k = recvmmsg(c, mm, n / 2 ? 2 : 1, MSG_WAITFORONE, NULL);
    if (k <= 0) die("recvmmsg");
    for (int i = 0; i < k; i++) got(s, mm[i].msg_len);
}

/* TCP_ZEROCOPY_RECEIVE never waits for data: poll first. It maps what it can (unmapped
 * by the next call), copies small leftovers into its copy buffer, and what it did neither
 * with (recv_skip_hint) is read with recv() */
static void recv_zerocopy(int c, long size, struct side *s) {
    void *map = mmap(NULL, ZC_MAP, PROT_READ, MAP_SHARED, c, 0);
    if (map == MAP_FAILED) die("mmap of the socket");
    static char buf[ZC_MAP], copy[ZC_COPY];
    while (s->received < size) {
        struct pollfd p = {c, POLLIN, 0};
        poll(&p, 1, -1);
        long left = size - s->received;
        struct tcp_zerocopy_receive zc = {.address = (unsigned long)map,
            .length = left < ZC_MAP ? left : ZC_MAP, .copybuf_address = (unsigned long)copy,
            .copybuf_len = left < ZC_COPY ? left : ZC_COPY};
        socklen_t zl = sizeof zc;
        if (getsockopt(c, IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE, &zc, &zl)) die("zerocopy");
        long moved = zc.length + (zc.copybuf_len > 0 ? zc.copybuf_len : 0);
        s->zc_mapped += zc.length;
        s->zc_copied += moved - zc.length;
        if (moved) got(s, moved);
        long rest = zc.recv_skip_hint;
        if (!moved && !rest) rest = want(size, s->received);  /* (nothing said) */
        if (rest > size - s->received) rest = size - s->received;
        if (rest > ZC_MAP) rest = ZC_MAP;
        if (rest) got(s, recv(c, buf, rest, 0));
    }
    munmap(map, ZC_MAP);
}

static void recv_all(const char *path, int c, long size, struct side *s) {
    static char buf[CHUNK];
    int pp[2];
    if (pipe(pp)) die("pipe");
    if (!strcmp(path, "zerocopy")) { recv_zerocopy(c, size, s); return; }
    if (!strncmp(path, "ktls", 4)) ktls(c, TLS_RX);
    while (s->received < size) {
        long n = want(size, s->received);
        struct iovec iv[2] = {{buf, n / 3}, {buf + n / 3, n - n / 3}};
        struct msghdr m = {.msg_iov = iv, .msg_iovlen = 2};
        if (!strcmp(path, "read") || !strcmp(path, "ktls")) got(s, read(c, buf, n));
        else if (!strncmp(path, "uring_", 6)) got(s, uring_io(path, c, buf, n));
        else if (!strcmp(path, "recvmsg")) got(s, recvmsg(c, &m, 0));
        else if (!strcmp(path, "readv")) got(s, readv(c, iv, 2));
        else if (!strcmp(path, "recvmmsg")) recv_mmsg(c, buf, n, s);
        else if (!strcmp(path, "splice") || !strcmp(path, "ktls_splice")) {
            long k = splice(c, NULL, pp[1], NULL, n, 0);
            got(s, k);
            for (long r; k > 0; k -= r)     /* (the pipe is emptied with read()) */
                if ((r = read(pp[0], buf, k)) <= 0) die("read pipe");
        } else { fprintf(stderr, "pathwork: unknown receive path %s\n", path); exit(2); }
    }
    close(pp[0]); close(pp[1]);
}

/* ---- the connection ---- */

static struct tcp_info info(int sock) {
    struct tcp_info t;
    socklen_t tl = sizeof t;
    memset(&t, 0, sizeof t);
    if (getsockopt(sock, IPPROTO_TCP, TCP_INFO, &t, &tl)) die("TCP_INFO");
    return t;
}

static void report(const char *side, char **argv, int port, const struct side *s,
                   struct tcp_info t) {
    dprintf(1, "@@PATHWORK side=%s send=%s recv=%s size=%s port=%d sent=%ld send_calls=%ld "
            "received=%ld recv_calls=%ld zc_mapped=%ld zc_copied=%ld bytes_acked=%llu "
            "bytes_received=%llu bytes_sent=%llu segs_in=%u segs_out=%u data_segs_in=%u "
            "data_segs_out=%u total_retrans=%u\n", side, argv[1], argv[2], argv[3], port, s->sent,
            s->send_calls, s->received, s->recv_calls, s->zc_mapped, s->zc_copied,
            (unsigned long long)t.tcpi_bytes_acked, (unsigned long long)t.tcpi_bytes_received,
            (unsigned long long)t.tcpi_bytes_sent, t.tcpi_segs_in, t.tcpi_segs_out,
            t.tcpi_data_segs_in, t.tcpi_data_segs_out, t.tcpi_total_retrans);
}

static int client(char **argv, struct sockaddr_in *a, long size) {
    struct side s = {0};
    struct sockaddr_in me;
    socklen_t ml = sizeof me;
    char k;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)a, sizeof *a)) die("connect");
    getsockname(c, (struct sockaddr *)&me, &ml);
    send_all(argv[1], c, size, &s);
    if (read(c, &k, 1) != 1) die("read the answer");
    s.received++; s.recv_calls++;
    report("client", argv, ntohs(me.sin_port), &s, info(c));   /* all SIZE bytes acked */
    close(c);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4 || atol(argv[3]) <= 0) {
        fprintf(stderr, "usage: pathwork SEND RECV SIZE (see pathwork.c)\n"); return 2;
    }
    long size = atol(argv[3]);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1)) die("bind/listen");
    getsockname(ls, (struct sockaddr *)&a, &al);       /* (a port the kernel chose) */
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) { close(ls); return client(argv, &a, size); }
    struct sockaddr_in peer;
    socklen_t pl = sizeof peer;
    int c = accept(ls, (struct sockaddr *)&peer, &pl);
    if (c < 0) die("accept");
    close(ls);
    struct side s = {0};
    char b[64];
    recv_all(argv[2], c, size, &s);
    struct tcp_info t = info(c);      /* (before the answer: nothing moves then) */
    if (write(c, "k", 1) != 1) die("answer");
    s.sent++; s.send_calls++;
    report("server", argv, ntohs(peer.sin_port), &s, t);
    while (read(c, b, sizeof b) > 0) {}
    close(c);
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
