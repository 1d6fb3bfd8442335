/* tcpipstat._records: the compiled reader of socket (R) records (tcpipstat/records.py).
 *
 * Socket records are nearly every line of a run. records.Parser stays the reference and
 * reads everything else: this code reads only a well-formed R line made of plain ASCII
 * tokens, and for anything else (another kind of line, a field Python's int() would read
 * with a sign, spaces, underscores or a 0x prefix, a number too large for 64 bits, an
 * escaped COMM, a counter name not yet known valid, any error) it returns None, so that
 * the Python parser reads the line again from the start and gives its record or its
 * RecordParseError. What it accepts, it reads to the same values as Python would
 * (tests/test_records_fast.py compares the two on every recording and on bad lines).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* SocketRecord's fields in the order of its constructor's arguments; records.py checks
 * that they are the dataclass's (a build from other sources is not used) */
static const char *const RECORD_FIELDS[] = {
    "reason", "tuple", "pid", "comm", "counters", "in_tree", "cgroup", "netns"};
#define NFIELDS 8

/* where the fixed fields are in the line split at tabs (RecordSpec.at, given by Python) */
enum { AT_REASON, AT_FAMILY, AT_PID, AT_COMM, AT_FLAGS, AT_CGROUP, AT_NETNS, NAT };
#define MAX_WIDTH 64
#define AF_INET 2
#define AF_INET6 10

/* Counter names seen valid, by their bytes: each name's str is made once, not once a
 * record (the set of valid names only grows during one header's life, and a SocketLines
 * lives as long as one header) */
#define CACHE_SLOTS 1024            /* a power of two */
#define CACHE_MAX 512               /* entries kept at most: half the slots */
#define NAME_MAX_LEN 64
typedef struct {
    PyObject *name;                 /* NULL: an empty slot */
    uint64_t hash;
} Slot;

typedef struct {
    PyObject_HEAD
    PyTypeObject *record_type;      /* records.SocketRecord */
    PyTypeObject *tuple_type;       /* records.Tuple */
    PyObject *reasons;              /* REASONS: a tuple of str */
    PyObject *valid;                /* the Parser's set of valid counter names */
    Py_ssize_t width;               /* fields before the counters, the letter included */
    Py_ssize_t at[NAT];
    Py_ssize_t cached;
    Slot cache[CACHE_SLOTS];
} SocketLines;

static PyObject *field_names[NFIELDS];     /* interned */
static PyObject *empty_args;

typedef struct { const char *p; Py_ssize_t n; } Tok;

/* Digits only, the value below 2^64 (what int() reads without doubt). */
static int dec_u64(Tok t, uint64_t *out)
{
    uint64_t v = 0;
    if (t.n == 0)
        return 0;
    for (Py_ssize_t i = 0; i < t.n; i++) {
        unsigned d = (unsigned char)t.p[i] - '0';
        if (d > 9 || v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* An optional '-', then digits, the value's magnitude at most INT64_MAX. */
static int dec_i64(Tok t, int64_t *out)
{
    int neg = t.n > 0 && t.p[0] == '-';
    Tok digits = {t.p + neg, t.n - neg};
    uint64_t v;
    if (!dec_u64(digits, &v) || v > INT64_MAX)
        return 0;
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 1;
}

/* Hex digits only, the value below 2^64. */
static int hex_u64(Tok t, uint64_t *out)
{
    uint64_t v = 0;
    if (t.n == 0)
        return 0;
    for (Py_ssize_t i = 0; i < t.n; i++) {
        unsigned c = (unsigned char)t.p[i], d;
        if (c - '0' <= 9)
            d = c - '0';
        else if ((c | 0x20) - 'a' <= 5)
            d = (c | 0x20) - 'a' + 10;
        else
            return 0;
        if (v >> 60)
            return 0;
        v = v << 4 | d;
    }
    *out = v;
    return 1;
}

static int same_text(PyObject *s, Tok t)
{
    return PyUnicode_GET_LENGTH(s) == t.n && memcmp(PyUnicode_DATA(s), t.p, t.n) == 0;
}

/* A new reference to the str of a counter name if it is valid; NULL with no error set if
 * it is not (or not known to be yet: Python decides), NULL with an error set on failure. */
static PyObject *valid_name(SocketLines *self, Tok t)
{
    uint64_t h = 14695981039346656037ULL;          /* FNV-1a */
    for (Py_ssize_t k = 0; k < t.n; k++)
        h = (h ^ (unsigned char)t.p[k]) * 1099511628211ULL;
    size_t i = h & (CACHE_SLOTS - 1);
    for (; self->cache[i].name; i = (i + 1) & (CACHE_SLOTS - 1))
        if (self->cache[i].hash == h && same_text(self->cache[i].name, t))
            return Py_NewRef(self->cache[i].name);
    PyObject *name = PyUnicode_FromStringAndSize(t.p, t.n);
    if (!name)
        return NULL;
    int ok = PySet_Contains(self->valid, name);
    if (ok <= 0) {
        Py_DECREF(name);
        return NULL;
    }
    if (self->cached < CACHE_MAX && t.n <= NAME_MAX_LEN) {
        self->cache[i].name = Py_NewRef(name);
        self->cache[i].hash = h;
        self->cached++;
    }
    return name;
}

/* The line's first ``width`` fields (the letter included) into f; *rest: the first
 * NAME=VALUE field, NULL if none follows. 0 if the line has fewer fields. */
static int split_fixed(const char *p, const char *end, Py_ssize_t width, Tok *f,
                       const char **rest)
{
    for (Py_ssize_t i = 0; i < width; i++) {
        const char *tab = memchr(p, '\t', end - p);
        f[i].p = p;
        f[i].n = (tab ? tab : end) - p;
        if (!tab) {
            *rest = NULL;
            return i == width - 1;
        }
        p = tab + 1;
    }
    *rest = p;
    return 1;
}

/* The fixed fields' values, as records.Parser reads them */
typedef struct {
    PyObject *reason;               /* borrowed from REASONS */
    int64_t family, lport, rport, pid, flags;
    uint64_t lhi, llo, rhi, rlo, cgroup, netns;
} Fixed;

/* 1: every fixed field read; 0: one is not plain or not valid (Python reads the line). */
static int read_fixed(SocketLines *self, const Tok *f, Fixed *x)
{
    const Py_ssize_t *at = self->at, t = at[AT_FAMILY];
    x->reason = NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->reasons); i++)
        if (same_text(PyTuple_GET_ITEM(self->reasons, i), f[at[AT_REASON]]))
            x->reason = PyTuple_GET_ITEM(self->reasons, i);
    if (!x->reason || !dec_i64(f[t], &x->family)
            || (x->family != AF_INET && x->family != AF_INET6))
        return 0;
    if (!hex_u64(f[t + 1], &x->lhi) || !hex_u64(f[t + 2], &x->llo)
            || !dec_i64(f[t + 3], &x->lport) || !hex_u64(f[t + 4], &x->rhi)
            || !hex_u64(f[t + 5], &x->rlo) || !dec_i64(f[t + 6], &x->rport))
        return 0;
    if (x->lport < 0 || x->lport > 65535 || x->rport < 0 || x->rport > 65535)
        return 0;
    const Tok comm = f[at[AT_COMM]];
    if (!dec_i64(f[at[AT_PID]], &x->pid) || memchr(comm.p, '\\', comm.n))
        return 0;                   /* (an escaped COMM: records.unescape_comm's) */
    x->flags = 0;
    x->cgroup = x->netns = 0;
    if (self->width > at[AT_FLAGS] && !dec_i64(f[at[AT_FLAGS]], &x->flags))
        return 0;
    if (self->width > at[AT_NETNS] && (!dec_u64(f[at[AT_CGROUP]], &x->cgroup)
                                       || !dec_u64(f[at[AT_NETNS]], &x->netns)))
        return 0;
    return 1;
}

/* The NAME=VALUE fields from p (NULL: none) to end into counters: 1, 0 (one is not
 * plain or its name not known valid: Python reads the line), -1 on failure. */
static int read_counters(SocketLines *self, const char *p, const char *end,
                         PyObject *counters)
{
    while (p) {
        const char *tab = memchr(p, '\t', end - p), *stop = tab ? tab : end;
        const char *eq = memchr(p, '=', stop - p);
        int64_t v;
        if (!eq || !dec_i64((Tok){eq + 1, stop - eq - 1}, &v))
            return 0;
        PyObject *name = valid_name(self, (Tok){p, eq - p});
        if (!name)
            return PyErr_Occurred() ? -1 : 0;
        PyObject *num = PyLong_FromLongLong(v);
        int rc = num ? PyDict_SetItem(counters, name, num) : -1;
        Py_DECREF(name);
        Py_XDECREF(num);
        if (rc < 0)
            return -1;
        p = tab ? tab + 1 : NULL;
    }
    return 1;
}

/* (hi << 64) | lo, as records.Parser._tuple makes an address */
static PyObject *address(uint64_t hi, uint64_t lo)
{
    if (!hi)
        return PyLong_FromUnsignedLongLong(lo);
    PyObject *h = PyLong_FromUnsignedLongLong(hi), *l = PyLong_FromUnsignedLongLong(lo);
    PyObject *bits = PyLong_FromLong(64), *shifted = NULL, *out = NULL;
    if (h && l && bits && (shifted = PyNumber_Lshift(h, bits)))
        out = PyNumber_Or(shifted, l);
    Py_XDECREF(h);
    Py_XDECREF(l);
    Py_XDECREF(bits);
    Py_XDECREF(shifted);
    return out;
}

/* A records.Tuple, made as tuple.__new__(Tuple, ...) makes it */
static PyObject *make_tuple(SocketLines *self, const Fixed *x)
{
    PyObject *items[5] = {PyLong_FromLongLong(x->family), address(x->lhi, x->llo),
                          PyLong_FromLongLong(x->lport), address(x->rhi, x->rlo),
                          PyLong_FromLongLong(x->rport)};
    PyObject *t = NULL;
    if (items[0] && items[1] && items[2] && items[3] && items[4])
        t = self->tuple_type->tp_alloc(self->tuple_type, 5);
    for (int i = 0; i < 5; i++) {
        if (t)
            PyTuple_SET_ITEM(t, i, items[i]);       /* (steals the reference) */
        else
            Py_XDECREF(items[i]);
    }
    return t;
}

/* A records.SocketRecord with these fields (in RECORD_FIELDS' order): what its frozen
 * dataclass __init__ does, object.__setattr__ of each field, without the Python call. */
static PyObject *make_record(SocketLines *self, PyObject *const *values)
{
    PyObject *rec = self->record_type->tp_new(self->record_type, empty_args, NULL);
    for (int i = 0; rec && i < NFIELDS; i++)
        if (PyObject_GenericSetAttr(rec, field_names[i], values[i]) < 0)
            Py_CLEAR(rec);
    return rec;
}

static PyObject *build(SocketLines *self, const Tok *f, const Fixed *x, PyObject *counters)
{
    PyObject *values[NFIELDS] = {
        Py_NewRef(x->reason), make_tuple(self, x), PyLong_FromLongLong(x->pid),
        PyUnicode_FromStringAndSize(f[self->at[AT_COMM]].p, f[self->at[AT_COMM]].n),
        Py_NewRef(counters), PyBool_FromLong(x->flags & 1),
        PyLong_FromUnsignedLongLong(x->cgroup), PyLong_FromUnsignedLongLong(x->netns)};
    PyObject *rec = NULL;
    int ok = 1;
    for (int i = 0; i < NFIELDS; i++)
        ok &= values[i] != NULL;
    if (ok)
        rec = make_record(self, values);
    for (int i = 0; i < NFIELDS; i++)
        Py_XDECREF(values[i]);
    return rec;
}

PyDoc_STRVAR(parse_doc,
"parse(line) -> SocketRecord, or None: not a plain well-formed socket record (records.Parser\n"
"reads it then).");

static PyObject *SocketLines_parse(SocketLines *self, PyObject *line)
{
    if (!PyUnicode_Check(line))
        Py_RETURN_NONE;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(line) < 0)
        return NULL;
#endif
    if (!PyUnicode_IS_ASCII(line))
        Py_RETURN_NONE;
    const char *p = PyUnicode_DATA(line), *end = p + PyUnicode_GET_LENGTH(line), *rest;
    while (end > p && end[-1] == '\n')      /* line.rstrip("\n") */
        end--;
    Tok f[MAX_WIDTH];
    Fixed x;
    if (end - p < 2 || p[0] != 'R' || p[1] != '\t'
            || !split_fixed(p, end, self->width, f, &rest) || !read_fixed(self, f, &x))
        Py_RETURN_NONE;
    PyObject *counters = PyDict_New(), *rec = NULL;
    if (!counters)
        return NULL;
    int got = read_counters(self, rest, end, counters);
    if (got > 0)
        rec = build(self, f, &x, counters);
    else if (got == 0)
        rec = Py_NewRef(Py_None);
    Py_DECREF(counters);
    return rec;
}

/* Every argument checked here, so that parse() can index and cast without checks. */
static int check_args(PyTypeObject *rec, PyTypeObject *tup, PyObject *reasons,
                      Py_ssize_t width, const Py_ssize_t *at)
{
    if (rec->tp_new != PyBaseObject_Type.tp_new || !PyType_IsSubtype(tup, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "expected SocketRecord (a dataclass) and Tuple");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(reasons); i++) {
        PyObject *r = PyTuple_GET_ITEM(reasons, i);
        if (!PyUnicode_CheckExact(r) || !PyUnicode_IS_ASCII(r)) {
            PyErr_SetString(PyExc_TypeError, "reasons must be ASCII str");
            return -1;
        }
    }
    /* the mandatory fields lie within width (FAMILY: and the tuple's 6 after it); CGROUP
     * is there when NETNS is (read_fixed reads both when the width reaches NETNS) */
    int ok = width > 0 && width <= MAX_WIDTH && at[AT_FAMILY] + 6 < width
             && at[AT_CGROUP] < at[AT_NETNS];
    for (int i = 0; i < NAT; i++)
        ok &= at[i] > 0 && at[i] < MAX_WIDTH
              && (i >= AT_FLAGS || at[i] < width);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "field positions out of the record's width");
        return -1;
    }
    return 0;
}

static int SocketLines_init(SocketLines *self, PyObject *args, PyObject *kwds)
{
    PyTypeObject *rec, *tup;
    PyObject *reasons, *valid;
    Py_ssize_t width, at[NAT];
    if (kwds && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "SocketLines takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!O!O!O!n(nnnnnnn):SocketLines", &PyType_Type, &rec,
                          &PyType_Type, &tup, &PyTuple_Type, &reasons, &PySet_Type, &valid,
                          &width, &at[0], &at[1], &at[2], &at[3], &at[4], &at[5], &at[6])
            || check_args(rec, tup, reasons, width, at) < 0)
        return -1;
    Py_XSETREF(self->record_type, (PyTypeObject *)Py_NewRef(rec));
    Py_XSETREF(self->tuple_type, (PyTypeObject *)Py_NewRef(tup));
    Py_XSETREF(self->reasons, Py_NewRef(reasons));
    Py_XSETREF(self->valid, Py_NewRef(valid));
    for (size_t i = 0; i < CACHE_SLOTS; i++)
        Py_CLEAR(self->cache[i].name);
    self->cached = 0;
    self->width = width;
    memcpy(self->at, at, sizeof at);
    return 0;
}

static void SocketLines_dealloc(SocketLines *self)
{
    Py_XDECREF(self->record_type);
    Py_XDECREF(self->tuple_type);
    Py_XDECREF(self->reasons);
    Py_XDECREF(self->valid);
    for (size_t i = 0; i < CACHE_SLOTS; i++)
        Py_XDECREF(self->cache[i].name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef SocketLines_methods[] = {
    {"parse", (PyCFunction)SocketLines_parse, METH_O, parse_doc},
    {NULL, NULL, 0, NULL}
};

PyDoc_STRVAR(SocketLines_doc,
"SocketLines(SocketRecord, Tuple, REASONS, valid, width, (REASON, FAMILY, PID, COMM, FLAGS,\n"
"CGROUP, NETNS)): reads the socket records of one header's format; ``valid``: the Parser's\n"
"set of valid counter names (read as it grows), width: fields before the counters, then\n"
"the fields' positions (RecordSpec.at).");

static PyTypeObject SocketLinesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tcpipstat._records.SocketLines",
    .tp_basicsize = sizeof(SocketLines),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = SocketLines_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SocketLines_init,
    .tp_dealloc = (destructor)SocketLines_dealloc,
    .tp_methods = SocketLines_methods,
};

static struct PyModuleDef records_module = {
    PyModuleDef_HEAD_INIT, "_records",
    "The compiled reader of socket records (tcpipstat/records.py is the reference).",
    -1, NULL, NULL, NULL, NULL, NULL
};

PyMODINIT_FUNC PyInit__records(void)
{
    PyObject *fields = PyTuple_New(NFIELDS), *m = NULL;
    if (!fields)
        return NULL;
    for (int i = 0; i < NFIELDS; i++) {
        if (!field_names[i] && !(field_names[i] = PyUnicode_InternFromString(RECORD_FIELDS[i])))
            goto done;
        PyTuple_SET_ITEM(fields, i, Py_NewRef(field_names[i]));
    }
    if ((!empty_args && !(empty_args = PyTuple_New(0))) || PyType_Ready(&SocketLinesType) < 0)
        goto done;
    m = PyModule_Create(&records_module);
    if (m && (PyModule_AddObjectRef(m, "FIELDS", fields) < 0
              || PyModule_AddObjectRef(m, "SocketLines", (PyObject *)&SocketLinesType) < 0))
        Py_CLEAR(m);
done:
    Py_DECREF(fields);
    return m;
}
