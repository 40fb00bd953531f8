# A small uint64 -> uint64 hash map for the compiled modules (``_index.pyx``,
# ``_route.pyx``): worker id -> slot, engine hash -> block key.
#
# Open addressing with linear probing, Fibonacci hashing and backward-shift
# deletion (no tombstones), at most 3/4 full. Key 0 marks an empty cell, so a
# real key 0 lives beside the table (has_zero / zero_val) and every value is
# allowed. The functions are ``inline``: each module that cimports them
# compiles its own copy, as with ``_buffers.pxd``. Not thread-safe; the
# owners call them under their own locks (or with the GIL held).

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free

cdef extern from *:
    """
    #define KVR_U64MAP_FIB ((uint64_t)0x9E3779B97F4A7C15ULL)
    """
    const uint64_t U64MAP_FIB "KVR_U64MAP_FIB"    # 2**64 / golden ratio

cdef enum:
    HM_MIN_BITS = 4

ctypedef struct Entry:
    uint64_t key
    uint64_t val

ctypedef struct HMap:
    Entry* e
    uint64_t cap
    uint64_t used
    uint32_t bits
    int has_zero
    uint64_t zero_val


cdef inline HMap* hm_new() noexcept nogil:
    """An empty map, or NULL when out of memory."""
    cdef HMap* m = <HMap*>calloc(1, sizeof(HMap))
    if m == NULL:
        return NULL
    m.bits = HM_MIN_BITS
    m.cap = 1 << HM_MIN_BITS
    m.e = <Entry*>calloc(m.cap, sizeof(Entry))
    if m.e == NULL:
        free(m)
        return NULL
    return m


cdef inline void hm_free(HMap* m) noexcept nogil:
    if m != NULL:
        free(m.e)
        free(m)


cdef inline uint64_t hm_home(HMap* m, uint64_t k) noexcept nogil:
    return (k * U64MAP_FIB) >> (64 - m.bits)


cdef inline int hm_get(HMap* m, uint64_t k, uint64_t* out) noexcept nogil:
    """1 and ``out[0]`` = the value if ``k`` is in ``m`` (which may be NULL), else 0."""
    cdef uint64_t mask, i
    if m == NULL:
        return 0
    if k == 0:
        out[0] = m.zero_val
        return m.has_zero
    mask = m.cap - 1
    i = hm_home(m, k)
    while m.e[i].key != 0:
        if m.e[i].key == k:
            out[0] = m.e[i].val
            return 1
        i = (i + 1) & mask
    return 0


cdef inline Entry* entries_doubled(Entry* old, uint64_t old_cap, uint32_t bits,
                                   bint empty_val) noexcept nogil:
    """``old``'s live entries rehashed into a new table twice its size; ``old`` is freed.

    NULL when out of memory, ``old`` then intact. ``bits`` is log2 of the
    new capacity: an entry goes to its Fibonacci home ``k * FIB >> (64 - bits)``
    or the first free slot after (linear probing, no deletions yet, so no
    shifts). The map here marks a free slot by key 0; ``_index.pyx``'s block
    table, where every key is valid, by value 0 (``empty_val``). Callers pass
    a constant, so the test folds away where this is inlined.
    """
    cdef uint64_t cap = old_cap * 2, mask = cap - 1, j, i
    cdef uint32_t shift = 64 - bits
    cdef Entry* t = <Entry*>calloc(cap, sizeof(Entry))
    if t == NULL:
        return NULL
    for j in range(old_cap):
        if (old[j].val if empty_val else old[j].key) != 0:
            i = (old[j].key * U64MAP_FIB) >> shift
            while (t[i].val if empty_val else t[i].key) != 0:
                i = (i + 1) & mask
            t[i] = old[j]
    free(old)
    return t


cdef inline int hm_grow(HMap* m) noexcept nogil:
    cdef Entry* e = entries_doubled(m.e, m.cap, m.bits + 1, 0)
    if e == NULL:
        return -1
    m.e = e
    m.cap *= 2
    m.bits += 1
    return 0


cdef inline int hm_put(HMap* m, uint64_t k, uint64_t v) noexcept nogil:
    """Insert or overwrite; -1 (``m`` intact) when out of memory."""
    cdef uint64_t mask, i
    if k == 0:
        m.has_zero = 1
        m.zero_val = v
        return 0
    if (m.used + 1) * 4 > m.cap * 3 and hm_grow(m) < 0:
        return -1
    mask = m.cap - 1
    i = hm_home(m, k)
    while m.e[i].key != 0:
        if m.e[i].key == k:
            m.e[i].val = v
            return 0
        i = (i + 1) & mask
    m.e[i].key = k
    m.e[i].val = v
    m.used += 1
    return 0


cdef inline void hm_del_at(HMap* m, uint64_t i) noexcept nogil:
    # Backward-shift deletion: pull later members of the probe run into the
    # hole, each one whose probe path from its home to j passes through i.
    cdef uint64_t mask = m.cap - 1, j = i
    while True:
        j = (j + 1) & mask
        if m.e[j].key == 0:
            break
        if ((j - hm_home(m, m.e[j].key)) & mask) >= ((j - i) & mask):
            m.e[i] = m.e[j]
            i = j
    m.e[i].key = 0
    m.e[i].val = 0
    m.used -= 1


cdef inline void hm_del(HMap* m, uint64_t k) noexcept nogil:
    """Remove ``k`` if present."""
    cdef uint64_t mask, i
    if k == 0:
        m.has_zero = 0
        m.zero_val = 0
        return
    mask = m.cap - 1
    i = hm_home(m, k)
    while m.e[i].key != 0:
        if m.e[i].key == k:
            hm_del_at(m, i)
            return
        i = (i + 1) & mask


cdef inline void hm_del_values(HMap* m, uint64_t v) noexcept nogil:
    """Delete every entry whose value is ``v``. O(capacity x matches): for rare paths."""
    cdef uint64_t i, k
    cdef int found = 1
    if m.has_zero and m.zero_val == v:
        m.has_zero = 0
        m.zero_val = 0
    # Delete by key and rescan: a backward shift may move a match behind the scan.
    while found:
        found = 0
        for i in range(m.cap):
            if m.e[i].key != 0 and m.e[i].val == v:
                k = m.e[i].key
                found = 1
                break
        if found:
            hm_del(m, k)


cdef inline size_t hm_sizeof(HMap* m) noexcept nogil:
    """Bytes owned by ``m`` (0 for NULL)."""
    if m == NULL:
        return 0
    return sizeof(HMap) + m.cap * sizeof(Entry)
