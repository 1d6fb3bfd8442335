/* tcpipstat.capture._fast.Engine: a capture's records, read in large blocks from the
 * file, decoded and fed to the flow table, with no Python object per packet (what made
 * the Python path slow: dpkt builds three objects per packet, and the flow table's
 * Python code runs for each).
 *
 * It reads what tcpipstat/capture/reader.py reads, in the same order and with the same
 * checks, and stops where reader.py stops, with the same code for its message
 * (reader.STOPPED). Two kinds of pcapng blocks it hands back to Python, which reads them
 * with reader.py's own functions: a section header (the byte order, and the first one
 * says whether the file is pcapng at all) and an interface description (link type and
 * time stamp units, from options dpkt parses): both are rare, and their rules are long.
 * Frames decode.c cannot decode go to packets.py (the "fallback"), one call each.
 *
 * tcpipstat/capture/fast.py drives it; see there for the calls in order.
 */
#include "fast.h"

#include <structmember.h>
#include <string.h>

#define CHUNK (1 << 20)                 /* bytes asked of the file at a time */
#define SIGNAL_EVERY 4096               /* frames between two looks for Ctrl-C */
#define PCAPNG_SHB 0x0A0D0D0Au
#define PCAPNG_IDB 1u
#define PCAPNG_SPB 3u
#define PCAPNG_EPB 6u

typedef struct { double tps; int64_t off; int linktype; uint32_t snaplen; } Iface;

typedef struct {
    PyObject_HEAD
    PyObject *read;                     /* the file's read1 */
    PyObject *fallback;                 /* (link type, frame) -> segment tuple or None */
    PyObject *progress;                 /* progress(frames), or None */
    PyObject *unknown_link;             /* {link type: frames skipped} (pcapng) */
    long long every, max_record;
    uint8_t *buf;                       /* read, not yet used: buf[pos .. len) */
    Py_ssize_t pos, len, cap;
    int eof, done, pcapng, little;
    int rec_len, linktype;              /* pcap: record header length, the link type */
    uint32_t snaplen;                   /* pcap: the snapshot length (0: none said) */
    double ticks;                       /* pcap: sub-second units per second */
    Iface *ifaces;                      /* pcapng: the section's interfaces */
    int32_t nifaces, capifaces, sections;
    int *linktypes, nlinktypes;         /* the link types tcpipstat reads */
    long long frames, cut, seen, tcp, other, malformed;
    double first_ts, last_ts;
    int has_ts;
    const char *stop;                   /* why reading stopped: a reader.STOPPED key */
    long long stop_args[3];
    int nstop_args;
    Flows flows;
} Engine;

static uint32_t rd32(const Engine *e, const uint8_t *p)
{
    if (e->little)
        return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int stopped(Engine *e, const char *code, int nargs, long long a, long long b,
                   long long c)
{
    e->stop = code;
    e->nstop_args = nargs;
    e->stop_args[0] = a;
    e->stop_args[1] = b;
    e->stop_args[2] = c;
    return 0;
}

static Py_ssize_t avail(const Engine *e) { return e->len - e->pos; }

/* At least n bytes at buf + pos, unless the file ends first (then what it holds). */
static int want(Engine *e, Py_ssize_t n)
{
    while (avail(e) < n && !e->eof) {
        if (e->pos) {                       /* (keep what is left at the front) */
            memmove(e->buf, e->buf + e->pos, (size_t)avail(e));
            e->len -= e->pos;
            e->pos = 0;
        }
        PyObject *b = PyObject_CallFunction(e->read, "n", (Py_ssize_t)CHUNK);
        if (!b)
            return -1;
        if (!PyBytes_Check(b)) {
            Py_DECREF(b);
            PyErr_SetString(PyExc_TypeError, "read1() must return bytes");
            return -1;
        }
        Py_ssize_t got = PyBytes_GET_SIZE(b);
        if (!got)
            e->eof = 1;
        if (got && e->len + got > e->cap) {
            uint8_t *p = xrealloc(e->buf, (size_t)(e->len + got));
            if (!p) {
                Py_DECREF(b);
                return -1;
            }
            e->buf = p;
            e->cap = e->len + got;
        }
        if (got) {
            memcpy(e->buf + e->len, PyBytes_AS_STRING(b), (size_t)got);
            e->len += got;
        }
        Py_DECREF(b);
    }
    return 0;
}

/* Its frame as packets.py would give it: 1 a segment, 0 none, -1 a Python error. An
 * exception (not Ctrl-C) is a malformed frame, as analyse() counts it in Python. */
static int fallback(Engine *e, int linktype, const uint8_t *p, Py_ssize_t n, Seg *s)
{
    PyObject *r = PyObject_CallFunction(e->fallback, "iy#", linktype, (const char *)p, n);
    if (!r) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_Clear();
        e->malformed++;
        return 0;
    }
    if (r == Py_None) {
        Py_DECREF(r);
        return 0;
    }
    const char *src, *dst;
    Py_ssize_t ns, nd;
    int family, sport, dport, flags, win, ipid;
    unsigned long seq, ack, plen;
    int ok = PyArg_ParseTuple(r, "iy#iy#ikkiiki", &family, &src, &ns, &sport, &dst, &nd,
                              &dport, &seq, &ack, &flags, &win, &plen, &ipid);
    if (ok && (ns != nd || (ns != 4 && ns != 16) || plen > UINT32_MAX)) {
        PyErr_SetString(PyExc_ValueError, "the fallback returned an impossible segment");
        ok = 0;
    }
    if (ok) {                               /* (the addresses' unused bytes zero) */
        *s = (Seg){.family = (uint8_t)family, .alen = (uint8_t)ns, .sport = (uint16_t)sport,
                   .dport = (uint16_t)dport, .seq = (uint32_t)seq, .ack = (uint32_t)ack,
                   .flags = (uint16_t)flags, .win = (uint16_t)win, .plen = (uint32_t)plen,
                   .ipid = (uint16_t)ipid};
        memcpy(s->src, src, (size_t)ns);
        memcpy(s->dst, dst, (size_t)ns);
    }
    Py_DECREF(r);
    return ok ? 1 : -1;
}

/* analyse()'s loop body: one frame of a link type tcpipstat reads */
static int frame(Engine *e, double ts, int linktype, const uint8_t *p, Py_ssize_t n)
{
    e->seen++;
    if (e->progress != Py_None && e->seen % e->every == 0) {
        PyObject *r = PyObject_CallFunction(e->progress, "L", e->seen);
        if (!r)
            return -1;
        Py_DECREF(r);
    }
    if (e->seen % SIGNAL_EVERY == 0 && PyErr_CheckSignals() < 0)
        return -1;
    if (!e->has_ts) {
        e->first_ts = ts;
        e->has_ts = 1;
    }
    e->last_ts = ts;
    Seg s;
    int r = fast_decode(linktype, p, n, &s);
    if (r == 0) {
        e->other++;
        return 0;
    }
    if (r > 0)
        e->tcp++;
    else if ((r = fallback(e, linktype, p, n, &s)) <= 0)
        return r;
    return flows_add(&e->flows, ts, &s);
}

/* A record's frame: counted, then analysed unless of a link type tcpipstat does not read
 * (possible in pcapng, whose interfaces each have their own). */
static int packet(Engine *e, double ts, int linktype, const uint8_t *p, Py_ssize_t caplen,
                  uint32_t wirelen)
{
    e->frames++;
    int known = 0;
    for (int i = 0; i < e->nlinktypes && !known; i++)
        known = e->linktypes[i] == linktype;
    if (!known) {
        PyObject *k = PyLong_FromLong(linktype);
        PyObject *n = k ? PyDict_GetItemWithError(e->unknown_link, k) : NULL;
        PyObject *v = k && !PyErr_Occurred() ? PyLong_FromLong(n ? PyLong_AsLong(n) + 1 : 1)
                                             : NULL;
        int r = v ? PyDict_SetItem(e->unknown_link, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        return r < 0 ? -1 : 1;
    }
    if (caplen < wirelen)
        e->cut++;
    return frame(e, ts, linktype, p, caplen) < 0 ? -1 : 1;
}

/* One pcap record: 1 go on, 0 the end (of the file, or stopped: e->stop says), -1 error */
static int pcap_record(Engine *e)
{
    Py_ssize_t hl = e->rec_len;
    if (want(e, hl) < 0)
        return -1;
    if (avail(e) < hl)
        return avail(e) ? stopped(e, "record-header-cut", 1, e->frames + 1, 0, 0) : 0;
    const uint8_t *h = e->buf + e->pos;
    uint32_t sec = rd32(e, h), sub = rd32(e, h + 4), caplen = rd32(e, h + 8);
    uint32_t wirelen = rd32(e, h + 12);
    if (caplen > e->max_record)
        return stopped(e, "impossible-caplen", 2, e->frames + 1, caplen, 0);
    if (e->snaplen && caplen > e->snaplen)
        return stopped(e, "over-snaplen", 3, e->frames + 1, caplen, e->snaplen);
    if (want(e, hl + caplen) < 0)
        return -1;
    if (avail(e) < hl + (Py_ssize_t)caplen)
        return stopped(e, "packet-cut", 3, e->frames + 1, avail(e) - hl, caplen);
    const uint8_t *data = e->buf + e->pos + hl;
    e->pos += hl + caplen;
    return packet(e, (double)sec + (double)sub / e->ticks, e->linktype, data, caplen,
                  wirelen);
}

static int packet_block(Engine *e, const uint8_t *b, Py_ssize_t n)
{
    if (n < 24)
        return stopped(e, "corrupt-packet-block", 1, e->frames, 0, 0);
    uint32_t iid = rd32(e, b), hi = rd32(e, b + 4), lo = rd32(e, b + 8);
    uint32_t caplen = rd32(e, b + 12), wirelen = rd32(e, b + 16);
    if (iid >= (uint32_t)e->nifaces || caplen > n - 24)
        return stopped(e, "bad-interface", 2, e->frames + 1, iid, 0);
    const Iface *f = &e->ifaces[iid];
    if (f->snaplen && caplen > f->snaplen)
        return stopped(e, "over-snaplen", 3, e->frames + 1, caplen, f->snaplen);
    /* reader.py: off + ((hi << 32) | lo) / tps, each integer made a double first */
    double ts = (double)f->off + (double)((uint64_t)hi << 32 | lo) / f->tps;
    return packet(e, ts, f->linktype, b + 20, caplen, wirelen);
}

static int simple_block(Engine *e, const uint8_t *b, Py_ssize_t n)
{
    if (!e->nifaces || n < 4)
        return stopped(e, "corrupt-simple-block", 1, e->frames, 0, 0);
    uint32_t wirelen = rd32(e, b);
    Py_ssize_t caplen = wirelen < n - 4 ? (Py_ssize_t)wirelen : n - 4;
    return packet(e, 0.0, e->ifaces[0].linktype, b + 4, caplen, wirelen);
}

/* A block to hand back to Python: (kind, its bytes). */
static int hand_back(Engine *e, const char *kind, Py_ssize_t n, PyObject **event)
{
    *event = Py_BuildValue("(sy#)", kind, (const char *)(e->buf + e->pos), n);
    e->pos += n;
    return *event ? 1 : -1;
}

/* One pcapng block, as reader._pcapng reads it */
static int pcapng_block(Engine *e, PyObject **event)
{
    if (want(e, 8) < 0)
        return -1;
    if (avail(e) < 8)
        return avail(e) ? stopped(e, "block-header-cut", 0, 0, 0, 0) : 0;
    uint32_t btype = rd32(e, e->buf + e->pos);
    if (btype == PCAPNG_SHB)
        return hand_back(e, "section", 8, event);
    if (!e->sections)
        return hand_back(e, "not-capture", 8, event);
    uint32_t blen = rd32(e, e->buf + e->pos + 4);
    if (blen < 12 || blen > e->max_record || blen % 4)
        return stopped(e, "impossible-block", 2, e->frames, blen, 0);
    if (want(e, blen) < 0)
        return -1;
    if (avail(e) < (Py_ssize_t)blen)
        return stopped(e, "block-cut", 3, e->frames, avail(e), blen);
    if (btype == PCAPNG_IDB)
        return hand_back(e, "interface", blen, event);
    const uint8_t *body = e->buf + e->pos + 8;
    e->pos += blen;
    if (btype == PCAPNG_EPB)
        return packet_block(e, body, blen - 8);
    if (btype == PCAPNG_SPB)
        return simple_block(e, body, blen - 8);
    return 1;                               /* other blocks (statistics, names): no packets */
}

/* -- the Python type -------------------------------------------------------------- */

static PyObject *Engine_run(Engine *e, PyObject *Py_UNUSED(ignored))
{
    PyObject *event = NULL;
    int r = 1;
    while (!e->done && r == 1 && !event) {
        r = e->pcapng ? pcapng_block(e, &event) : pcap_record(e);
        if (r == 0)
            e->done = 1;
    }
    if (r < 0)
        return NULL;
    if (event)
        return event;
    Py_RETURN_NONE;
}

static PyObject *Engine_read(Engine *e, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0)
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_ValueError, "negative read");
    if (want(e, n) < 0)
        return NULL;
    if (n > avail(e))
        n = avail(e);
    PyObject *b = PyBytes_FromStringAndSize((const char *)(e->buf + e->pos), n);
    if (b)
        e->pos += n;
    return b;
}

static PyObject *Engine_new_section(Engine *e, PyObject *little)
{
    int v = PyObject_IsTrue(little);
    if (v < 0)
        return NULL;
    e->little = v;
    e->nifaces = 0;
    e->sections++;
    Py_RETURN_NONE;
}

static PyObject *Engine_add_interface(Engine *e, PyObject *args)
{
    Iface f;
    if (!PyArg_ParseTuple(args, "idLI", &f.linktype, &f.tps, &f.off, &f.snaplen))
        return NULL;
    int32_t cap = e->capifaces;
    if (e->nifaces == cap) {
        Iface *p = xrealloc(e->ifaces, (size_t)(cap ? cap * 2 : 4) * sizeof(Iface));
        if (!p)
            return NULL;
        e->ifaces = p;
        e->capifaces = cap ? cap * 2 : 4;
    }
    e->ifaces[e->nifaces++] = f;
    Py_RETURN_NONE;
}

static PyObject *Engine_connections(Engine *e, PyObject *Py_UNUSED(ignored))
{
    return flows_export(&e->flows);
}

static PyObject *Engine_get_stopped(Engine *e, void *Py_UNUSED(closure))
{
    if (!e->stop)
        Py_RETURN_NONE;
    PyObject *args = PyTuple_New(e->nstop_args);
    for (int i = 0; args && i < e->nstop_args; i++) {
        PyObject *v = PyLong_FromLongLong(e->stop_args[i]);
        if (!v) {
            Py_CLEAR(args);
            break;
        }
        PyTuple_SET_ITEM(args, i, v);
    }
    return args ? Py_BuildValue("(sN)", e->stop, args) : NULL;
}

static PyObject *Engine_get_times(Engine *e, void *Py_UNUSED(closure))
{
    if (!e->has_ts)
        return Py_BuildValue("(OO)", Py_None, Py_None);
    return Py_BuildValue("(dd)", e->first_ts, e->last_ts);
}

static PyObject *Engine_get_rejected(Engine *e, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(e->flows.rejected);
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kw)
{
    static char *names[] = {"read", "fallback", "accept", "progress", "every", "linktypes",
                            "max_pending", "max_holes", "max_record", "pcap", NULL};
    PyObject *read, *fallback, *accept, *progress, *linktypes, *pcap;
    int max_pending, max_holes;
    if (e->read) {
        PyErr_SetString(PyExc_RuntimeError, "an Engine is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOLO!iiLO", names, &read, &fallback,
                                     &accept, &progress, &e->every, &PyTuple_Type,
                                     &linktypes, &max_pending, &max_holes, &e->max_record,
                                     &pcap))
        return -1;
    if (e->every < 1 || max_pending < 2 || max_holes < 2) {
        PyErr_SetString(PyExc_ValueError, "every, max_pending and max_holes must be positive");
        return -1;
    }
    e->pcapng = pcap == Py_None;
    if (!e->pcapng && !PyArg_ParseTuple(pcap, "ipdiI", &e->rec_len, &e->little, &e->ticks,
                                        &e->linktype, &e->snaplen))
        return -1;
    e->nlinktypes = (int)PyTuple_GET_SIZE(linktypes);
    e->linktypes = xrealloc(NULL, (size_t)e->nlinktypes * sizeof(int));
    if (!e->linktypes)
        return -1;
    for (int i = 0; i < e->nlinktypes; i++)
        if ((e->linktypes[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(linktypes, i))) == -1
                && PyErr_Occurred())
            return -1;
    e->unknown_link = PyDict_New();
    if (!e->unknown_link || flows_init(&e->flows, accept, max_pending, max_holes) < 0)
        return -1;
    e->read = Py_NewRef(read);
    e->fallback = Py_NewRef(fallback);
    e->progress = Py_NewRef(progress);
    return 0;
}

static void Engine_dealloc(Engine *e)
{
    flows_free(&e->flows);
    xfree(e->buf);
    xfree(e->ifaces);
    xfree(e->linktypes);
    Py_XDECREF(e->read);
    Py_XDECREF(e->fallback);
    Py_XDECREF(e->progress);
    Py_XDECREF(e->unknown_link);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "Read on: None at the end (or where reading stopped: see stopped), or a pcapng block "
     "for Python, (\"section\" | \"not-capture\" | \"interface\", its bytes)."},
    {"read", (PyCFunction)Engine_read, METH_O, "The next n bytes of the file (fewer at its end)."},
    {"new_section", (PyCFunction)Engine_new_section, METH_O,
     "A new pcapng section, of this byte order (little: true): no interfaces yet."},
    {"add_interface", (PyCFunction)Engine_add_interface, METH_VARARGS,
     "The section's next interface: (link type, ticks per second, offset in seconds)."},
    {"connections", (PyCFunction)Engine_connections, METH_NOARGS,
     "Every connection, in FlowTable.connections()'s order, as a ConnState."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Engine_members[] = {
    {"frames", T_LONGLONG, offsetof(Engine, frames), READONLY, "packet records read"},
    {"cut", T_LONGLONG, offsetof(Engine, cut), READONLY, "frames cut by the snapshot length"},
    {"seen", T_LONGLONG, offsetof(Engine, seen), READONLY, "frames of a link type it reads"},
    {"tcp", T_LONGLONG, offsetof(Engine, tcp), READONLY, "TCP segments it decoded itself"},
    {"other", T_LONGLONG, offsetof(Engine, other), READONLY, "frames it found not TCP"},
    {"malformed", T_LONGLONG, offsetof(Engine, malformed), READONLY,
     "frames the fallback raised on"},
    {"unknown_link", T_OBJECT, offsetof(Engine, unknown_link), READONLY,
     "{link type: frames skipped}"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"stopped", (getter)Engine_get_stopped, NULL,
     "None, or why reading stopped early: (reader.STOPPED key, its numbers)", NULL},
    {"times", (getter)Engine_get_times, NULL, "(first, last) frame time stamps", NULL},
    {"rejected", (getter)Engine_get_rejected, NULL, "connections the filters refused", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tcpipstat.capture._fast.Engine",
    .tp_doc = "A capture file's packets -> per-connection state (see fast.py).",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_members = Engine_members,
    .tp_getset = Engine_getset,
};

static PyMethodDef module_methods[] = {
    {"counters", counters, METH_O,
     "flows.counters() of a ConnState: the counters the report shows of that connection."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fast_module = {
    PyModuleDef_HEAD_INIT, "_fast",
    "The compiled --read path: capture records -> per-connection state (fast.py drives it).",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fast(void)
{
    if (PyType_Ready(&EngineType) < 0 || flows_types_init() < 0 || counters_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fast_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0
            || PyModule_AddIntConstant(m, "RECENT_PACKETS", RECENT_PACKETS) < 0
            || PyModule_AddObjectRef(m, "ConnState", (PyObject *)ConnStateType) < 0
            || PyModule_AddObjectRef(m, "HalfState", (PyObject *)HalfStateType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
