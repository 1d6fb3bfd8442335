/* Frame -> TCP segment, for the usual case only: the same numbers dpkt gives
 * (tcpipstat/capture/packets.py), read straight from the headers.
 *
 * The usual case is a link header of a type below, then IPv4 (any header length, not a
 * fragment after the first) or IPv6 (TCP as the next header), then TCP with its whole
 * 20-byte header captured and a data offset of at least 5 words. Anything else (VLAN
 * tags, IPv6 extension headers, other protocols, headers cut by the snapshot length,
 * nonsense lengths) returns -1 and packets.py decodes it with dpkt: its handling of the
 * odd cases (which count as cut, as other, as malformed) is the reference, and those
 * frames are too rare to be worth a second implementation.
 */
#include "fast.h"

#include <string.h>

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The TCP header at t, of tlen captured bytes, whose IP header says the segment is
 * seglen bytes long (TCP header included). */
static int tcp(const uint8_t *t, Py_ssize_t tlen, int64_t seglen, Seg *s)
{
    if (tlen < 20)
        return -1;                          /* dpkt: NeedData, counted as cut */
    int off = t[12] >> 4;
    if (off < 5)
        return -1;                          /* dpkt: "invalid header length" */
    int64_t plen = seglen - off * 4;
    s->plen = plen > 0 ? (uint32_t)plen : 0;
    s->sport = be16(t);
    s->dport = be16(t + 2);
    s->seq = be32(t + 4);
    s->ack = be32(t + 8);
    s->flags = be16(t + 12) & 0x1FF;        /* dpkt's 9 flag bits (NS included) */
    s->win = be16(t + 14);
    return 1;
}

static int ipv4(const uint8_t *p, Py_ssize_t n, Seg *s)
{
    if (n < 20)
        return -1;
    int hl = (p[0] & 0xF) * 4;
    if (hl < 20 || p[9] != 6 || (be16(p + 6) & 0x1FFF))
        return -1;                          /* bad length, not TCP, or a later fragment */
    int len = be16(p + 2);                  /* 0: segmentation offload left it unset */
    Py_ssize_t end = len && len < n ? len : n;     /* dpkt: buf[hl:len], or buf[hl:] */
    Py_ssize_t tlen = end > hl ? end - hl : 0;
    int r = tcp(p + hl, tlen, len ? len - hl : tlen, s);
    if (r != 1)
        return r;
    s->family = 2;
    s->alen = 4;
    memcpy(s->src, p + 12, 4);
    memcpy(s->dst, p + 16, 4);
    s->ipid = be16(p + 4);
    return 1;
}

static int ipv6(const uint8_t *p, Py_ssize_t n, Seg *s)
{
    if (n < 40 || p[6] != 6)
        return -1;                          /* cut, extension headers, or not TCP */
    int plen = be16(p + 4);                 /* 0: a jumbogram, or offload */
    Py_ssize_t tlen = plen && plen < n - 40 ? plen : n - 40;
    int r = tcp(p + 40, tlen, plen ? plen : tlen, s);
    if (r != 1)
        return r;
    s->family = 10;
    s->alen = 16;
    memcpy(s->src, p + 8, 16);
    memcpy(s->dst, p + 24, 16);
    s->ipid = 0;                            /* IPv6 has no identification field */
    return 1;
}

/* An ethertype's payload: IPv4 or IPv6, else dpkt's to decode. */
static int ether_payload(uint16_t type, const uint8_t *p, Py_ssize_t n, Seg *s)
{
    if (type == 0x0800)
        return ipv4(p, n, s);
    if (type == 0x86DD)
        return ipv6(p, n, s);
    return -1;
}

/* Raw IP: the version says which (packets.py's _raw: anything else is not TCP). */
static int raw_ip(const uint8_t *p, Py_ssize_t n, Seg *s)
{
    int v = n ? p[0] >> 4 : 0;
    if (v == 4)
        return ipv4(p, n, s);
    if (v == 6)
        return ipv6(p, n, s);
    return 0;
}

/* BSD loopback: an address family first, in the writer's byte order (packets.py's _null). */
static int null_link(const uint8_t *p, Py_ssize_t n, int big, Seg *s)
{
    if (n < 5)
        return 0;
    uint32_t af = big ? be32(p) : (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16
                                  | (uint32_t)p[1] << 8 | p[0];
    if (af == 2)
        return ipv4(p + 4, n - 4, s);
    if (af == 10 || af == 24 || af == 28 || af == 30)
        return ipv6(p + 4, n - 4, s);
    return 0;
}

int fast_decode(int linktype, const uint8_t *p, Py_ssize_t n, Seg *s)
{
    switch (linktype) {
    case 1:                                 /* Ethernet (no VLAN tag: dpkt's to decode) */
        return n < 14 ? -1 : ether_payload(be16(p + 12), p + 14, n - 14, s);
    case 113:                               /* Linux cooked (SLL) */
        return n < 16 ? -1 : ether_payload(be16(p + 14), p + 16, n - 16, s);
    case 276:                               /* Linux cooked v2 (SLL2) */
        return n < 20 ? -1 : ether_payload(be16(p), p + 20, n - 20, s);
    case 101: case 12: case 14:
        return raw_ip(p, n, s);
    case 228:
        return ipv4(p, n, s);
    case 229:
        return ipv6(p, n, s);
    case 0:
        return null_link(p, n, 0, s);
    case 108:
        return null_link(p, n, 1, s);
    default:
        return -1;
    }
}
