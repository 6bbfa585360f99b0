/* mbquant.calibrate._count: torch.histc's float32 binning and the count, fused, one histogram per thread.
 *
 * count(x, out, lo, a, b, exact, bins, threads) adds to out[0..bins] (int64) the bin of every float32 value of
 * the buffer x, with torch.histc's CPU formula rounded at each step as the kernel rounds it:
 *
 *   exact != 0:  trunc((x - lo) / a)          a = width / bins, when bins is a power of two and a is normal: the
 *                                             same number as the kernel's (x - lo) * bins / width
 *   exact == 0:  trunc(((x - lo) * a) / b)    a = bins, b = width: the kernel's three steps
 *
 * out[bins] holds the values on the last edge (the caller adds them to the last bin). Returns the number of values
 * whose bin lies outside [0, bins] (a value outside the range, or not a number): the caller refuses the batch.
 *
 * Why native: torch's own ops need a float pass for each step, an integer conversion and torch.bincount, which is
 * serial; here each of torch's threads bins a cache-sized block (vectorised: IEEE division and truncation give the
 * same result at any vector width) and counts it at once into its own sub-histograms. Counting is order-free, so
 * the totals do not depend on the number of threads. The GIL is released while counting.
 *
 * Built with -ffp-contract=off: no fused multiply-add may merge the kernel's separately rounded steps.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 4          /* interleaved sub-histograms: a run of values in one bin (the zeros after a ReLU) would
                            otherwise make each add wait for the one before */
#define BLOCK 4096       /* values binned per step: 16 KB of float input, 16 KB of indices */
#define MIN_SHARE (1 << 16)   /* fewer values than this per thread are not worth a thread */
#define MAX_THREADS 64

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

typedef struct {
    const float *x;
    int64_t n;
    float lo, a, b;
    int exact, bins;
    int64_t *counts;     /* LANES * (bins + 1), zeroed */
    int64_t outside;
} share_t;

/* The bins of m values into idx; returns how many fell outside [0, bins] (their index is set to 0). */
VECTOR_CLONES
static int bin_block(const float *x, int m, float lo, float a, float b, int exact, int bins, int32_t *idx) {
    const float top = (float)bins + 1.0f;   /* exact for bins < 2 ** 24 */
    int outside = 0;
    if (exact) {
        for (int k = 0; k < m; k++) {
            float p = (x[k] - lo) / a;
            int ok = p >= 0.0f && p < top;   /* false for NaN: never cast a value that has no int32 */
            outside += !ok;
            idx[k] = ok ? (int32_t)p : 0;
        }
    } else {
        for (int k = 0; k < m; k++) {
            float p = (x[k] - lo) * a;
            p = p / b;
            int ok = p >= 0.0f && p < top;
            outside += !ok;
            idx[k] = ok ? (int32_t)p : 0;
        }
    }
    return outside;
}

static void count_share(share_t *s) {
    int32_t idx[BLOCK];
    const int64_t stride = (int64_t)s->bins + 1;
    int64_t *c0 = s->counts, *c1 = c0 + stride, *c2 = c1 + stride, *c3 = c2 + stride;
    for (int64_t start = 0; start < s->n; start += BLOCK) {
        int m = s->n - start < BLOCK ? (int)(s->n - start) : BLOCK;
        s->outside += bin_block(s->x + start, m, s->lo, s->a, s->b, s->exact, s->bins, idx);
        int k = 0;
        for (; k + LANES <= m; k += LANES) {
            c0[idx[k]]++;
            c1[idx[k + 1]]++;
            c2[idx[k + 2]]++;
            c3[idx[k + 3]]++;
        }
        for (; k < m; k++)
            c0[idx[k]]++;
    }
}

/* Returns the number of values outside the range, or -1 when memory for the sub-histograms ran out.
 *
 * The threads are an OpenMP team: torch's own (its CPU ops run on OpenMP, and the extension links libgomp.so.1 by
 * that name, so the dynamic loader hands it the copy torch loaded first). A second pool would compete with torch's
 * workers, which spin on their cores for a while after every op: with pthreads of its own this count ran at
 * 0.88 ns per value inside a calibration pass, against 0.3 ns alone. */
static int64_t count_all(const float *x, int64_t n, float lo, float a, float b, int exact, int bins, int threads,
                         int64_t *out) {
    const int64_t stride = (int64_t)bins + 1, size = LANES * stride;
    int64_t by_size = n / MIN_SHARE;
    if (threads > by_size) threads = (int)by_size;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    int64_t *counts = calloc((size_t)(threads * size), sizeof(int64_t));
    if (counts == NULL)
        return -1;
    share_t shares[MAX_THREADS];
    int team = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();   /* the team may be smaller than asked */
        int64_t per = (n + nt - 1) / nt, s = t * per < n ? t * per : n, e = s + per < n ? s + per : n;
        shares[t] = (share_t){x + s, e - s, lo, a, b, exact, bins, counts + t * size, 0};
        count_share(&shares[t]);
        if (t == 0)
            team = nt;
    }
    int64_t outside = 0;
    for (int t = 0; t < team; t++) {
        for (int64_t k = 0; k < size; k++)
            out[k % stride] += shares[t].counts[k];
        outside += shares[t].outside;
    }
    free(counts);
    return outside;
}

static PyObject *count(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, out;
    double lo, a, b;
    int exact, bins, threads;
    if (!PyArg_ParseTuple(args, "y*w*dddpii", &x, &out, &lo, &a, &b, &exact, &bins, &threads))
        return NULL;
    PyObject *result = NULL;
    if (bins < 1 || bins >= (1 << 24)) {   /* bins + 1 and every index exact in float32 */
        PyErr_Format(PyExc_ValueError, "bins must be in [1, %d), got %d", 1 << 24, bins);
    } else if (x.len % (Py_ssize_t)sizeof(float) != 0) {
        PyErr_Format(PyExc_ValueError, "x must hold float32 values, got %zd bytes", x.len);
    } else if (out.len != (Py_ssize_t)(((int64_t)bins + 1) * (int64_t)sizeof(int64_t))) {
        PyErr_Format(PyExc_ValueError, "out must hold bins + 1 = %d int64 counts, got %zd bytes", bins + 1, out.len);
    } else {
        int64_t outside;
        Py_BEGIN_ALLOW_THREADS
        outside = count_all((const float *)x.buf, (int64_t)(x.len / (Py_ssize_t)sizeof(float)), (float)lo, (float)a,
                            (float)b, exact, bins, threads, (int64_t *)out.buf);
        Py_END_ALLOW_THREADS
        result = outside < 0 ? PyErr_NoMemory() : PyLong_FromLongLong(outside);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS,
     "count(x, out, lo, a, b, exact, bins, threads) -> values outside the range\n\n"
     "Add torch.histc's bin of every float32 value in x to out (bins + 1 int64 counts; the last holds the last\n"
     "edge). exact: (x - lo) / a, else ((x - lo) * a) / b, rounded to float32 at each step."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT, .m_name = "_count", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__count(void) { return PyModule_Create(&module); }
