/* Bulk copy of a shard into a snapshot segment with non-temporal (streaming) stores.
 *
 * Why: the destination is written once and not read by this process again, so ordinary
 * stores waste bandwidth reading every destination line into the cache first. glibc's memcpy
 * only streams above ~16x its non-temporal threshold (~192 MiB here); FSDP shards are smaller.
 * Measured here with 2 ranks copying 512 MiB each into shared memory: 50-58 ms vs 84-87 ms
 * for Tensor.copy_ and ~90 ms for memcpy in 64 MiB pieces. Other architectures use memcpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static void stream_copy(char *dst, const char *src, size_t n) {
#if defined(__SSE2__)
    size_t head = (64 - ((uintptr_t)dst & 63)) & 63; /* streaming stores want aligned lines */
    if (head > n) head = n;
    memcpy(dst, src, head);
    dst += head; src += head; n -= head;
    while (n >= 256) {
        _mm_prefetch(src + 1024, _MM_HINT_NTA);
        _mm_prefetch(src + 1088, _MM_HINT_NTA);
        _mm_prefetch(src + 1152, _MM_HINT_NTA);
        _mm_prefetch(src + 1216, _MM_HINT_NTA);
        const __m128i *s = (const __m128i *)src;
        __m128i *d = (__m128i *)dst;
        __m128i r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm_loadu_si128(s + i);
        for (int i = 0; i < 16; i++) _mm_stream_si128(d + i, r[i]);
        src += 256; dst += 256; n -= 256;
    }
    _mm_sfence(); /* the streamed lines are visible before anyone is told the copy is done */
#endif
    memcpy(dst, src, n);
}

static PyObject *py_stream_copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src, n;
    if (!PyArg_ParseTuple(args, "KKK", &dst, &src, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    stream_copy((char *)(uintptr_t)dst, (const char *)(uintptr_t)src, (size_t)n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"stream_copy", py_stream_copy, METH_VARARGS, "stream_copy(dst_ptr, src_ptr, nbytes): copy with streaming stores"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_streamcopy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__streamcopy(void) { return PyModule_Create(&module); }
