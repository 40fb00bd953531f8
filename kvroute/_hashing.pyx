"""Compiled block hasher: XXH3-64 written from the xxHash specification.

Twin of :mod:`kvroute._hashing_py`, whose docstrings are the specification:
same names, same parameters, same results, same exceptions. The pure-Python
twin calls the ``xxhash`` package; this module carries its own XXH3-64 (every
input-length path: 0, 1-3, 4-8, 9-16, 17-128, 129-240 and >240 bytes with the
seed-derived secret), written from ``doc/xxhash_spec.md`` of the xxHash
project, so that the differential tests compare two independent implementations.

The hot loops run without the GIL once the input reaches ``_NOGIL_MIN_BYTES``;
below that, releasing and re-acquiring the GIL costs more than it frees.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject

import operator

import numpy as np

from ._convert import U32_MAX, as_u32_tokens, as_u64_array, check_u64

__all__ = [
    "XXH3_SEED",
    "block_hashes",
    "chained_block_hashes",
    "check_block_size",
    "sequence_hashes",
    "token_ids_array",
    "xxh3_64",
]

XXH3_SEED = 1337

cdef extern from "Python.h":
    PyObject** PySequence_Fast_ITEMS(object o)

cdef extern from *:
    """
    #include <stdint.h>

    /* Constants of the xxHash specification (doc/xxhash_spec.md). */
    #define KVR_PRIME32_1 0x9E3779B1ULL
    #define KVR_PRIME32_2 0x85EBCA77ULL
    #define KVR_PRIME32_3 0xC2B2AE3DULL
    #define KVR_PRIME64_1 0x9E3779B185EBCA87ULL
    #define KVR_PRIME64_2 0xC2B2AE3D27D4EB4FULL
    #define KVR_PRIME64_3 0x165667B19E3779F9ULL
    #define KVR_PRIME64_4 0x85EBCA77C2B2AE63ULL
    #define KVR_PRIME64_5 0x27D4EB2F165667C5ULL
    #define KVR_PRIME_MX1 0x165667919E3779F9ULL
    #define KVR_PRIME_MX2 0x9FB21C651E98DF25ULL

    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define KVR_BIG_ENDIAN 1
    #else
    #define KVR_BIG_ENDIAN 0
    #endif

    /* The 192-byte default secret of the specification. */
    static const uint8_t kvr_default_secret[192] = {
      0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
      0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
      0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
      0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
      0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
      0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
      0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
      0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
      0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
      0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
      0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
      0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
    };

    /* Low 64 bits xor high 64 bits of the full 128-bit product a * b. Cython has
       no 128-bit integer, so this one operation is C; the portable branch splits
       the operands into 32-bit halves for compilers without __int128. */
    static inline uint64_t kvr_mul128_fold64(uint64_t a, uint64_t b) {
    #if defined(__SIZEOF_INT128__)
        __uint128_t p = (__uint128_t)a * b;
        return (uint64_t)p ^ (uint64_t)(p >> 64);
    #else
        uint64_t lo_lo = (a & 0xFFFFFFFFULL) * (b & 0xFFFFFFFFULL);
        uint64_t hi_lo = (a >> 32) * (b & 0xFFFFFFFFULL);
        uint64_t lo_hi = (a & 0xFFFFFFFFULL) * (b >> 32);
        uint64_t hi_hi = (a >> 32) * (b >> 32);
        uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFULL) + lo_hi;
        uint64_t upper = (hi_lo >> 32) + (cross >> 32) + hi_hi;
        uint64_t lower = (cross << 32) | (lo_lo & 0xFFFFFFFFULL);
        return lower ^ upper;
    #endif
    }
    """
    const uint64_t PRIME32_1 "KVR_PRIME32_1"
    const uint64_t PRIME32_2 "KVR_PRIME32_2"
    const uint64_t PRIME32_3 "KVR_PRIME32_3"
    const uint64_t PRIME64_1 "KVR_PRIME64_1"
    const uint64_t PRIME64_2 "KVR_PRIME64_2"
    const uint64_t PRIME64_3 "KVR_PRIME64_3"
    const uint64_t PRIME64_4 "KVR_PRIME64_4"
    const uint64_t PRIME64_5 "KVR_PRIME64_5"
    const uint64_t PRIME_MX1 "KVR_PRIME_MX1"
    const uint64_t PRIME_MX2 "KVR_PRIME_MX2"
    const bint BIG_ENDIAN "KVR_BIG_ENDIAN"
    const uint8_t DEFAULT_SECRET "kvr_default_secret"[192]
    uint64_t mul128_fold64 "kvr_mul128_fold64"(uint64_t a, uint64_t b) noexcept nogil

# Size of the default secret, and the layout of the >240-byte path.
cdef enum:
    SECRET_SIZE = 192
    STRIPE_LEN = 64
    STRIPES_PER_BLOCK = 16    # (SECRET_SIZE - STRIPE_LEN) / 8
    BLOCK_LEN = 1024          # STRIPE_LEN * STRIPES_PER_BLOCK
    MIDSIZE_MAX = 240

# Below this many input bytes a batch keeps the GIL: releasing it costs a few
# hundred nanoseconds and, with other threads busy, re-acquiring it can wait a
# whole switch interval.
cdef Py_ssize_t _NOGIL_MIN_BYTES = 1 << 16


# --- byte access: the specification reads everything little-endian -----------

cdef inline uint64_t _bswap64(uint64_t x) noexcept nogil:
    x = ((x & 0x00FF00FF00FF00FFULL) << 8) | ((x >> 8) & 0x00FF00FF00FF00FFULL)
    x = ((x & 0x0000FFFF0000FFFFULL) << 16) | ((x >> 16) & 0x0000FFFF0000FFFFULL)
    return (x << 32) | (x >> 32)


cdef inline uint32_t _bswap32(uint32_t x) noexcept nogil:
    return ((x << 24) | ((x << 8) & 0x00FF0000U)
            | ((x >> 8) & 0x0000FF00U) | (x >> 24))


cdef inline uint64_t _read64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)  # unaligned-safe; compiles to a single load
    return _bswap64(v) if BIG_ENDIAN else v


cdef inline uint32_t _read32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return _bswap32(v) if BIG_ENDIAN else v


cdef inline void _write64(uint8_t* p, uint64_t v) noexcept nogil:
    if BIG_ENDIAN:
        v = _bswap64(v)
    memcpy(p, &v, 8)


cdef inline uint64_t _rotl64(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


# --- XXH3-64 ------------------------------------------------------------------

cdef inline uint64_t _avalanche_xxh64(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= PRIME64_2
    h ^= h >> 29
    h *= PRIME64_3
    h ^= h >> 32
    return h


cdef inline uint64_t _avalanche(uint64_t h) noexcept nogil:
    h ^= h >> 37
    h *= PRIME_MX1
    h ^= h >> 32
    return h


cdef inline uint64_t _len_1to3(const uint8_t* p, size_t n, uint64_t seed) noexcept nogil:
    cdef uint32_t combined = ((<uint32_t>p[n - 1]) | (<uint32_t>n << 8)
                              | (<uint32_t>p[0] << 16) | (<uint32_t>p[n >> 1] << 24))
    cdef uint64_t flip = (<uint64_t>(_read32(DEFAULT_SECRET) ^ _read32(DEFAULT_SECRET + 4))) + seed
    return _avalanche_xxh64((<uint64_t>combined) ^ flip)


cdef inline uint64_t _len_4to8(const uint8_t* p, size_t n, uint64_t seed) noexcept nogil:
    seed ^= (<uint64_t>_bswap32(<uint32_t>seed)) << 32
    cdef uint64_t first = _read32(p)
    cdef uint64_t last = _read32(p + n - 4)
    cdef uint64_t flip = (_read64(DEFAULT_SECRET + 8) ^ _read64(DEFAULT_SECRET + 16)) - seed
    cdef uint64_t h = (last | (first << 32)) ^ flip
    h ^= _rotl64(h, 49) ^ _rotl64(h, 24)
    h *= PRIME_MX2
    h ^= (h >> 35) + n
    h *= PRIME_MX2
    h ^= h >> 28
    return h


cdef inline uint64_t _words_9to16(uint64_t first, uint64_t last, size_t n,
                                  uint64_t seed) noexcept nogil:
    cdef uint64_t lo = first ^ ((_read64(DEFAULT_SECRET + 24) ^ _read64(DEFAULT_SECRET + 32)) + seed)
    cdef uint64_t hi = last ^ ((_read64(DEFAULT_SECRET + 40) ^ _read64(DEFAULT_SECRET + 48)) - seed)
    return _avalanche(n + _bswap64(lo) + hi + mul128_fold64(lo, hi))


cdef inline uint64_t _mix16(const uint8_t* p, const uint8_t* secret, uint64_t seed) noexcept nogil:
    return mul128_fold64(_read64(p) ^ (_read64(secret) + seed),
                         _read64(p + 8) ^ (_read64(secret + 8) - seed))


cdef inline uint64_t _len_17to128(const uint8_t* p, size_t n, uint64_t seed) noexcept nogil:
    cdef uint64_t acc = n * PRIME64_1
    cdef size_t i
    cdef size_t rounds = ((n - 1) >> 5) + 1
    for i in range(rounds):
        acc += _mix16(p + 16 * i, DEFAULT_SECRET + 32 * i, seed)
        acc += _mix16(p + n - 16 * (i + 1), DEFAULT_SECRET + 32 * i + 16, seed)
    return _avalanche(acc)


cdef inline uint64_t _len_129to240(const uint8_t* p, size_t n, uint64_t seed) noexcept nogil:
    cdef uint64_t acc = n * PRIME64_1
    cdef size_t i
    cdef size_t chunks = n >> 4
    for i in range(8):
        acc += _mix16(p + 16 * i, DEFAULT_SECRET + 16 * i, seed)
    acc = _avalanche(acc)
    for i in range(8, chunks):
        acc += _mix16(p + 16 * i, DEFAULT_SECRET + 16 * (i - 8) + 3, seed)
    # the last 16 bytes, with the secret at 136 - 17
    acc += _mix16(p + n - 16, DEFAULT_SECRET + 119, seed)
    return _avalanche(acc)


cdef inline void _accumulate(uint64_t* acc, const uint8_t* stripe,
                             const uint8_t* secret) noexcept nogil:
    # The specification's acc[i ^ 1] += value_i, written as acc[i] += value_{i ^ 1}
    # in a second loop so that the compiler can vectorise both loops.
    cdef int i
    cdef uint64_t value[8]
    cdef uint64_t key[8]
    for i in range(8):
        value[i] = _read64(stripe + 8 * i)
        key[i] = value[i] ^ _read64(secret + 8 * i)
    for i in range(8):
        acc[i] += value[i ^ 1] + (key[i] & 0xFFFFFFFFULL) * (key[i] >> 32)


cdef inline void _scramble(uint64_t* acc, const uint8_t* secret) noexcept nogil:
    cdef int i
    for i in range(8):
        acc[i] ^= acc[i] >> 47
        acc[i] ^= _read64(secret + 8 * i)
        acc[i] *= PRIME32_1


cdef uint64_t _len_long(const uint8_t* p, size_t n, const uint8_t* secret) noexcept nogil:
    cdef uint64_t acc[8]
    acc[0] = PRIME32_3
    acc[1] = PRIME64_1
    acc[2] = PRIME64_2
    acc[3] = PRIME64_3
    acc[4] = PRIME64_4
    acc[5] = PRIME32_2
    acc[6] = PRIME64_5
    acc[7] = PRIME32_1
    # every full block but the last goes through accumulate + scramble ...
    cdef size_t blocks = (n - 1) // BLOCK_LEN
    cdef size_t b, s, stripes
    for b in range(blocks):
        for s in range(<size_t>STRIPES_PER_BLOCK):
            _accumulate(acc, p + b * BLOCK_LEN + s * STRIPE_LEN, secret + 8 * s)
        _scramble(acc, secret + SECRET_SIZE - STRIPE_LEN)
    # ... the last (possibly full) block accumulates all but its last stripe,
    # then the input's last 64 bytes are accumulated, overlapping if need be
    cdef const uint8_t* last = p + blocks * BLOCK_LEN
    stripes = (n - blocks * BLOCK_LEN - 1) // STRIPE_LEN
    for s in range(stripes):
        _accumulate(acc, last + s * STRIPE_LEN, secret + 8 * s)
    _accumulate(acc, p + n - STRIPE_LEN, secret + SECRET_SIZE - STRIPE_LEN - 7)
    cdef uint64_t result = n * PRIME64_1
    cdef int i
    for i in range(4):
        result += mul128_fold64(acc[2 * i] ^ _read64(secret + 11 + 16 * i),
                                acc[2 * i + 1] ^ _read64(secret + 11 + 16 * i + 8))
    return _avalanche(result)


cdef void _derive_secret(uint8_t* out, uint64_t seed) noexcept nogil:
    """The seeded secret of the >240-byte path (equal to the default for seed 0)."""
    cdef int i
    for i in range(SECRET_SIZE // 16):
        _write64(out + 16 * i, _read64(DEFAULT_SECRET + 16 * i) + seed)
        _write64(out + 16 * i + 8, _read64(DEFAULT_SECRET + 16 * i + 8) - seed)


cdef inline uint64_t _xxh3_64(const uint8_t* p, size_t n, uint64_t seed,
                              const uint8_t* long_secret) noexcept nogil:
    """XXH3-64 of p[0:n]; ``long_secret`` must be ``_derive_secret(seed)``."""
    if n <= 16:
        if n > 8:
            return _words_9to16(_read64(p), _read64(p + n - 8), n, seed)
        if n >= 4:
            return _len_4to8(p, n, seed)
        if n > 0:
            return _len_1to3(p, n, seed)
        return _avalanche_xxh64(seed ^ (_read64(DEFAULT_SECRET + 56) ^ _read64(DEFAULT_SECRET + 64)))
    if n <= 128:
        return _len_17to128(p, n, seed)
    if n <= MIDSIZE_MAX:
        return _len_129to240(p, n, seed)
    return _len_long(p, n, long_secret)


cdef inline uint64_t _chain(uint64_t parent, uint64_t block) noexcept nogil:
    """Dynamo's sequence-hash step: XXH3-64(le64(parent) || le64(block), 1337).

    A 16-byte input is read as its first and last 8 bytes, so the two words
    go straight into the 9-16 byte path without a buffer.
    """
    return _words_9to16(parent, block, 16, 1337)


# --- batches over token arrays -----------------------------------------------

cdef void _hash_blocks(const uint8_t* data, Py_ssize_t count, size_t stride, size_t window,
                       uint64_t seed, const uint8_t* secret, uint64_t* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(count):
        out[i] = _xxh3_64(data + i * stride, window, seed, secret)


cdef void _hash_chain(const uint8_t* data, Py_ssize_t count, size_t stride, uint64_t seed,
                      const uint8_t* secret, bint has_parent, uint64_t parent,
                      uint64_t* out) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint64_t h
    for i in range(count):
        h = _xxh3_64(data + i * stride, stride, seed, secret)
        if has_parent:
            h = _chain(parent, h)
        out[i] = h
        parent = h
        has_parent = True


cdef void _link(const uint64_t* hashes, Py_ssize_t count, bint has_parent, uint64_t parent,
                uint64_t* out) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint64_t h
    for i in range(count):
        h = hashes[i]
        if has_parent:
            h = _chain(parent, h)
        out[i] = h
        parent = h
        has_parent = True


_U32 = np.dtype(np.uint32)


cdef Py_ssize_t _fill_u32(PyObject** items, Py_ssize_t n, uint32_t* out) except -2:
    """Copy exact ints in [0, 2**32) into ``out``; the index of the first other item, or -1.

    Raises OverflowError for an int beyond long long.
    """
    cdef Py_ssize_t i
    cdef long long v
    cdef object item
    for i in range(n):
        item = <object>items[i]
        if not PyLong_CheckExact(item):
            return i
        v = item
        if v < 0 or v > 0xFFFFFFFFLL:
            return i
        out[i] = <uint32_t>v
    return -1


cdef object _tokens_array(object tokens):
    """``tokens`` as a contiguous native uint32 array holding little-endian bytes.

    Zero-copy for a contiguous uint32 ndarray; a C loop over the item pointers
    of a list or tuple of plain ints; :func:`as_u32_tokens` for everything
    else, including any list the C loop does not accept, so that errors are
    always the shared ones.
    """
    cdef Py_ssize_t n
    cdef uint32_t[::1] view
    arr = None
    if isinstance(tokens, np.ndarray):
        if tokens.ndim == 1 and tokens.dtype == _U32 and tokens.flags.c_contiguous:
            arr = tokens
    elif type(tokens) is list or type(tokens) is tuple:
        n = len(tokens)
        out = np.empty(n, dtype=np.uint32)
        if n == 0:
            arr = out
        else:
            view = out
            # the GIL is held and no Python code runs, so the items stay put
            try:
                if _fill_u32(PySequence_Fast_ITEMS(tokens), n, &view[0]) == -1:
                    arr = out
            except OverflowError:  # an int beyond long long: as_u32_tokens names it
                pass
    if arr is None:
        arr = as_u32_tokens(tokens)
    if BIG_ENDIAN:
        arr = arr.byteswap()  # Dynamo hashes u32 little-endian bytes
    return arr


cdef Py_ssize_t _check_block_size(object block_size, str what) except -1:
    cdef long long size
    if type(block_size) is int:  # the common case, without a Python-level call
        try:
            size = block_size
        except OverflowError:
            pass
        else:
            if 0 < size <= 0xFFFFFFFFLL:
                return <Py_ssize_t>size
    try:
        value = operator.index(block_size)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(block_size).__name__}") from None
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
    if value > U32_MAX:
        raise OverflowError(f"{what} {value} is outside the uint32 range [1, 2**32)")
    return value


cdef uint64_t _check_u64(object value, str what) except? 0xFFFFFFFFFFFFFFFFULL:
    """``check_u64`` with a fast path for a plain int in range; the same errors."""
    cdef uint64_t v
    if type(value) is int:
        try:
            v = value
        except OverflowError:
            pass
        else:
            return v
    return check_u64(value, what)


def check_block_size(block_size, what="block_size"):
    """Return ``block_size`` as an int in [1, 2**32), or raise naming the problem.

    See :func:`kvroute._hashing_py.check_block_size`.
    """
    return _check_block_size(block_size, what)


def xxh3_64(data, seed=0):
    """Return XXH3-64 of a bytes-like object with a 64-bit seed.

    See :func:`kvroute._hashing_py.xxh3_64`.
    """
    cdef const uint8_t[::1] buf
    cdef const uint8_t* p = NULL
    cdef size_t n
    if type(data) is bytes:  # skip the buffer protocol for the common case
        p = <const uint8_t*>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        buf = memoryview(data).cast("B")
        n = buf.shape[0]
        if n:
            p = &buf[0]
    cdef uint64_t s = _check_u64(seed, "seed")
    cdef uint8_t secret[SECRET_SIZE]
    if n > MIDSIZE_MAX:
        _derive_secret(secret, s)
    return _xxh3_64(p, n, s, secret)


def block_hashes(tokens, block_size, seed=XXH3_SEED, eagle=False):
    """Return XXH3-64 of every full block of ``tokens`` (Dynamo's block hashes).

    See :func:`kvroute._hashing_py.block_hashes`.
    """
    cdef Py_ssize_t size = _check_block_size(block_size, "block_size")
    cdef uint64_t s = _check_u64(seed, "seed")
    cdef Py_ssize_t window = size + 1 if eagle else size
    arr = _tokens_array(tokens)
    cdef const uint32_t[::1] toks = arr
    cdef Py_ssize_t n = toks.shape[0]
    cdef Py_ssize_t count = (n - window) // size + 1 if n >= window else 0
    out = np.empty(count, dtype=np.uint64)
    if count == 0:
        return out
    cdef uint64_t[::1] res = out
    cdef uint8_t secret[SECRET_SIZE]
    if 4 * window > MIDSIZE_MAX:  # only the >240-byte path reads the secret
        _derive_secret(secret, s)
    cdef const uint8_t* data = <const uint8_t*>&toks[0]
    if 4 * n >= _NOGIL_MIN_BYTES:
        with nogil:
            _hash_blocks(data, count, 4 * size, 4 * window, s, secret, &res[0])
    else:
        _hash_blocks(data, count, 4 * size, 4 * window, s, secret, &res[0])
    return out


def sequence_hashes(hashes, parent=None):
    """Chain block hashes into sequence hashes (Dynamo's ``compute_seq_hash_for_block``).

    See :func:`kvroute._hashing_py.sequence_hashes`.
    """
    cdef bint has_parent = parent is not None
    cdef uint64_t p = _check_u64(parent, "parent") if has_parent else 0
    values = as_u64_array(hashes)
    cdef const uint64_t[::1] src = values
    cdef Py_ssize_t count = src.shape[0]
    out = np.empty(count, dtype=np.uint64)
    if count == 0:
        return out
    cdef uint64_t[::1] res = out
    if 8 * count >= _NOGIL_MIN_BYTES:
        with nogil:
            _link(&src[0], count, has_parent, p, &res[0])
    else:
        _link(&src[0], count, has_parent, p, &res[0])
    return out


def chained_block_hashes(tokens, block_size, seed=XXH3_SEED, parent=None):
    """Return the sequence hashes of every full block of ``tokens`` in one pass.

    See :func:`kvroute._hashing_py.chained_block_hashes`.
    """
    cdef Py_ssize_t size = _check_block_size(block_size, "block_size")
    cdef uint64_t s = _check_u64(seed, "seed")
    cdef bint has_parent = parent is not None
    cdef uint64_t p = _check_u64(parent, "parent") if has_parent else 0
    arr = _tokens_array(tokens)
    cdef const uint32_t[::1] toks = arr
    cdef Py_ssize_t n = toks.shape[0]
    cdef Py_ssize_t count = n // size
    out = np.empty(count, dtype=np.uint64)
    if count == 0:
        return out
    cdef uint64_t[::1] res = out
    cdef uint8_t secret[SECRET_SIZE]
    if 4 * size > MIDSIZE_MAX:  # only the >240-byte path reads the secret
        _derive_secret(secret, s)
    cdef const uint8_t* data = <const uint8_t*>&toks[0]
    if 4 * n >= _NOGIL_MIN_BYTES:
        with nogil:
            _hash_chain(data, count, 4 * size, s, secret, has_parent, p, &res[0])
    else:
        _hash_chain(data, count, 4 * size, s, secret, has_parent, p, &res[0])
    return out


# --- token ids in JSON text ---------------------------------------------------

cdef inline bint _json_ws(uint8_t c) noexcept nogil:
    return c == 0x20 or c == 0x0A or c == 0x0D or c == 0x09


cdef Py_ssize_t _count_commas(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, count = 0
    for i in range(n):
        count += p[i] == 0x2C
    return count


cdef extern from *:
    """
    /* Index of the lowest set bit of a non-zero word. */
    static inline int kvr_ctz64(uint64_t x) {
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_ctzll(x);
    #else
        int n = 0;
        while (!(x & 1)) { x >>= 1; n++; }
        return n;
    #endif
    }
    """
    int ctz64 "kvr_ctz64"(uint64_t x) noexcept nogil


# SWAR constants: every byte of a word at once.
cdef uint64_t _ASCII_ZEROS = 0x3030303030303030ULL
cdef uint64_t _TO_HIGH_BIT = 0x7676767676767676ULL  # byte + 0x76 >= 0x80 iff byte >= 10
cdef uint64_t _HIGH_BITS = 0x8080808080808080ULL


cdef inline Py_ssize_t _parse_id(const uint8_t* p, Py_ssize_t i, Py_ssize_t n,
                                 uint32_t* out) noexcept nogil:
    """Parse the id starting at ``p[i]`` into ``out``; the index after it, or -1 if none.

    An id is ``0`` or a digit 1-9 then digits, below 2**32. With 8 bytes
    left, an id of up to 7 digits is read at once: the digits are found by
    one word test (a byte is a digit iff byte ^ '0' < 10) and converted by
    three multiplications (the eight-digit SWAR conversion, with the id
    shifted to the word's top and zeros in front). Longer ids, and the end
    of the text, go a digit at a time.
    """
    cdef uint64_t t, nondigit, v
    cdef int nd
    if i + 8 <= n:
        t = _read64(p + i) ^ _ASCII_ZEROS  # digits become 0-9, in text order from the low byte
        nondigit = ((t + _TO_HIGH_BIT) | t) & _HIGH_BITS
        # a carry out of a byte only comes from a non-digit byte and only moves up:
        # the lowest flagged byte is the first non-digit
        if nondigit:
            nd = ctz64(nondigit) >> 3
            if nd == 0 or (nd > 1 and (t & 0xFF) == 0):  # no digit, or a leading zero
                return -1
            t <<= 8 * (8 - nd)  # drop what follows the id; zeros in front
            t = t * 10 + (t >> 8)
            t = (((t & 0x000000FF000000FFULL) * (100 + (1000000ULL << 32)))
                 + (((t >> 16) & 0x000000FF000000FFULL) * (1 + (10000ULL << 32)))) >> 32
            out[0] = <uint32_t>t
            return i + nd
    # a digit at a time
    cdef uint8_t c = p[i]
    if c == 0x30:  # 0 starts no other number
        v = 0
        i += 1
        if i < n and 0x30 <= p[i] <= 0x39:
            return -1
    elif 0x31 <= c <= 0x39:
        v = c - 0x30
        i += 1
        while i < n and 0x30 <= p[i] <= 0x39:
            v = v * 10 + (p[i] - 0x30)
            if v > 0xFFFFFFFFULL:  # checked each digit: v never overflows
                return -1
            i += 1
    else:
        return -1
    out[0] = <uint32_t>v
    return i


cdef Py_ssize_t _parse_u32_list(const uint8_t* p, Py_ssize_t n, uint32_t* out,
                                Py_ssize_t cap) noexcept nogil:
    """Parse a JSON array of decimal u32s into ``out``; the count, or -1 if not one.

    ``cap`` bounds the count (commas + 1, so a valid array always fits).
    """
    cdef Py_ssize_t i = 0, k = 0
    while i < n and _json_ws(p[i]):
        i += 1
    if i >= n or p[i] != 0x5B:  # [
        return -1
    i += 1
    while i < n and _json_ws(p[i]):
        i += 1
    if i < n and p[i] == 0x5D:  # ]: the empty array
        i += 1
    else:
        while True:
            if i >= n or k >= cap:
                return -1
            i = _parse_id(p, i, n, out + k)
            if i < 0:
                return -1
            k += 1
            while i < n and _json_ws(p[i]):
                i += 1
            if i >= n:
                return -1
            if p[i] == 0x2C:  # ,
                i += 1
                while i < n and _json_ws(p[i]):
                    i += 1
            elif p[i] == 0x5D:  # ]
                i += 1
                break
            else:
                return -1
    while i < n and _json_ws(p[i]):
        i += 1
    return k if i == n else -1


def token_ids_array(data):
    """Return a JSON array of token ids, given as text, as a uint32 array; None if it is not one.

    See :func:`kvroute._hashing_py.token_ids_array`.
    """
    cdef const uint8_t[::1] buf
    cdef const uint8_t* p = NULL
    cdef Py_ssize_t n, cap, count
    if type(data) is bytes:  # skip the buffer protocol for the common case
        p = <const uint8_t*>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        buf = memoryview(data).cast("B")
        n = buf.shape[0]
        if n:
            p = &buf[0]
    if n < 2:
        return None
    cdef bint nogil_ = n >= _NOGIL_MIN_BYTES
    if nogil_:
        with nogil:
            cap = _count_commas(p, n) + 1
    else:
        cap = _count_commas(p, n) + 1
    out = np.empty(cap, dtype=np.uint32)
    cdef uint32_t[::1] res = out
    if nogil_:
        with nogil:
            count = _parse_u32_list(p, n, &res[0], cap)
    else:
        count = _parse_u32_list(p, n, &res[0], cap)
    if count < 0:
        return None
    return out if count == cap else out[:count]
