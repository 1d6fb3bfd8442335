/* The compiled --read path (tcpipstat.capture._fast): what its four parts share.
 *
 *   engine.c  the Python type: capture records (pcap, pcapng) read in large blocks
 *   decode.c  frame -> TCP segment, for the usual link, IP and TCP headers
 *   flows.c   segments -> per-connection state: a line-by-line port of flows.py
 *   counters.c  a connection's final state -> the counters the report shows (flows.py's)
 *
 * tcpipstat/capture/flows.py and packets.py stay the reference: this code must give the
 * same numbers from the same packets (tests/test_capture_fast.py compares the two paths'
 * output byte for byte). Where a frame is anything but the usual, decode.c hands it to
 * dpkt (packets.py) rather than guess how dpkt would have read it.
 */
#ifndef TCPIPSTAT_FAST_H
#define TCPIPSTAT_FAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* flows.py's RECENT_PACKETS, a fixed size here; fast.py checks that they agree */
#define RECENT_PACKETS 8

/* A decoded TCP segment: packets.py's segment tuple. Addresses are kept as 16 bytes
 * (IPv4: the first 4, the rest zero) so that a key can be compared whole. */
typedef struct {
    uint8_t src[16], dst[16];
    uint32_t seq, ack, plen;        /* plen: payload length, from the IP header */
    uint16_t sport, dport, flags, win, ipid;
    uint8_t family, alen;           /* AF_INET (2) or AF_INET6 (10); 4 or 16 */
} Seg;

/* decode.c: 1 = a TCP segment (seg filled); 0 = not TCP, for certain (no dpkt decoder
 * could say otherwise or fail on it); -1 = not the usual case: ask dpkt. */
int fast_decode(int linktype, const uint8_t *p, Py_ssize_t n, Seg *seg);

/* One direction of a connection: flows.py's Half, field for field. */
typedef struct { int64_t lo, hi; } Range;
typedef struct { int64_t lo, hi; double ts; int retrans; } Pending;
typedef struct { uint32_t seq, ack, plen; uint16_t ipid, flags, win; } Recent;

typedef struct {
    int64_t segs, new_bytes, retrans_segs, retrans_bytes, ooo, dupacks, netdups;
    int64_t zero_wins, rsts, syns, fins, rtt_n;
    double rtt_sum, rtt_min, rtt_max, acked_ts, first_data, last_data, syn_ts;
    int64_t high, floor;
    uint32_t isn, last_ack;
    int32_t last_win;
    /* Python's None, for the fields that may hold it */
    uint8_t has_isn, has_high, has_last_ack, has_first_data, has_syn_ts;
    uint8_t resent, nrecent, recent_next;
    Recent recent[RECENT_PACKETS];  /* a ring: its last packets (only membership matters) */
    Range *seen;                    /* [lo, hi) seen above the floor, sorted */
    int32_t nseen, capseen;
    Pending *pend;                  /* pend[head .. head + npend): awaiting an RTT sample */
    int32_t head, npend, cappend;
} Half;

typedef struct {
    Half halves[2];                 /* [0]: local (the initiator) -> remote */
    uint8_t laddr[16], raddr[16];
    double first_ts, last_ts, synack_ts, hs_ack_ts;
    int64_t packets, synack_n;
    uint16_t lport, rport;
    uint8_t family, alen, opened, closed, has_synack_ts, has_hs_ack_ts;
} Conn;

/* A direction's key: flows.py's (src, sport, dst, dport); 40 bytes, compared whole. */
typedef struct {
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
    uint8_t alen, pad[3];
} Key;

typedef struct {
    Key key;
    int32_t conn;                   /* index in conns; -1: a connection the filters refused */
    int32_t d;                      /* the direction this key is, in that connection */
} Entry;

typedef struct {
    /* the dict: entries in insertion order (Python's dict order), an open-addressing index */
    Entry *entries;
    int32_t nentries, capentries;
    int32_t *index;                 /* entry + 1; 0: empty */
    uint32_t mask;
    Conn **conns;                   /* every connection, by creation */
    int32_t nconns, capconns;
    int32_t *done;                  /* connections replaced by a new one on their tuple */
    int32_t ndone, capdone;
    int64_t rejected;
    PyObject *accept;               /* the filters, or NULL */
    int32_t max_pending, max_holes;
    Range *scratch;                 /* max_holes + 2 ranges, twice: flows.py's _insert */
} Flows;

int flows_init(Flows *t, PyObject *accept, int32_t max_pending, int32_t max_holes);
void flows_free(Flows *t);
int flows_add(Flows *t, double ts, const Seg *s);   /* -1: a Python error (the filters) */
PyObject *flows_export(Flows *t);   /* [ConnState], in FlowTable.connections()'s order */
int flows_types_init(void);         /* ConnState and HalfState, at the module's import */
extern PyTypeObject *ConnStateType, *HalfStateType;

/* counters.c: flows.counters() of a ConnState */
int counters_init(void);
PyObject *counters(PyObject *module, PyObject *state);

/* Memory the engine holds, through Python's raw allocator: tracemalloc sees it. */
void *xrealloc(void *p, size_t n);
void xfree(void *p);

#endif
