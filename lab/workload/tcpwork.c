/* tcpwork - a TCP workload whose exact counts are known, for tcpipstat's lab tests.
 *
 *   tcpwork server ADDR PORT REPLY_BYTES NCONN   accept NCONN connections, one after
 *       the other; read each until EOF, then send REPLY_BYTES and close.
 *   tcpwork client ADDR PORT NCONN SEND_BYTES    NCONN connections, one after the other;
 *       send SEND_BYTES, shut down the write side, read until EOF, close; prints the time taken.
 *   tcpwork refused ADDR PORT NCONN              NCONN connects to a closed port.
 *
 * The server touches /tmp/tcpwork-ready-PORT once it listens; the client waits
 * for that file (up to 10 s), so no connect is refused by a server still starting.
 *
 * TCPWORK_HOLD_MS=N: the client waits N ms after sending, before it shuts down its write
 * side (so `ss -ti` can see the connection with everything sent and acknowledged).
 *
 * ADDR is a numeric IPv4 or IPv6 address. Prints one summary line; exit 0 on success.
 * Built statically by lab.sh setup and put into the guest.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <time.h>

static int mkaddr(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET; a4->sin_port = htons(port); *len = sizeof *a4; return AF_INET;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6; a6->sin6_port = htons(port); *len = sizeof *a6; return AF_INET6;
    }
    fprintf(stderr, "tcpwork: bad address %s\n", host); exit(2);
}

static long drain(int fd) {
    char buf[16384]; long total = 0; ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
    if (n < 0) { perror("tcpwork: read"); exit(1); }
    return total;
}

static void send_n(int fd, long n) {
    static char buf[16384];
    while (n > 0) {
        ssize_t w = write(fd, buf, n < (long)sizeof buf ? (size_t)n : sizeof buf);
        if (w < 0) { if (errno == EINTR) continue; perror("tcpwork: write"); exit(1); }
        n -= w;
    }
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: see the comment in tcpwork.c\n"); return 2; }
    struct sockaddr_storage ss; socklen_t len;
    int fam = mkaddr(argv[2], atoi(argv[3]), &ss, &len);
    if (!strcmp(argv[1], "server") && argc == 6) {
        long reply = atol(argv[4]); int nconn = atoi(argv[5]), one = 1;
        int ls = socket(fam, SOCK_STREAM, 0);
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(ls, (struct sockaddr *)&ss, len) || listen(ls, 64)) { perror("tcpwork: bind/listen"); return 1; }
        char ready[64]; snprintf(ready, sizeof ready, "/tmp/tcpwork-ready-%s", argv[3]);
        FILE *rf = fopen(ready, "w"); if (rf) fclose(rf);
        long in = 0;
        for (int i = 0; i < nconn; i++) {
            int c = accept(ls, NULL, NULL);
            if (c < 0) { perror("tcpwork: accept"); return 1; }
            in += drain(c); send_n(c, reply); close(c);
        }
        close(ls);
        printf("tcpwork server %s:%s: %d connections, %ld bytes in, %ld bytes out\n", argv[2], argv[3], nconn, in, reply * nconn);
        return 0;
    }
    if (!strcmp(argv[1], "client") && argc == 6) {
        int nconn = atoi(argv[4]); long bytes = atol(argv[5]), in = 0;
        const char *hold = getenv("TCPWORK_HOLD_MS"); long hold_ms = hold ? atol(hold) : 0;
        /* wait for the server's ready file, so that no connect is refused (a
           refused connect would still count as an ActiveOpen) */
        char ready[64]; snprintf(ready, sizeof ready, "/tmp/tcpwork-ready-%s", argv[3]);
        for (int t = 0; t < 100 && access(ready, F_OK); t++) usleep(100000);
        struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int i = 0; i < nconn; i++) {
            int s = socket(fam, SOCK_STREAM, 0);
            if (connect(s, (struct sockaddr *)&ss, len)) { perror("tcpwork: connect"); return 1; }
            send_n(s, bytes);
            if (hold_ms > 0) usleep(hold_ms * 1000);
            shutdown(s, SHUT_WR); in += drain(s); close(s);
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
        printf("tcpwork client %s:%s: %d connections, %ld bytes out, %ld bytes in, %ld ms\n", argv[2], argv[3], nconn, bytes * nconn, in, ms);
        return 0;
    }
    if (!strcmp(argv[1], "refused") && argc == 5) {
        int nconn = atoi(argv[4]), refused = 0;
        for (int i = 0; i < nconn; i++) {
            int s = socket(fam, SOCK_STREAM, 0);
            if (connect(s, (struct sockaddr *)&ss, len) && errno == ECONNREFUSED) refused++;
            close(s);
        }
        printf("tcpwork refused %s:%s: %d of %d refused\n", argv[2], argv[3], refused, nconn);
        return refused == nconn ? 0 : 1;
    }
    fprintf(stderr, "tcpwork: bad arguments\n"); return 2;
}
