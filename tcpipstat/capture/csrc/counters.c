/* _fast.counters(state): flows.py's counters(conn), ported, for the compiled path's
 * ConnState: the per-connection view the report shows. In Python it was a sixth of the
 * time of a capture of many short connections (its dict, its rounding, its attribute
 * reads, for each connection); here it reads the struct sequence's items directly.
 *
 * The dict is flows.counters()'s to the byte: the same keys in the same order, the same
 * int objects for the counts, and times rounded as round(x, 3) rounds them. round() writes
 * x to three decimals with Python's correctly rounded dtoa (mode 3) and reads that back;
 * PyOS_double_to_string(x, 'f', 3) writes the same digits with the same dtoa, and
 * PyOS_string_to_double reads them back with the same strtod: the same float, at half
 * the cost of calling float.__round__ (tests/test_capture_fast.py compares the two on
 * random and edge values).
 */
#include "fast.h"

/* ConnState's and HalfState's items, in flows.c's field order */
enum { C_OPENED = 7, C_SYNACK_N = 9, C_HS_ACK_TS = 10, C_FIRST_TS = 5, C_LAST_TS = 6,
       C_HALVES = 12 };
enum { H_SEGS = 0, H_RSTS = 8, H_SYNS = 9, H_RTT_N = 11, H_RTT_SUM = 12, H_RTT_MIN = 13,
       H_RTT_MAX = 14, H_FIRST_DATA = 15, H_LAST_DATA = 16, H_SYN_TS = 17 };
/* a direction's counts, as flows._COUNTS reads them: segs ... rsts, then rtt_n */
static const int COUNTS[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, H_RTT_N};
#define NCOUNTS 10

/* the counters' names: a direction's counts, then its RTTs */
static const char *const OUT_NAMES[] = {
    "OutSegs", "SendBytes", "RetransSegs", "RetransBytes", "OutOfOrder", "DupAcks",
    "NetDups", "ZeroWindows", "OutRsts", "RttSamples", "RttMin", "RttAvg", "RttMax"};
static const char *const IN_NAMES[] = {
    "InSegs", "RecvBytes", "InRetransSegs", "InRetransBytes", "InOutOfOrder", "InDupAcks",
    "InNetDups", "InZeroWindows", "InRsts", "InRttSamples", "InRttMin", "InRttAvg",
    "InRttMax"};
enum { OPENS, PASSIVE, FAILS, HANDSHAKE, FIRST_BYTE, TRANSFER, DURATION, NCONN };
static const char *const CONN_NAMES[] = {
    "ActiveOpens", "PassiveOpens", "AttemptFails", "HandshakeRtt", "FirstByte",
    "TransferTime", "Duration"};

static PyObject *out_keys[13], *in_keys[13], *conn_keys[NCONN], *one;

int counters_init(void)
{
    for (int i = 0; i < 13; i++)
        if (!(out_keys[i] = PyUnicode_InternFromString(OUT_NAMES[i]))
                || !(in_keys[i] = PyUnicode_InternFromString(IN_NAMES[i])))
            return -1;
    for (int i = 0; i < NCONN; i++)
        if (!(conn_keys[i] = PyUnicode_InternFromString(CONN_NAMES[i])))
            return -1;
    one = PyLong_FromLong(1);
    return one ? 0 : -1;
}

/* d[key] = value, stealing value; -1 on error (value NULL included) */
static int put(PyObject *d, PyObject *key, PyObject *value)
{
    if (!value)
        return -1;
    int r = PyDict_SetItem(d, key, value);
    Py_DECREF(value);
    return r;
}

/* flows.py's _ms: round(seconds * 1000.0, 3) */
static PyObject *ms(double seconds)
{
    char *s = PyOS_double_to_string(seconds * 1000.0, 'f', 3, 0, NULL);
    if (!s)
        return NULL;
    double r = PyOS_string_to_double(s, NULL, NULL);
    PyMem_Free(s);
    return r == -1.0 && PyErr_Occurred() ? NULL : PyFloat_FromDouble(r);
}

static int is_none(PyObject *seq, int i)
{
    return PyStructSequence_GET_ITEM(seq, i) == Py_None;
}

static double num(PyObject *seq, int i)       /* an int or float item, as Python mixes them */
{
    return PyFloat_AsDouble(PyStructSequence_GET_ITEM(seq, i));
}

static int truthy(PyObject *seq, int i)
{
    return PyObject_IsTrue(PyStructSequence_GET_ITEM(seq, i));
}

/* a direction's counts (the non-zero ones) and, with samples, its RTTs */
static int half_counters(PyObject *d, PyObject *h, PyObject **keys)
{
    for (int i = 0; i < NCOUNTS; i++) {
        PyObject *v = PyStructSequence_GET_ITEM(h, COUNTS[i]);
        int nonzero = PyObject_IsTrue(v);
        if (nonzero < 0 || (nonzero && PyDict_SetItem(d, keys[i], v) < 0))
            return -1;
    }
    double n = num(h, H_RTT_N);
    if (n == 0.0)
        return 0;
    if (put(d, keys[10], ms(num(h, H_RTT_MIN))) < 0
            || put(d, keys[11], ms(num(h, H_RTT_SUM) / n)) < 0
            || put(d, keys[12], ms(num(h, H_RTT_MAX))) < 0)
        return -1;
    return 0;
}

/* HandshakeRtt, FirstByte, TransferTime and Duration */
static int times(PyObject *d, PyObject *c, PyObject *out, PyObject *in)
{
    long long synack_n = PyLong_AsLongLong(PyStructSequence_GET_ITEM(c, C_SYNACK_N));
    long long syns = PyLong_AsLongLong(PyStructSequence_GET_ITEM(out, H_SYNS));
    if (syns == 1 && synack_n == 1 && !is_none(c, C_HS_ACK_TS) && !is_none(out, H_SYN_TS)
            && put(d, conn_keys[HANDSHAKE], ms(num(c, C_HS_ACK_TS) - num(out, H_SYN_TS))) < 0)
        return -1;
    int has_out = !is_none(out, H_FIRST_DATA), has_in = !is_none(in, H_FIRST_DATA);
    double of = has_out ? num(out, H_FIRST_DATA) : 0, inf = has_in ? num(in, H_FIRST_DATA) : 0;
    if (has_out && has_in && inf >= of               /* the first response byte after ... */
            && put(d, conn_keys[FIRST_BYTE], ms(inf - of)) < 0)
        return -1;
    if (has_out || has_in) {                         /* the last data byte, the first one */
        double last = has_out ? num(out, H_LAST_DATA) : num(in, H_LAST_DATA);
        double first = has_out ? of : inf;
        if (has_out && has_in) {
            double il = num(in, H_LAST_DATA);
            last = il > last ? il : last;
            first = inf < first ? inf : first;
        }
        if (put(d, conn_keys[TRANSFER], ms(last - first)) < 0)
            return -1;
    }
    return put(d, conn_keys[DURATION], ms(num(c, C_LAST_TS) - num(c, C_FIRST_TS)));
}

/* the opens, then the times */
static int conn_counters(PyObject *d, PyObject *c, PyObject *out, PyObject *in)
{
    int opened = truthy(c, C_OPENED), synack = truthy(c, C_SYNACK_N);
    if (opened < 0 || synack < 0)
        return -1;
    if (opened && PyDict_SetItem(d, conn_keys[OPENS], one) < 0)
        return -1;
    if (synack && PyDict_SetItem(d, conn_keys[PASSIVE], one) < 0)
        return -1;
    if (opened && !synack) {
        int same = PyObject_RichCompareBool(PyStructSequence_GET_ITEM(in, H_SEGS),
                                            PyStructSequence_GET_ITEM(in, H_RSTS), Py_EQ);
        if (same < 0 || (same && PyDict_SetItem(d, conn_keys[FAILS], one) < 0))
            return -1;
    }
    return times(d, c, out, in);
}

PyObject *counters(PyObject *Py_UNUSED(module), PyObject *c)
{
    if (Py_TYPE(c) != ConnStateType)
        return PyErr_Format(PyExc_TypeError, "counters() takes a ConnState");
    PyObject *halves = PyStructSequence_GET_ITEM(c, C_HALVES);
    PyObject *out = PyTuple_GET_ITEM(halves, 0), *in = PyTuple_GET_ITEM(halves, 1);
    PyObject *d = PyDict_New();
    if (!d || half_counters(d, out, out_keys) < 0 || half_counters(d, in, in_keys) < 0
            || conn_counters(d, c, out, in) < 0 || PyErr_Occurred()) {
        Py_XDECREF(d);
        return NULL;
    }
    return d;
}
