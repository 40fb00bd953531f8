# Helpers shared by the compiled modules (``_index.pyx``, ``_route.pyx``).
#
# They are ``inline``, so each module that cimports them compiles its own
# copy: no extension of their own, no cross-module call. Their slow paths go
# through ``kvroute._convert``, the twins' validators, so the compiled
# modules raise exactly the twins' errors.

from cpython.buffer cimport PyBUF_ANY_CONTIGUOUS, PyBUF_FORMAT, PyObject_GetBuffer, PyBuffer_Release
from libc.stdint cimport uint64_t
from libc.stdlib cimport realloc


cdef inline bint grow_array(void** p, size_t n, size_t item) noexcept:
    """Resize ``p[0]`` to ``n`` items of ``item`` bytes; False (``p[0]`` intact) when out of memory."""
    cdef void* q = realloc(p[0], n * item)
    if q == NULL:
        return False
    p[0] = q
    return True


cdef inline bint is_native_u64(const char* f) noexcept:
    # struct-module codes for a native-endian unsigned 64-bit item: Q, L, =Q, @L ...
    if f == NULL:
        return False
    if f[0] == b"=" or f[0] == b"@":
        f += 1
    return (f[0] == b"Q" or f[0] == b"L") and f[1] == 0


cdef inline int get_keys(object obj, str what, Py_buffer* view) except -1:
    """Fill ``view`` with ``obj`` as contiguous uint64 keys, validated exactly like the twins.

    Zero-copy for a contiguous native-endian uint64 array or ``array('Q')``;
    anything else goes through the twins' converter (which raises the errors).
    The caller releases ``view``.
    """
    try:
        PyObject_GetBuffer(obj, view, PyBUF_ANY_CONTIGUOUS | PyBUF_FORMAT)
    except (TypeError, ValueError, BufferError):
        pass
    else:
        if view.ndim == 1 and view.itemsize == 8 and is_native_u64(view.format):
            return 0
        PyBuffer_Release(view)
    from kvroute._convert import as_u64_array

    PyObject_GetBuffer(as_u64_array(obj, what), view, PyBUF_ANY_CONTIGUOUS | PyBUF_FORMAT)
    return 0


cdef inline uint64_t as_u64(object v, str what) except? 0xFFFFFFFFFFFFFFFF:
    """``v`` as a uint64; the twins' ``check_u64`` raises the errors (same text)."""
    cdef uint64_t out
    if type(v) is int:
        try:
            out = v
            return out
        except OverflowError:
            pass
    from kvroute._convert import check_u64

    return check_u64(v, what)


cdef inline int get_hashes_and_workers(object hashes, Py_buffer* kb, object workers, Py_buffer* wb) except -1:
    """:func:`get_keys` for a ``(hashes, workers)`` pair; on an error neither view is held."""
    get_keys(hashes, "hashes", kb)
    try:
        get_keys(workers, "workers", wb)
    except BaseException:
        PyBuffer_Release(kb)
        raise
    return 0
