/* Segments -> per-connection state: tcpipstat/capture/flows.py, ported function by
 * function (the same names, the same order of tests), so that the two can be read side
 * by side. flows.py's module docstring says what each counter means and why.
 *
 * Python's integers do not overflow; these are 64-bit. A sequence number is unwrapped
 * to within 2^31 of the previous one, so reaching 2^62 would take 2^31 packets on one
 * connection, each moving it by 2^31: no capture does.
 */
#include "fast.h"

#include <string.h>

#define FIN 0x01
#define SYN 0x02
#define RST 0x04
#define ACK 0x10
#define NO_FLOOR (-((int64_t)1 << 62))

void *xrealloc(void *p, size_t n)
{
    void *q = PyMem_RawRealloc(p, n ? n : 1);
    if (!q)
        PyErr_NoMemory();
    return q;
}

void xfree(void *p) { PyMem_RawFree(p); }

/* Room for n elements of size sz in *arr of capacity *cap (grown by half again). */
static int reserve(void **arr, int32_t *cap, int64_t n, size_t sz)
{
    if (n <= *cap)
        return 0;
    int64_t c = *cap < 4 ? 4 : *cap + *cap / 2;
    if (c < n)
        c = n;
    if (c > INT32_MAX) {
        PyErr_NoMemory();
        return -1;
    }
    void *p = xrealloc(*arr, (size_t)c * sz);
    if (!p)
        return -1;
    *arr = p;
    *cap = (int32_t)c;
    return 0;
}

static int64_t unwrap(int64_t ref, uint32_t seq)
{
    int64_t d = (uint32_t)((uint64_t)seq - (uint64_t)ref);
    return ref + d - ((d >> 31) << 32);
}

/* -- the seen ranges and the pending segments ------------------------------------- */

static int seen_set(Half *h, const Range *src, int32_t n)
{
    if (reserve((void **)&h->seen, &h->capseen, n, sizeof(Range)) < 0)
        return -1;
    memmove(h->seen, src, (size_t)n * sizeof(Range));
    h->nseen = n;
    return 0;
}

/* flows.py: seen[0:2] = [[seen[0][0], seen[1][1]]] (too many holes: forget the lowest) */
static void merge_lowest(Range *r, int32_t *n)
{
    r[0].hi = r[1].hi;
    memmove(r + 1, r + 2, (size_t)(*n - 2) * sizeof(Range));
    (*n)--;
}

static Pending *pend_at(Half *h, int32_t i) { return &h->pend[h->head + i]; }

/* Room for one more pending segment at the end (moving the live ones to the front
 * first, when they do not start there). */
static int pend_room(Half *h)
{
    if (h->head + h->npend < h->cappend)
        return 0;
    if (h->head) {
        memmove(h->pend, h->pend + h->head, (size_t)h->npend * sizeof(Pending));
        h->head = 0;
        if (h->npend < h->cappend)
            return 0;
    }
    return reserve((void **)&h->pend, &h->cappend, (int64_t)h->npend + 1, sizeof(Pending));
}

static void pend_drop_front(Half *h, int32_t k)
{
    h->head += k;
    h->npend -= k;
    if (!h->npend)
        h->head = 0;
}

/* Python's list comparison of [lo, hi, ts, retransmitted] entries: a < b */
static int pend_less(const Pending *a, const Pending *b)
{
    if (a->lo != b->lo)
        return a->lo < b->lo;
    if (a->hi != b->hi)
        return a->hi < b->hi;
    if (a->ts != b->ts)
        return a->ts < b->ts;
    return a->retrans < b->retrans;
}

/* bisect.insort (insort_right), the same binary search: the list need not be sorted by
 * time (resends change it), so only the same comparisons put an entry in the same place */
static int pend_insort(Half *h, Pending e)
{
    int32_t lo = 0, hi = h->npend;
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (pend_less(&e, pend_at(h, mid)))
            hi = mid;
        else
            lo = mid + 1;
    }
    if (pend_room(h) < 0)
        return -1;
    Pending *at = pend_at(h, lo);
    memmove(at + 1, at, (size_t)(h->npend - lo) * sizeof(Pending));
    *at = e;
    h->npend++;
    return 0;
}

/* bisect_left(pend, [s]): [lo, ...] < [s] exactly when lo < s */
static int32_t pend_bisect_left(Half *h, int64_t s)
{
    int32_t lo = 0, hi = h->npend;
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (pend_at(h, mid)->lo < s)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* -- flows.py's functions ---------------------------------------------------------- */

/* _insert: add [s, e) to what h has seen; *overlap: its bytes seen already; the new
 * pieces go to pieces[0 .. *npieces). */
static int insert(Flows *t, Half *h, int64_t s, int64_t e, int64_t *overlap,
                  Range *pieces, int32_t *npieces)
{
    int64_t floor = h->floor;
    *overlap = 0;
    *npieces = 0;
    if (s < floor) {
        *overlap = (e < floor ? e : floor) - s;
        s = floor;
        if (e <= s)
            return 0;
    }
    Range *out = t->scratch;
    int32_t nout = 0;
    int64_t pos = s, lo_m = s, hi_m = e;
    int placed = 0;
    for (int32_t i = 0; i < h->nseen; i++) {
        int64_t lo = h->seen[i].lo, hi = h->seen[i].hi;
        if (hi < s) {
            out[nout++] = (Range){lo, hi};
        } else if (lo > e) {
            if (!placed) {
                out[nout++] = (Range){lo_m, hi_m};
                placed = 1;
            }
            out[nout++] = (Range){lo, hi};
        } else {                            /* overlapping or touching: merge */
            int64_t a = lo > s ? lo : s, b = hi < e ? hi : e;
            if (b > a) {
                *overlap += b - a;
                if (a > pos)
                    pieces[(*npieces)++] = (Range){pos, a};
                pos = pos > b ? pos : b;
            }
            lo_m = lo_m < lo ? lo_m : lo;
            hi_m = hi_m > hi ? hi_m : hi;
        }
    }
    if (pos < e)
        pieces[(*npieces)++] = (Range){pos, e};
    if (!placed)
        out[nout++] = (Range){lo_m, hi_m};
    if (nout > t->max_holes)
        merge_lowest(out, &nout);
    return seen_set(h, out, nout);
}

/* _seen_bytes: how many bytes of [s, e) h has seen already */
static int64_t seen_bytes(const Half *h, int64_t s, int64_t e)
{
    int64_t n = 0;
    if (s < h->floor) {
        n = (e < h->floor ? e : h->floor) - s;
        s = h->floor;
    }
    for (int32_t i = 0; i < h->nseen; i++) {
        int64_t a = h->seen[i].lo > s ? h->seen[i].lo : s;
        int64_t b = h->seen[i].hi < e ? h->seen[i].hi : e;
        if (b > a)
            n += b - a;
    }
    return n;
}

static void mark_retransmitted(Half *h, int64_t s, int64_t e, double ts)
{
    int32_t i = pend_bisect_left(h, s) - 1;
    for (i = i < 0 ? 0 : i; i < h->npend; i++) {
        Pending *ent = pend_at(h, i);
        if (ent->lo >= e)
            break;
        if (ent->hi > s) {
            ent->ts = ts;
            ent->retrans = 1;
        }
    }
}

static void count_syn(Conn *c, Half *x, int d, uint32_t seq, int flags, double ts)
{
    x->syns++;
    if (!x->has_isn) {
        x->isn = seq;
        x->has_isn = 1;
    }
    if (!(flags & ACK)) {
        if (d == 0) {
            c->opened = 1;
            x->syn_ts = ts;
            x->has_syn_ts = 1;
        }
    } else {
        c->synack_n++;
        if (!c->has_synack_ts) {
            c->synack_ts = ts;
            c->has_synack_ts = 1;
        }
    }
}

/* the usual case of _sent: at or past everything seen */
static int sent_new(Flows *t, Half *x, int64_t s, int64_t e, uint32_t plen, double ts)
{
    if (x->nseen && x->seen[x->nseen - 1].hi == s) {
        x->seen[x->nseen - 1].hi = e;
    } else {
        if (reserve((void **)&x->seen, &x->capseen, (int64_t)x->nseen + 1, sizeof(Range)) < 0)
            return -1;
        x->seen[x->nseen++] = (Range){s, e};
        if (x->nseen > t->max_holes)
            merge_lowest(x->seen, &x->nseen);
    }
    x->new_bytes += plen;
    if (pend_room(x) < 0)
        return -1;
    *pend_at(x, x->npend++) = (Pending){s, e, ts, 0};
    if (x->npend > t->max_pending)
        pend_drop_front(x, t->max_pending / 2);
    return 0;
}

static int resent_or_filled(Flows *t, Half *x, int64_t s, int64_t e, int syn, uint32_t plen,
                            double ts)
{
    int64_t resent = plen ? seen_bytes(x, s + syn, s + syn + plen) : 0;
    if (s < x->floor && ts > x->acked_ts)   /* acknowledged data sent again: Karn's rule */
        x->acked_ts = ts;
    int64_t overlap;
    int32_t npieces;
    Range *pieces = t->scratch + t->max_holes + 2;
    if (insert(t, x, s, e, &overlap, pieces, &npieces) < 0)
        return -1;
    if (overlap) {
        x->retrans_segs++;
        x->retrans_bytes += resent;
        x->new_bytes += plen - resent;
        mark_retransmitted(x, s, e, ts);
        if (!(plen == 1 && e - s == 1 && e == x->high))   /* (a keep-alive's one old byte) */
            x->resent = 1;
    } else {
        x->new_bytes += plen;
        x->ooo++;
    }
    for (int32_t i = 0; i < npieces; i++)
        if (pend_insort(x, (Pending){pieces[i].lo, pieces[i].hi, ts, 0}) < 0)
            return -1;
    return 0;
}

static int sent(Flows *t, Half *x, Half *y, uint32_t seq, int syn, int fin, uint32_t plen,
                double ts)
{
    if (plen) {
        if (!x->has_first_data) {
            x->first_data = ts;
            x->has_first_data = 1;
        }
        x->last_data = ts;
    }
    int64_t s, high;
    if (!x->has_high) {
        s = seq;
        x->high = high = s;
        x->has_high = 1;
        if (syn)
            x->floor = s;
    } else {
        high = x->high;
        s = unwrap(high, seq);
    }
    int64_t e = s + plen + syn + fin;
    if (fin)
        x->fins++;
    if (y->last_win == 0 && y->segs && !syn) {
        /* a window probe (as tcptrace): neither new nor resent */
    } else if (s >= high && s >= x->floor) {
        if (sent_new(t, x, s, e, plen, ts) < 0)
            return -1;
    } else if (resent_or_filled(t, x, s, e, syn, plen, ts) < 0) {
        return -1;
    }
    if (e > high)
        x->high = e;
    return 0;
}

/* _acknowledged: RTT samples (Karn's rule), then the floor rises to a */
static void acknowledged(Half *y, int64_t a, double ts)
{
    if (y->npend && pend_at(y, 0)->lo < a) {
        double acked_ts = y->acked_ts;
        int32_t i = 0;
        for (; i < y->npend; i++) {
            Pending *ent = pend_at(y, i);
            if (ent->lo >= a)
                break;
            double t0 = ent->ts;
            if (ent->hi == a && !ent->retrans && acked_ts <= t0) {
                double rtt = ts - t0;
                if (y->rtt_n == 0 || rtt < y->rtt_min)
                    y->rtt_min = rtt;
                if (rtt > y->rtt_max)
                    y->rtt_max = rtt;
                y->rtt_sum += rtt;
                y->rtt_n++;
            }
            if (t0 > acked_ts)
                acked_ts = t0;
        }
        pend_drop_front(y, i);
        y->acked_ts = acked_ts;
    }
    y->floor = a;
    int32_t k = 0;
    while (k < y->nseen && y->seen[k].hi <= a)
        k++;
    memmove(y->seen, y->seen + k, (size_t)(y->nseen - k) * sizeof(Range));
    y->nseen -= k;
    if (y->nseen && y->seen[0].lo < a)
        y->seen[0].lo = a;
}

/* _network_duplicate: one of the last RECENT_PACKETS x sent? else remember it */
static int network_duplicate(Half *x, const Seg *g)
{
    Recent r = {g->seq, g->ack, g->plen, g->ipid, g->flags, g->win};
    for (int i = 0; i < x->nrecent; i++) {
        const Recent *o = &x->recent[i];
        if (o->seq == r.seq && o->ack == r.ack && o->plen == r.plen && o->ipid == r.ipid
                && o->flags == r.flags && o->win == r.win)
            return 1;
    }
    x->recent[x->recent_next] = r;          /* (replacing the oldest once full) */
    x->recent_next = (uint8_t)((x->recent_next + 1) % RECENT_PACKETS);
    if (x->nrecent < RECENT_PACKETS)
        x->nrecent++;
    return 0;
}

static void ack(Half *x, Half *y, uint32_t ackno, int win, int busy, int rst, double ts)
{
    if (!y->has_high) {
        y->high = ackno;
        y->has_high = 1;
    }
    int64_t a = unwrap(y->high, ackno);
    if (a > y->floor)
        acknowledged(y, a, ts);
    if (rst)
        return;
    if (win == 0)
        x->zero_wins++;
    if (!busy && x->has_last_ack && ackno == x->last_ack && win == x->last_win
            && (y->high > a || y->resent))
        x->dupacks++;
    x->last_ack = ackno;
    x->has_last_ack = 1;
    x->last_win = win;
    y->resent = 0;
}

/* -- FlowTable -------------------------------------------------------------------- */

static Key key_of(const Seg *s, int reverse)
{
    Key k;
    memset(&k, 0, sizeof k);
    memcpy(k.src, reverse ? s->dst : s->src, s->alen);
    memcpy(k.dst, reverse ? s->src : s->dst, s->alen);
    k.sport = reverse ? s->dport : s->sport;
    k.dport = reverse ? s->sport : s->dport;
    k.alen = s->alen;
    return k;
}

static uint32_t key_hash(const Key *k)
{
    uint64_t w[5], h = 0x9E3779B97F4A7C15u;
    memcpy(w, k, sizeof w);
    for (int i = 0; i < 5; i++) {
        h = (h ^ w[i]) * 0xBF58476D1CE4E5B9u;
        h ^= h >> 31;
    }
    return (uint32_t)h;
}

/* The index slot of key k: where it is, or the empty slot where it would go. */
static uint32_t slot_of(const Flows *t, const Key *k)
{
    uint32_t i = key_hash(k) & t->mask;
    while (t->index[i] && memcmp(&t->entries[t->index[i] - 1].key, k, sizeof *k))
        i = (i + 1) & t->mask;
    return i;
}

static int grow_index(Flows *t)
{
    uint32_t size = (t->mask + 1) * 2;
    int32_t *index = xrealloc(NULL, size * sizeof(int32_t));
    if (!index)
        return -1;
    memset(index, 0, size * sizeof(int32_t));
    xfree(t->index);
    t->index = index;
    t->mask = size - 1;
    for (int32_t e = 0; e < t->nentries; e++)
        t->index[slot_of(t, &t->entries[e].key)] = e + 1;
    return 0;
}

/* table[k] = (conn, d): a new key goes last, as in a dict; a known one keeps its place */
static int table_set(Flows *t, const Key *k, int32_t conn, int32_t d)
{
    uint32_t i = slot_of(t, k);
    if (!t->index[i]) {
        if (reserve((void **)&t->entries, &t->capentries, (int64_t)t->nentries + 1,
                    sizeof(Entry)) < 0)
            return -1;
        t->entries[t->nentries] = (Entry){*k, conn, d};
        t->index[i] = ++t->nentries;
        return (uint32_t)t->nentries * 2 > t->mask ? grow_index(t) : 0;
    }
    t->entries[t->index[i] - 1].conn = conn;
    t->entries[t->index[i] - 1].d = d;
    return 0;
}

static void half_init(Half *h)
{
    memset(h, 0, sizeof *h);
    h->floor = NO_FLOOR;
    h->last_win = -1;
}

static void half_free(Half *h)
{
    xfree(h->seen);
    xfree(h->pend);
    h->seen = NULL;
    h->pend = NULL;
    h->nseen = h->capseen = h->head = h->npend = h->cappend = 0;
}

/* the filters' verdict on a connection oriented as (l, r); -1: a Python error */
static int accepted(Flows *t, int family, int alen, const uint8_t *la, int lp,
                    const uint8_t *ra, int rp)
{
    if (!t->accept)
        return 1;
    PyObject *r = PyObject_CallFunction(t->accept, "iy#iy#i", family, (const char *)la,
                                        (Py_ssize_t)alen, lp, (const char *)ra,
                                        (Py_ssize_t)alen, rp);
    if (!r)
        return -1;
    int ok = PyObject_IsTrue(r);
    Py_DECREF(r);
    return ok;
}

/* _new: a connection, oriented (local is the client: flows.py's FlowTable._new says how
 * it is told), or -1 in *ci when the filters refuse it; both keys of its tuple now lead
 * to it. */
static int new_conn(Flows *t, const Seg *s, double ts, int32_t *ci, int32_t *d)
{
    int client_sent = (s->flags & SYN) ? !(s->flags & ACK) : s->dport <= s->sport;
    const uint8_t *la = client_sent ? s->src : s->dst, *ra = client_sent ? s->dst : s->src;
    int lp = client_sent ? s->sport : s->dport, rp = client_sent ? s->dport : s->sport;
    *d = client_sent ? 0 : 1;
    *ci = -1;
    int ok = accepted(t, s->family, s->alen, la, lp, ra, rp);
    if (ok < 0)
        return -1;
    if (!ok) {
        t->rejected++;
    } else {
        if (reserve((void **)&t->conns, &t->capconns, (int64_t)t->nconns + 1,
                    sizeof(Conn *)) < 0)
            return -1;
        Conn *c = xrealloc(NULL, sizeof *c);
        if (!c)
            return -1;
        memset(c, 0, sizeof *c);
        half_init(&c->halves[0]);
        half_init(&c->halves[1]);
        c->family = s->family;
        c->alen = s->alen;
        memcpy(c->laddr, la, 16);
        memcpy(c->raddr, ra, 16);
        c->lport = (uint16_t)lp;
        c->rport = (uint16_t)rp;
        c->first_ts = c->last_ts = ts;
        t->conns[t->nconns] = c;
        *ci = t->nconns++;
    }
    Key fwd = key_of(s, 0), rev = key_of(s, 1);
    if (table_set(t, &fwd, *ci, *d) < 0 || table_set(t, &rev, *ci, 1 - *d) < 0)
        return -1;
    return 0;
}

/* A connection its tuple no longer leads to: final, so its buffers can go. */
static int retire(Flows *t, int32_t ci)
{
    if (reserve((void **)&t->done, &t->capdone, (int64_t)t->ndone + 1, sizeof(int32_t)) < 0)
        return -1;
    t->done[t->ndone++] = ci;
    half_free(&t->conns[ci]->halves[0]);
    half_free(&t->conns[ci]->halves[1]);
    return 0;
}

/* _opening: the connection of a segment on a new tuple, or of a SYN on a known one */
static int opening(Flows *t, int32_t e, const Seg *s, double ts, int32_t *ci, int32_t *d)
{
    if (e >= 0 && t->entries[e].conn >= 0) {
        int32_t known = t->entries[e].conn, kd = t->entries[e].d;
        Conn *c = t->conns[known];
        Half *x = &c->halves[kd];
        if (!c->closed && (!x->has_isn || x->isn == s->seq)) {
            *ci = known;
            *d = kd;
            return 0;
        }
        if (retire(t, known) < 0)
            return -1;
    }
    return new_conn(t, s, ts, ci, d);
}

/* FlowTable.add */
int flows_add(Flows *t, double ts, const Seg *s)
{
    Key k = key_of(s, 0);
    uint32_t slot = slot_of(t, &k);
    int32_t e = t->index[slot] - 1, ci, d;
    int flags = s->flags;
    if (e < 0 || ((flags & SYN) && !(flags & ACK))) {       /* perhaps a new connection */
        if (opening(t, e, s, ts, &ci, &d) < 0)
            return -1;
    } else {
        ci = t->entries[e].conn;
        d = t->entries[e].d;
    }
    if (ci < 0)
        return 0;
    Conn *c = t->conns[ci];
    c->last_ts = ts;
    c->packets++;
    Half *x = &c->halves[d], *y = &c->halves[1 - d];
    if (s->ipid && network_duplicate(x, s)) {
        x->netdups++;
        return 0;
    }
    x->segs++;
    int rst = flags & RST, syn = (flags & SYN) != 0, fin = (flags & FIN) != 0;
    if (rst) {
        x->rsts++;
        c->closed = 1;
    }
    if (syn)
        count_syn(c, x, d, s->seq, flags, ts);
    if ((s->plen || syn || fin) && sent(t, x, y, s->seq, syn, fin, s->plen, ts) < 0)
        return -1;
    if (flags & ACK) {
        ack(x, y, s->ack, s->win, s->plen || syn || fin, rst, ts);
        if (d == 0 && !c->has_hs_ack_ts && c->has_synack_ts && !syn && !rst && y->has_isn
                && s->ack == (uint32_t)(y->isn + 1)) {
            c->hs_ack_ts = ts;
            c->has_hs_ack_ts = 1;
        }
    } else if (!rst) {
        x->last_win = syn ? s->win : 0;     /* (tcptrace's "effective window") */
    }
    if (fin && y->fins)
        c->closed = 1;
    return 0;
}

/* -- the result: what the report reads of each connection ------------------------------
 * Struct sequences (named tuples made in C): the report reads their fields by name, as it
 * reads a Conn's and its Halves' (rebuilding those objects would cost more than all the
 * rest of a short connection's work). */

PyTypeObject *ConnStateType, *HalfStateType;

static PyStructSequence_Field conn_fields[] = {
    {"family", NULL}, {"laddr", NULL}, {"lport", NULL}, {"raddr", NULL}, {"rport", NULL},
    {"first_ts", NULL}, {"last_ts", NULL}, {"opened", NULL}, {"closed", NULL},
    {"synack_n", NULL}, {"hs_ack_ts", NULL}, {"packets", NULL},
    {"halves", "(local -> remote, remote -> local): HalfState each"}, {NULL, NULL}};
static PyStructSequence_Field half_fields[] = {
    {"segs", NULL}, {"new_bytes", NULL}, {"retrans_segs", NULL}, {"retrans_bytes", NULL},
    {"ooo", NULL}, {"dupacks", NULL}, {"netdups", NULL}, {"zero_wins", NULL}, {"rsts", NULL},
    {"syns", NULL}, {"fins", NULL}, {"rtt_n", NULL}, {"rtt_sum", NULL}, {"rtt_min", NULL},
    {"rtt_max", NULL}, {"first_data", NULL}, {"last_data", NULL}, {"syn_ts", NULL},
    {NULL, NULL}};
static PyStructSequence_Desc conn_desc = {
    "tcpipstat.capture._fast.ConnState",
    "A connection's final state: flows.py's Conn fields that the report reads.",
    conn_fields, 13};
static PyStructSequence_Desc half_desc = {
    "tcpipstat.capture._fast.HalfState",
    "One direction's final state: flows.py's Half fields that the report reads.",
    half_fields, 18};

int flows_types_init(void)
{
    ConnStateType = PyStructSequence_NewType(&conn_desc);
    HalfStateType = PyStructSequence_NewType(&half_desc);
    return ConnStateType && HalfStateType ? 0 : -1;
}

static PyObject *maybe(int has, double v)      /* a float, or None as in flows.py */
{
    if (has)
        return PyFloat_FromDouble(v);
    Py_RETURN_NONE;
}

/* a struct sequence of the values given (new references; NULL among them: an error) */
static PyObject *state(PyTypeObject *type, PyObject **v, int n)
{
    PyObject *s = PyStructSequence_New(type);
    for (int i = 0; i < n; i++) {
        if (!v[i] || !s) {
            for (int j = i; j < n; j++)
                Py_XDECREF(v[j]);
            Py_XDECREF(s);
            return NULL;
        }
        PyStructSequence_SET_ITEM(s, i, v[i]);
    }
    return s;
}

static PyObject *half_state(const Half *h)
{
    PyObject *v[18] = {
        PyLong_FromLongLong(h->segs), PyLong_FromLongLong(h->new_bytes),
        PyLong_FromLongLong(h->retrans_segs), PyLong_FromLongLong(h->retrans_bytes),
        PyLong_FromLongLong(h->ooo), PyLong_FromLongLong(h->dupacks),
        PyLong_FromLongLong(h->netdups), PyLong_FromLongLong(h->zero_wins),
        PyLong_FromLongLong(h->rsts), PyLong_FromLongLong(h->syns),
        PyLong_FromLongLong(h->fins), PyLong_FromLongLong(h->rtt_n),
        PyFloat_FromDouble(h->rtt_sum), PyFloat_FromDouble(h->rtt_min),
        PyFloat_FromDouble(h->rtt_max), maybe(h->has_first_data, h->first_data),
        maybe(h->has_first_data, h->last_data), maybe(h->has_syn_ts, h->syn_ts)};
    return state(HalfStateType, v, 18);
}

static PyObject *pair(PyObject *a, PyObject *b)       /* (a, b), stealing both */
{
    PyObject *t = a && b ? PyTuple_New(2) : NULL;
    if (!t) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    return t;
}

static PyObject *conn_state(const Conn *c)
{
    PyObject *v[13] = {
        PyLong_FromLong(c->family),
        PyBytes_FromStringAndSize((const char *)c->laddr, c->alen), PyLong_FromLong(c->lport),
        PyBytes_FromStringAndSize((const char *)c->raddr, c->alen), PyLong_FromLong(c->rport),
        PyFloat_FromDouble(c->first_ts), PyFloat_FromDouble(c->last_ts),
        PyBool_FromLong(c->opened), PyBool_FromLong(c->closed),
        PyLong_FromLongLong(c->synack_n), maybe(c->has_hs_ack_ts, c->hs_ack_ts),
        PyLong_FromLongLong(c->packets),
        pair(half_state(&c->halves[0]), half_state(&c->halves[1]))};
    return state(ConnStateType, v, 13);
}

static int append_conn(PyObject *list, const Conn *c)
{
    PyObject *v = conn_state(c);
    if (!v)
        return -1;
    int r = PyList_Append(list, v);
    Py_DECREF(v);
    return r;
}

/* FlowTable.connections: the replaced ones, then the table's in the order their tuples
 * were first seen (a dict's order), each once */
PyObject *flows_export(Flows *t)
{
    PyObject *list = PyList_New(0);
    uint8_t *emitted = xrealloc(NULL, (size_t)t->nconns + 1);
    if (!list || !emitted)
        goto fail;
    memset(emitted, 0, (size_t)t->nconns + 1);
    for (int32_t i = 0; i < t->ndone; i++)
        if (append_conn(list, t->conns[t->done[i]]) < 0)
            goto fail;
    for (int32_t e = 0; e < t->nentries; e++) {
        int32_t ci = t->entries[e].conn;
        if (ci < 0 || emitted[ci])
            continue;
        emitted[ci] = 1;
        if (append_conn(list, t->conns[ci]) < 0)
            goto fail;
    }
    xfree(emitted);
    return list;
fail:
    xfree(emitted);
    Py_XDECREF(list);
    return NULL;
}

int flows_init(Flows *t, PyObject *accept, int32_t max_pending, int32_t max_holes)
{
    memset(t, 0, sizeof *t);
    t->max_pending = max_pending;
    t->max_holes = max_holes;
    t->mask = 1023;
    t->index = xrealloc(NULL, (t->mask + 1) * sizeof(int32_t));
    t->scratch = xrealloc(NULL, 2 * ((size_t)max_holes + 2) * sizeof(Range));
    if (!t->index || !t->scratch)
        return -1;
    memset(t->index, 0, (t->mask + 1) * sizeof(int32_t));
    if (accept != Py_None) {
        Py_INCREF(accept);
        t->accept = accept;
    }
    return 0;
}

void flows_free(Flows *t)
{
    for (int32_t i = 0; i < t->nconns; i++) {
        half_free(&t->conns[i]->halves[0]);
        half_free(&t->conns[i]->halves[1]);
        xfree(t->conns[i]);
    }
    xfree(t->conns);
    xfree(t->entries);
    xfree(t->index);
    xfree(t->done);
    xfree(t->scratch);
    Py_CLEAR(t->accept);
    memset(t, 0, sizeof *t);
}
