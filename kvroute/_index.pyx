# The compiled BlockIndex. kvroute/_index_py.py is its specification: same
# names, signatures, results and errors. Everything here exists for speed or
# memory; behaviour lives in the twin's docstrings.
#
# Layout
# ------
# One open-addressing table (linear probing, Fibonacci hashing, backward-shift
# deletion, so no tombstones and no growth under churn) maps a block key to a
# 64-bit word. Most blocks live on one worker, so that word *is* the
# residency:
#
#     bits  0..11  device copies      bits 36..37  engine handles (0, 1, 2+)
#     bits 12..23  host copies        bits 38..61  worker slot
#     bits 24..35  disk copies        bit  63      SPILL: low 32 bits name a set
#
# A live residency always has a non-zero count, so 0 marks an empty slot and
# every uint64 is a valid key. A block on two or more workers spills into a
# heap-allocated set of residency words sorted by worker slot (binary search
# once it is large: a system prompt cached on every worker).
#
# Worker ids are arbitrary uint64s; each live worker gets a dense slot so the
# per-call scratch arrays of match() can be indexed directly. Slots of removed
# workers are reused (their residencies are all gone by then).
#
# Engine handles (engine hash -> block key) live in a small per-slot table
# (kvroute/_u64map.pxd, shared with _route.pyx).
# The residency keeps a saturating count of the handles that name it, so the
# common drop ("last copy removed through its only handle") deletes exactly
# that handle; any other drop of a handled residency scans the worker's
# handles, which only happens when callers mix removal by key and by handle.

from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset
from cpython.buffer cimport PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from ._buffers cimport as_u64, get_hashes_and_workers, get_keys, grow_array
from ._u64map cimport (
    Entry,
    HMap,
    entries_doubled,
    hm_del,
    hm_del_values,
    hm_free,
    hm_get,
    hm_grow,
    hm_home,
    hm_new,
    hm_put,
    hm_sizeof,
)

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define KVR_PREFETCH(p) __builtin_prefetch((p), 1, 3)
    #else
    #define KVR_PREFETCH(p) ((void)0)
    #endif
    """
    void KVR_PREFETCH(const void* p) noexcept nogil

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define KVR_CTZ(x) ((unsigned)__builtin_ctz(x))
    #else
    static unsigned KVR_CTZ(unsigned x) { unsigned n = 0; while (!(x & 1u)) { x >>= 1; n++; } return n; }
    #endif
    """
    unsigned KVR_CTZ(unsigned x) noexcept nogil     # x != 0


import numpy as np

from ._convert import TIERS, tier_index
from ._dump import (
    MAGIC as _DUMP_MAGIC,
    positions as _dump_positions,
    unpack as _dump_unpack,
)

__all__ = ["MAX_COPIES", "TIERS", "BlockIndex"]

MAX_COPIES = 4095

cdef enum:
    COUNT_BITS = 12
    HC_SHIFT = 36
    SLOT_SHIFT = 38
    SLOT_BITS = 24
    NOGIL_MIN = 1024        # batches at least this long run with the GIL released
    AHEAD = 8               # prefetch the table line this many keys ahead (hides misses)
    WINDOW = 4              # slots a probe or a delete looks at without branching
    MIN_BITS = 4
    SMALL_SET = 8           # sets up to this size are scanned, larger ones bisected
    SET_MIN = 4             # capacity of a new worker set
    SPARE_MAX = 65536       # recycled set buffers kept at most

# Compile-time constants, not module globals: a global uint64_t may alias any
# residency word the loops store through, so the compiler would reload it
# (and could not fold it into an immediate) after every such store.
cdef extern from *:
    """
    #define KVR_COUNT_MAX ((uint64_t)0xFFFu)
    #define KVR_COUNTS_MASK ((((uint64_t)1) << 36) - 1)
    #define KVR_HC_MASK (((uint64_t)3) << 36)
    #define KVR_SLOT_MAX ((((uint64_t)1) << 24) - 1)
    #define KVR_SPILL (((uint64_t)1) << 63)
    #define KVR_FIB ((uint64_t)0x9E3779B97F4A7C15ULL)
    """
    const uint64_t COUNT_MAX "KVR_COUNT_MAX"        # (1 << COUNT_BITS) - 1
    const uint64_t COUNTS_MASK "KVR_COUNTS_MASK"    # (1 << HC_SHIFT) - 1
    const uint64_t HC_MASK "KVR_HC_MASK"            # 3 << HC_SHIFT
    const uint64_t SLOT_MAX "KVR_SLOT_MAX"          # (1 << SLOT_BITS) - 1
    const uint64_t SPILL "KVR_SPILL"
    const uint64_t FIB "KVR_FIB"                    # 2**64 / golden ratio

cdef inline uint32_t res_slot(uint64_t r) noexcept nogil:
    return <uint32_t>((r >> SLOT_SHIFT) & SLOT_MAX)

cdef inline uint64_t res_count(uint64_t r, int t) noexcept nogil:
    return (r >> (t * COUNT_BITS)) & COUNT_MAX

cdef inline uint64_t res_hc(uint64_t r) noexcept nogil:
    return (r >> HC_SHIFT) & 3

cdef inline int res_fastest(uint64_t r) noexcept nogil:
    if r & COUNT_MAX:
        return 0
    if (r >> COUNT_BITS) & COUNT_MAX:
        return 1
    return 2

cdef inline uint64_t* set_items(uint64_t* s) noexcept nogil:
    return s + 1

cdef inline uint32_t set_len(uint64_t* s) noexcept nogil:
    return <uint32_t>(s[0] & 0xFFFFFFFFu)

cdef inline uint32_t set_cap(uint64_t* s) noexcept nogil:
    return <uint32_t>(s[0] >> 32)


# -- the block table's probe and delete --------------------------------------
#
# Storing a new block and removing a block's last copy are the bulk of an
# event stream. Probing slot by slot for the empty slot where a new key goes
# ends on a branch that goes either way about as often as the table is full,
# so it mispredicts about once per key, and a backward-shift delete twice
# more (measured: 1.7 mispredicts per removed block, 0.9 per stored one on
# the Mooncake stream). These look at the first WINDOW slots at once, without
# branches, and fall back to the loop only when a run is longer than that
# (rare below the 75% load limit). The slots h..h + WINDOW lie in the cache
# lines of h and h + WINDOW, which is what the loops prefetch
# (prefetch_slots); without the second line the window would wait for it.

cdef inline void prefetch_slots(Entry* t, uint64_t mask, uint64_t h) noexcept nogil:
    KVR_PREFETCH(&t[h])
    KVR_PREFETCH(&t[(h + WINDOW) & mask])

cdef inline unsigned stops(const Entry* e, uint64_t k) noexcept nogil:
    # 1 if the slot ends the probe for k: it holds k, or it is empty
    return <unsigned>(e.val == 0) | <unsigned>(e.key == k)

cdef inline uint64_t probe(Entry* t, uint64_t mask, uint64_t h, uint64_t k) noexcept nogil:
    """The slot holding ``k`` or, if no slot does, the empty slot that ends its run.

    ``h`` is k's home slot. The caller tells the two apart by ``val != 0``.
    """
    cdef Entry* e
    cdef unsigned m
    if h + WINDOW <= mask:          # the window does not wrap around (nearly always)
        e = t + h
        m = stops(e, k) | (stops(e + 1, k) << 1) | (stops(e + 2, k) << 2) | (stops(e + 3, k) << 3)
        if m:
            return h + KVR_CTZ(m)
        h += WINDOW
    while t[h].val != 0 and t[h].key != k:
        h = (h + 1) & mask
    return h

cdef inline void delete_at(Entry* t, uint64_t mask, uint32_t sh, uint64_t i) noexcept nogil:
    """Empty slot ``i`` by backward shift (the caller counts the entry gone).

    Each later member of i's run whose probe path from its home passes
    through the hole moves into it, and the hole moves to where it was. The
    hole's content does not matter until it is cleared at the end, so the
    first WINDOW steps copy unconditionally and only choose where the hole
    goes next.
    """
    cdef uint64_t j = i, mv
    cdef unsigned done = 0, step
    if i + WINDOW <= mask:          # no wrap-around: j - i needs no mask
        for step in range(WINDOW):
            j += 1
            done |= <unsigned>(t[j].val == 0)
            # t[j] moves if still in the run and its path from home passes i
            mv = <uint64_t>((done == 0) & (((j - ((t[j].key * FIB) >> sh)) & mask) >= j - i))
            t[i] = t[j]
            i ^= (i ^ j) & (<uint64_t>0 - mv)
        if done:
            t[i].key = 0
            t[i].val = 0
            return
    while True:
        j = (j + 1) & mask
        if t[j].val == 0:
            break
        if ((j - ((t[j].key * FIB) >> sh)) & mask) >= ((j - i) & mask):
            t[i] = t[j]
            i = j
    t[i].key = 0
    t[i].val = 0


cdef class BlockIndex:
    """Which worker holds which KV block: the global prefix index (compiled).

    See :mod:`kvroute._index_py` for the full specification.

    >>> idx = BlockIndex()
    >>> idx.store(0, [11, 12, 13])
    >>> idx.store(1, [11, 12])
    >>> sorted(idx.match([11, 12, 13, 14]).items())
    [(0, 3), (1, 2)]
    """

    cdef Entry* _t
    cdef uint64_t _cap
    cdef uint64_t _used
    cdef uint32_t _bits
    # spilled worker sets: _sets[id] -> [len | cap << 32, residency words...]
    cdef uint64_t** _sets
    cdef uint32_t _nsets
    cdef uint32_t _sets_cap        # room in _sets and in _set_free (which holds <= _nsets ids)
    cdef uint32_t* _set_free
    cdef uint32_t _nset_free
    # Recycled buffers of the smallest set size: blocks shared by two workers
    # spill and un-spill constantly under churn; malloc/free there cost ~10%.
    cdef uint64_t** _spare
    cdef uint32_t _nspare
    cdef uint32_t _spare_cap
    # per worker slot
    cdef uint32_t _nslots          # slots ever allocated (high-water mark)
    cdef uint32_t _slot_cap
    cdef uint64_t* _slot_worker
    cdef uint8_t* _slot_live
    cdef uint64_t* _slot_resident
    cdef HMap** _slot_handles
    cdef uint32_t* _slot_free
    cdef uint32_t _nslot_free
    # match scratch, per slot
    cdef uint32_t* _ep
    cdef uint32_t* _cnt
    cdef uint32_t* _tier_cnt       # 3 per slot
    cdef uint32_t _epoch
    cdef uint32_t* _hits           # slots that hold the first block of a match
    cdef uint32_t* _alive          # slots that held every block of a match so far
    cdef dict _slot_of             # worker id -> slot
    cdef HMap* _slot_map           # the same, for loops without the GIL: id -> slot + 1
    cdef uint64_t _unknown
    cdef uint64_t _orphans
    cdef uint64_t _saturated
    cdef PyThread_type_lock _lock

    def __cinit__(self):
        self._lock = PyThread_allocate_lock()
        self._bits = MIN_BITS
        self._cap = 1 << MIN_BITS
        self._t = <Entry*>calloc(self._cap, sizeof(Entry))
        self._slot_of = {}
        self._slot_map = hm_new()
        if self._lock == NULL or self._t == NULL or self._slot_map == NULL:
            raise MemoryError()

    def __init__(self):
        pass

    def __dealloc__(self):
        cdef uint32_t i
        free(self._t)
        if self._sets != NULL:
            for i in range(self._nsets):
                free(self._sets[i])
        free(self._sets)
        free(self._set_free)
        if self._spare != NULL:
            for i in range(self._nspare):
                free(self._spare[i])
        free(self._spare)
        if self._slot_handles != NULL:
            for i in range(self._nslots):
                hm_free(self._slot_handles[i])
        free(self._slot_handles)
        free(self._slot_worker)
        free(self._slot_live)
        free(self._slot_resident)
        free(self._slot_free)
        free(self._ep)
        free(self._cnt)
        free(self._tier_cnt)
        free(self._hits)
        free(self._alive)
        hm_free(self._slot_map)
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    # -- locking -----------------------------------------------------------

    cdef inline void _acquire(self):
        # Wait for the lock with the GIL released, so that a holder that is
        # itself waiting for the GIL can finish.
        if not PyThread_acquire_lock(self._lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._lock, WAIT_LOCK)

    cdef inline void _release(self):
        PyThread_release_lock(self._lock)

    # -- the block table -----------------------------------------------------

    cdef inline uint64_t _home(self, uint64_t k) noexcept nogil:
        return (k * FIB) >> (64 - self._bits)

    cdef inline Entry* _find(self, uint64_t k) noexcept nogil:
        # Slot by slot, not probe(): finds are mostly of present blocks (match
        # walks, parents), which most often sit in their home slot, so the
        # loop is well predicted and needs only the home slot's cache line.
        cdef uint64_t mask = self._cap - 1
        cdef uint64_t i = self._home(k)
        while self._t[i].val != 0:
            if self._t[i].key == k:
                return &self._t[i]
            i = (i + 1) & mask
        return NULL

    cdef int _grow(self) noexcept nogil:
        # the map's grow loop (_u64map.pxd), with val 0 marking a free slot
        cdef Entry* t = entries_doubled(self._t, self._cap, self._bits + 1, 1)
        if t == NULL:
            return -1
        self._t = t
        self._cap *= 2
        self._bits += 1
        return 0

    cdef Entry* _find_or_insert(self, uint64_t k) noexcept nogil:
        """The entry for ``k``; a new one has val 0 for the caller to fill. NULL on OOM."""
        cdef uint64_t mask, i
        if (self._used + 1) * 4 > self._cap * 3 and self._grow() < 0:
            return NULL
        mask = self._cap - 1
        i = probe(self._t, mask, self._home(k), k)
        if self._t[i].val == 0:
            self._t[i].key = k
            self._used += 1
        return &self._t[i]

    cdef void _delete_entry(self, Entry* ent) noexcept nogil:
        delete_at(self._t, self._cap - 1, 64 - self._bits, ent - self._t)
        self._used -= 1

    # -- spilled worker sets -----------------------------------------------

    cdef long _set_new(self, uint64_t a, uint64_t b) noexcept nogil:
        """A new set holding residencies a and b (any order); its id, or -1 on OOM."""
        cdef uint32_t sid
        cdef uint64_t* s
        if self._nset_free:
            self._nset_free -= 1
            sid = self._set_free[self._nset_free]
        else:
            if self._nsets == self._sets_cap and self._grow_sets() < 0:
                return -1
            sid = self._nsets
            self._nsets += 1
            self._sets[sid] = NULL
        if self._nspare:
            self._nspare -= 1
            s = self._spare[self._nspare]
        else:
            s = <uint64_t*>malloc((1 + SET_MIN) * sizeof(uint64_t))
        if s == NULL:
            self._set_free_id(sid)
            return -1
        s[0] = 2 | (<uint64_t>SET_MIN << 32)
        if res_slot(a) < res_slot(b):
            s[1] = a
            s[2] = b
        else:
            s[1] = b
            s[2] = a
        self._sets[sid] = s
        return sid

    cdef void _recycle(self, uint64_t* s) noexcept nogil:
        cdef uint64_t** spare
        if set_cap(s) == SET_MIN:
            if self._nspare == self._spare_cap and self._spare_cap < SPARE_MAX:
                spare = <uint64_t**>realloc(
                    self._spare, (self._spare_cap * 2 + 16) * sizeof(uint64_t*)
                )
                if spare != NULL:
                    self._spare = spare
                    self._spare_cap = self._spare_cap * 2 + 16
            if self._nspare < self._spare_cap:
                self._spare[self._nspare] = s
                self._nspare += 1
                return
        free(s)

    cdef int _grow_sets(self) noexcept nogil:
        """Double the room for set ids (and for free ids, never more than set ids)."""
        cdef uint32_t cap = self._sets_cap * 2 if self._sets_cap else 64
        cdef uint64_t** sets
        cdef uint32_t* free_ids
        if self._sets_cap >= 0x7FFFFFFFu:
            return -1
        sets = <uint64_t**>realloc(self._sets, cap * sizeof(uint64_t*))
        if sets == NULL:
            return -1
        self._sets = sets
        free_ids = <uint32_t*>realloc(self._set_free, cap * sizeof(uint32_t))
        if free_ids == NULL:
            return -1
        self._set_free = free_ids
        self._sets_cap = cap
        return 0

    cdef inline void _prefetch_set(self, uint64_t v) noexcept nogil:
        """Prefetch the worker set that residency word ``v`` names, if it names one.

        Callers pass the word in a key's home slot half a prefetch distance
        ahead: a guess (no probe), right for most keys. Branch-free, since
        whether a block spilled is a coin toss: a word that names no set
        prefetches set 0, a harmless hit.
        """
        if self._sets != NULL:
            KVR_PREFETCH(self._sets[(v & 0xFFFFFFFFu) & (<uint64_t>0 - (v >> 63))])

    cdef void _set_free_id(self, uint32_t sid) noexcept nogil:
        self._set_free[self._nset_free] = sid
        self._nset_free += 1
        self._sets[sid] = NULL

    cdef inline uint64_t* _set_find(self, uint64_t* s, uint32_t slot) noexcept nogil:
        """Pointer to ``slot``'s residency in set ``s``, or NULL."""
        cdef uint32_t n = set_len(s), lo = 0, hi, mid, x
        cdef uint64_t* it = set_items(s)
        if n <= SMALL_SET:
            for lo in range(n):
                if res_slot(it[lo]) == slot:
                    return &it[lo]
            return NULL
        hi = n
        while lo < hi:
            mid = (lo + hi) >> 1
            x = res_slot(it[mid])
            if x < slot:
                lo = mid + 1
            elif x > slot:
                hi = mid
            else:
                return &it[mid]
        return NULL

    cdef int _set_insert(self, Entry* ent, uint64_t r) noexcept nogil:
        """Insert residency ``r`` (its slot absent) into the set of ``ent``. -1 on OOM."""
        cdef uint32_t sid = <uint32_t>(ent.val & 0xFFFFFFFFu)
        cdef uint64_t* s = self._sets[sid]
        cdef uint32_t n = set_len(s), cap = set_cap(s), pos = 0, slot = res_slot(r)
        cdef uint64_t* it
        if n == cap:
            s = <uint64_t*>realloc(s, (1 + <size_t>cap * 2) * sizeof(uint64_t))
            if s == NULL:
                return -1
            cap *= 2
            self._sets[sid] = s
        it = set_items(s)
        while pos < n and res_slot(it[pos]) < slot:
            pos += 1
        memmove(&it[pos + 1], &it[pos], (n - pos) * sizeof(uint64_t))
        it[pos] = r
        s[0] = (n + 1) | (<uint64_t>cap << 32)
        return 0

    cdef void _set_remove(self, Entry* ent, uint64_t* rp) noexcept nogil:
        """Remove the residency at ``rp`` from the set of ``ent``; inline it if one is left."""
        cdef uint32_t sid = <uint32_t>(ent.val & 0xFFFFFFFFu)
        cdef uint64_t* s = self._sets[sid]
        cdef uint32_t n = set_len(s)
        cdef uint64_t* it = set_items(s)
        cdef uint32_t pos = <uint32_t>(rp - it)
        memmove(&it[pos], &it[pos + 1], (n - pos - 1) * sizeof(uint64_t))
        n -= 1
        if n == 1:
            ent.val = it[0]
            self._recycle(s)
            self._set_free_id(sid)
        else:
            s[0] = n | (s[0] & 0xFFFFFFFF00000000ULL)

    cdef inline uint64_t* _res(self, Entry* ent, uint32_t slot) noexcept nogil:
        """Pointer to ``slot``'s residency word for block ``ent``, or NULL."""
        if ent.val & SPILL:
            return self._set_find(self._sets[ent.val & 0xFFFFFFFFu], slot)
        if res_slot(ent.val) == slot:
            return &ent.val
        return NULL

    # -- worker slots --------------------------------------------------------

    cdef int _grow_slots(self) except -1:
        cdef uint32_t cap = self._slot_cap * 2 if self._slot_cap else 16
        cdef size_t i
        if cap > SLOT_MAX + 1:
            cap = <uint32_t>(SLOT_MAX + 1)
        if cap <= self._slot_cap:
            raise OverflowError(f"too many live workers (at most {SLOT_MAX + 1})")
        if not (
            grow_array(<void**>&self._slot_worker, cap, sizeof(uint64_t))
            and grow_array(<void**>&self._slot_live, cap, sizeof(uint8_t))
            and grow_array(<void**>&self._slot_resident, cap, sizeof(uint64_t))
            and grow_array(<void**>&self._slot_handles, cap, sizeof(HMap*))
            and grow_array(<void**>&self._slot_free, cap, sizeof(uint32_t))
            and grow_array(<void**>&self._ep, cap, sizeof(uint32_t))
            and grow_array(<void**>&self._cnt, cap, sizeof(uint32_t))
            and grow_array(<void**>&self._tier_cnt, cap * 3, sizeof(uint32_t))
            and grow_array(<void**>&self._hits, cap, sizeof(uint32_t))
            and grow_array(<void**>&self._alive, cap, sizeof(uint32_t))
        ):
            raise MemoryError()
        for i in range(self._slot_cap, cap):
            self._slot_live[i] = 0
            self._slot_resident[i] = 0
            self._slot_handles[i] = NULL
            self._ep[i] = 0
        self._slot_cap = cap
        return 0

    cdef uint32_t _slot_for(self, uint64_t worker) except? 0xFFFFFFFF:
        """The slot of ``worker``, creating it (the worker becomes known)."""
        cdef object s = self._slot_of.get(worker)
        cdef uint32_t slot
        if s is not None:
            return <uint32_t>s
        if self._nslot_free:
            self._nslot_free -= 1
            slot = self._slot_free[self._nslot_free]
        else:
            if self._nslots == self._slot_cap:
                self._grow_slots()
            slot = self._nslots
            self._nslots += 1
        self._slot_worker[slot] = worker
        self._slot_live[slot] = 1
        self._slot_resident[slot] = 0
        self._slot_handles[slot] = NULL
        if hm_put(self._slot_map, worker, <uint64_t>slot + 1) < 0:
            raise MemoryError()
        self._slot_of[worker] = slot
        return slot

    # -- residency changes ---------------------------------------------------

    cdef int _store_one(self, uint64_t k, uint32_t slot, int tier, int has_e, uint64_t e) noexcept nogil:
        """Add one copy of ``k`` on ``slot``; -1 on OOM (nothing half-done)."""
        cdef Entry* ent = self._find_or_insert(k)
        cdef uint64_t* rp
        cdef uint64_t r, old
        cdef long sid
        cdef HMap* hm
        cdef uint64_t one = (<uint64_t>1) << (tier * COUNT_BITS)
        cdef uint64_t fresh = one | (<uint64_t>slot << SLOT_SHIFT)
        if ent == NULL:
            return -1
        if ent.val == 0:
            ent.val = fresh
            rp = &ent.val
            self._slot_resident[slot] += 1
        else:
            rp = self._res(ent, slot)
            if rp == NULL:
                if ent.val & SPILL:
                    if self._set_insert(ent, fresh) < 0:
                        return -1
                else:
                    sid = self._set_new(ent.val, fresh)
                    if sid < 0:
                        return -1
                    ent.val = SPILL | <uint64_t>sid
                rp = self._res(ent, slot)
                self._slot_resident[slot] += 1
            elif res_count(rp[0], tier) == COUNT_MAX:
                self._saturated += 1
            else:
                rp[0] += one
        if has_e:
            hm = self._slot_handles[slot]
            if hm == NULL:
                hm = self._slot_handles[slot] = hm_new()
                if hm == NULL:
                    return -1
            if not hm_get(hm, e, &old) or old != k:
                if hm_put(hm, e, k) < 0:
                    return -1
                r = rp[0]
                if res_hc(r) < 2:
                    rp[0] = r + ((<uint64_t>1) << HC_SHIFT)
        return 0

    cdef void _drop(self, Entry* ent, uint64_t* rp, uint32_t slot, int via_handle, uint64_t e) noexcept nogil:
        """Remove residency ``rp`` of block ``ent`` entirely, with its handles."""
        cdef uint64_t k = ent.key
        cdef uint64_t hc = res_hc(rp[0])
        if ent.val & SPILL:
            self._set_remove(ent, rp)
        else:
            self._delete_entry(ent)
        self._slot_resident[slot] -= 1
        if hc:
            if via_handle and hc == 1:
                hm_del(self._slot_handles[slot], e)
            else:
                hm_del_values(self._slot_handles[slot], k)

    cdef uint64_t _remove_keys(
        self, const uint64_t* ids, size_t n, uint32_t slot, int tier
    ) noexcept nogil:
        """``_remove_run`` for kvroute keys, the hot path of an eviction stream.

        The same steps as the general loop, with the common case (the block
        lives on this worker alone, or stays) inline and the table's geometry
        in locals: removal never resizes the table, and nothing the loop
        stores through can move it.
        """
        cdef Entry* t = self._t
        cdef uint64_t mask = self._cap - 1
        cdef uint32_t sh = 64 - self._bits
        cdef uint64_t one = (<uint64_t>1) << (tier * COUNT_BITS)
        cdef uint64_t tmask = COUNT_MAX << (tier * COUNT_BITS)
        cdef uint64_t unknown = 0, dropped = 0, k, v, r, h
        cdef uint64_t* rp
        cdef size_t i
        for i in range(n):
            if i + AHEAD < n:
                prefetch_slots(t, mask, (ids[i + AHEAD] * FIB) >> sh)
            if i + AHEAD // 2 < n:
                self._prefetch_set(t[(ids[i + AHEAD // 2] * FIB) >> sh].val)
            k = ids[i]
            h = probe(t, mask, (k * FIB) >> sh, k)
            v = t[h].val
            if v & SPILL:
                rp = self._set_find(self._sets[v & 0xFFFFFFFFu], slot)
                if rp == NULL or (rp[0] & tmask) == 0:
                    unknown += 1
                    continue
                r = rp[0] - one
                if r & COUNTS_MASK:
                    rp[0] = r
                else:
                    self._drop(&t[h], rp, slot, 0, k)
                continue
            # v == 0 (absent) has slot 0 and no copies: unknown below
            if res_slot(v) != slot or (v & tmask) == 0:
                unknown += 1
                continue
            r = v - one
            if r & COUNTS_MASK:
                t[h].val = r
                continue
            # The worker's last copy of a block only it holds: delete the
            # entry (as _delete_entry) and its handles.
            delete_at(t, mask, sh, h)
            dropped += 1
            if res_hc(v):
                hm_del_values(self._slot_handles[slot], k)
        self._used -= dropped
        self._slot_resident[slot] -= dropped
        return unknown

    cdef uint64_t _remove_run(
        self, const uint64_t* ids, size_t n, uint32_t slot, int engine, int tier
    ) noexcept nogil:
        cdef size_t i
        cdef uint64_t unknown = 0, k, r
        cdef uint64_t one = (<uint64_t>1) << (tier * COUNT_BITS)
        cdef Entry* ent
        cdef uint64_t* rp
        cdef HMap* hm = self._slot_handles[slot]
        if not engine:
            return self._remove_keys(ids, n, slot, tier)
        for i in range(n):
            # two dependent misses per id: prefetch the handle far ahead,
            # and the block it names (known by now) a little ahead
            if hm != NULL and i + 2 * AHEAD < n:
                KVR_PREFETCH(&hm.e[hm_home(hm, ids[i + 2 * AHEAD])])
            if i + AHEAD < n and hm_get(hm, ids[i + AHEAD], &k):
                prefetch_slots(self._t, self._cap - 1, self._home(k))
            if not hm_get(hm, ids[i], &k):
                unknown += 1
                continue
            ent = self._find(k)
            rp = NULL if ent == NULL else self._res(ent, slot)
            if rp == NULL or res_count(rp[0], tier) == 0:
                unknown += 1
                continue
            r = rp[0] - one
            if r & COUNTS_MASK:
                rp[0] = r
            else:
                self._drop(ent, rp, slot, 1, ids[i])
        return unknown

    cdef int _store_keys(self, const uint64_t* keys, size_t n, uint32_t slot, int t) noexcept nogil:
        """``_store_run`` without engine hashes, the hot path of a store stream.

        ``_store_one`` key by key, with the common cases (a new block, another
        copy on this worker) inline and the table's geometry in locals,
        refreshed when the table grows (at exactly the same points).
        """
        cdef Entry* tab = self._t
        cdef uint64_t cap = self._cap
        cdef uint64_t mask = cap - 1
        cdef uint32_t sh = 64 - self._bits
        cdef uint64_t used = self._used, added = 0
        cdef uint64_t one = (<uint64_t>1) << (t * COUNT_BITS)
        cdef uint64_t tmask = COUNT_MAX << (t * COUNT_BITS)
        cdef uint64_t fresh = one | (<uint64_t>slot << SLOT_SHIFT)
        cdef uint64_t k, v, h
        cdef uint64_t* rp
        cdef long sid
        cdef size_t i
        cdef int failed = 0
        for i in range(n):
            if i + AHEAD < n:
                prefetch_slots(tab, mask, (keys[i + AHEAD] * FIB) >> sh)
            if (used + 1) * 4 > cap * 3:
                self._used = used
                if self._grow() < 0:
                    failed = 1
                    break
                tab = self._t
                cap = self._cap
                mask = cap - 1
                sh = 64 - self._bits
            k = keys[i]
            h = probe(tab, mask, (k * FIB) >> sh, k)
            v = tab[h].val
            if v == 0:
                tab[h].key = k
                tab[h].val = fresh
                used += 1
                added += 1
            elif v & SPILL:
                rp = self._set_find(self._sets[v & 0xFFFFFFFFu], slot)
                if rp == NULL:
                    if self._set_insert(&tab[h], fresh) < 0:
                        failed = 1
                        break
                    added += 1
                elif (rp[0] & tmask) == tmask:
                    self._saturated += 1
                else:
                    rp[0] += one
            elif res_slot(v) == slot:
                if (v & tmask) == tmask:
                    self._saturated += 1
                else:
                    tab[h].val = v + one
            else:
                sid = self._set_new(v, fresh)
                if sid < 0:
                    failed = 1
                    break
                tab[h].val = SPILL | <uint64_t>sid
                added += 1
        self._used = used
        self._slot_resident[slot] += added
        return failed

    cdef int _store_run(
        self, const uint64_t* keys, const uint64_t* eng, size_t n, uint32_t slot, int t
    ) noexcept nogil:
        cdef size_t i
        cdef HMap* hm = self._slot_handles[slot]
        if eng == NULL:
            return self._store_keys(keys, n, slot, t)
        for i in range(n):
            if i + AHEAD < n:
                prefetch_slots(self._t, self._cap - 1, self._home(keys[i + AHEAD]))
                if hm != NULL:
                    KVR_PREFETCH(&hm.e[hm_home(hm, eng[i + AHEAD])])
            if self._store_one(keys[i], slot, t, 1, eng[i]) < 0:
                return 1
        return 0

    # -- public API --------------------------------------------------------

    def store(self, worker, hashes, parent=None, *, tier="device", engine_hashes=None):
        """Record that ``worker`` now holds one more copy of each block in ``hashes``.

        See :meth:`kvroute._index_py.BlockIndex.store`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef Py_buffer kb, eb
        cdef uint64_t p = 0
        cdef int t, failed = 0
        cdef uint32_t slot
        cdef size_t n
        cdef const uint64_t* eng = NULL
        cdef Entry* pe
        cdef bint has_eb = False
        get_keys(hashes, "hashes", &kb)
        try:
            n = <size_t>kb.shape[0]
            if parent is not None:
                p = as_u64(parent, "parent")
            t = _tier(tier)
            if engine_hashes is not None:
                get_keys(engine_hashes, "engine_hashes", &eb)
                has_eb = True
                if <size_t>eb.shape[0] != n:
                    raise ValueError(
                        f"engine_hashes has {eb.shape[0]} items but hashes has {n}"
                    )
                eng = <const uint64_t*>eb.buf
            self._acquire()
            try:
                slot = self._slot_for(w)
                if parent is not None:
                    pe = self._find(p)
                    if pe == NULL or self._res(pe, slot) == NULL:
                        self._orphans += 1
                if n >= NOGIL_MIN:
                    with nogil:
                        failed = self._store_run(<const uint64_t*>kb.buf, eng, n, slot, t)
                else:
                    failed = self._store_run(<const uint64_t*>kb.buf, eng, n, slot, t)
            finally:
                self._release()
        finally:
            PyBuffer_Release(&kb)
            if has_eb:
                PyBuffer_Release(&eb)
        if failed:
            raise MemoryError("BlockIndex.store: out of memory; the batch was partly applied")

    def remove(self, worker, hashes, *, engine=False, tier="device"):
        """Remove one copy of each block from ``worker``'s ``tier``; returns how many were unknown.

        See :meth:`kvroute._index_py.BlockIndex.remove`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef Py_buffer kb
        cdef int t, eng = bool(engine)
        cdef uint64_t unknown
        cdef size_t n
        cdef object s
        cdef uint32_t slot
        get_keys(hashes, "hashes", &kb)
        try:
            n = <size_t>kb.shape[0]
            t = _tier(tier)
            self._acquire()
            try:
                s = self._slot_of.get(w)
                if s is None:
                    unknown = n
                else:
                    slot = s
                    if n >= NOGIL_MIN:
                        with nogil:
                            unknown = self._remove_run(<const uint64_t*>kb.buf, n, slot, eng, t)
                    else:
                        unknown = self._remove_run(<const uint64_t*>kb.buf, n, slot, eng, t)
                self._unknown += unknown
            finally:
                self._release()
        finally:
            PyBuffer_Release(&kb)
        return unknown

    cdef uint64_t _clear_slot(self, uint32_t slot) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t n = self._slot_resident[slot], j = 0, i
        cdef uint64_t* keys
        cdef Entry* ent
        cdef uint64_t* rp
        if n:
            keys = <uint64_t*>malloc(n * sizeof(uint64_t))
            if keys == NULL:
                raise MemoryError()
            # Collect first: deleting while scanning would let backward shifts
            # move unvisited entries behind the scan.
            with nogil:
                for i in range(self._cap):
                    if self._t[i].val != 0 and self._res(&self._t[i], slot) != NULL:
                        keys[j] = self._t[i].key
                        j += 1
                for i in range(j):
                    ent = self._find(keys[i])
                    rp = self._res(ent, slot)
                    if ent.val & SPILL:
                        self._set_remove(ent, rp)
                    else:
                        self._delete_entry(ent)
            free(keys)
        self._slot_resident[slot] = 0
        hm_free(self._slot_handles[slot])
        self._slot_handles[slot] = NULL
        return n

    def clear(self, worker):
        """Drop every block ``worker`` holds; it stays known. Returns the number dropped.

        See :meth:`kvroute._index_py.BlockIndex.clear`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef object s
        self._acquire()
        try:
            s = self._slot_of.get(w)
            return 0 if s is None else self._clear_slot(s)
        finally:
            self._release()

    def remove_worker(self, worker):
        """Drop ``worker`` and every block it holds. Returns the number dropped.

        See :meth:`kvroute._index_py.BlockIndex.remove_worker`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        self._acquire()
        try:
            return self._drop_worker_locked(w)
        finally:
            self._release()

    # -- snapshots -----------------------------------------------------------

    def dump(self):
        """The whole index as bytes, for :meth:`load`.

        See :meth:`kvroute._index_py.BlockIndex.dump`. Written straight into
        the bytes object, in one pass (``kvroute._dump``'s format, little-endian).
        """
        cdef uint64_t nres = 0, nh = 0, nw, i, j, k, r, v, total
        cdef uint32_t slot, n
        cdef uint64_t* s
        cdef HMap* hm
        cdef char* buf
        cdef char* p_rk
        cdef char* p_rw
        cdef char* p_hw
        cdef char* p_he
        cdef char* p_hk
        cdef char* p_rc
        self._acquire()
        try:
            for slot in range(self._nslots):
                if self._slot_live[slot]:
                    nres += self._slot_resident[slot]
                    hm = self._slot_handles[slot]
                    if hm != NULL:
                        nh += hm.used + hm.has_zero
            workers = sorted(self._slot_of)
            nw = len(workers)
            total = 40 + 8 * (nw + 2 * nres + 3 * nh) + 6 * nres
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>total)
            buf = PyBytes_AS_STRING(out)
            memcpy(buf, <const char*>_DUMP_MAGIC, 8)
            _put64(buf + 8, nw)
            _put64(buf + 16, nres)
            _put64(buf + 24, nh)
            _put64(buf + 32, 0)
            for i in range(nw):
                _put64(buf + 40 + 8 * i, <uint64_t>workers[i])
            p_rk = buf + 40 + 8 * nw
            p_rw = p_rk + 8 * nres
            p_hw = p_rw + 8 * nres
            p_he = p_hw + 8 * nh
            p_hk = p_he + 8 * nh
            p_rc = p_hk + 8 * nh
            with nogil:
                j = 0
                for i in range(self._cap):
                    v = self._t[i].val
                    if v == 0:
                        continue
                    k = self._t[i].key
                    if v & SPILL:
                        s = self._sets[v & 0xFFFFFFFFu]
                        for n in range(set_len(s)):
                            r = set_items(s)[n]
                            _put_res(p_rk, p_rw, p_rc, j, k, self._slot_worker[res_slot(r)], r)
                            j += 1
                    else:
                        _put_res(p_rk, p_rw, p_rc, j, k, self._slot_worker[res_slot(v)], v)
                        j += 1
                j = 0
                for slot in range(self._nslots):
                    hm = self._slot_handles[slot]
                    if hm == NULL or not self._slot_live[slot]:
                        continue
                    if hm.has_zero:
                        _put64(p_hw + 8 * j, self._slot_worker[slot])
                        _put64(p_he + 8 * j, 0)
                        _put64(p_hk + 8 * j, hm.zero_val)
                        j += 1
                    for i in range(hm.cap):
                        if hm.e[i].key != 0:
                            _put64(p_hw + 8 * j, self._slot_worker[slot])
                            _put64(p_he + 8 * j, hm.e[i].key)
                            _put64(p_hk + 8 * j, hm.e[i].val)
                            j += 1
        finally:
            self._release()
        return out

    def load(self, data):
        """Fill this index, which must know no worker yet, from a :meth:`dump`.

        See :meth:`kvroute._index_py.BlockIndex.load`.
        """
        cdef const uint64_t[::1] rk, hw, he, hk
        cdef const uint32_t[::1] rslot, hslot
        cdef const uint16_t[:, ::1] rc
        cdef size_t i, nr, nh
        cdef uint64_t word, old
        cdef uint32_t slot
        cdef Entry* ent
        cdef uint64_t* rp
        cdef HMap* hm
        cdef long sid
        cdef int bad = 0       # 1: a residency twice, 2: a handle to a block its worker lacks, 3: OOM
        cdef uint64_t bad_key = 0, bad_worker = 0
        d = _dump_unpack(data)
        self._acquire()
        try:
            if self._slot_of:
                raise ValueError("load() needs an empty index (one that knows no worker)")
            workers = d.workers.tolist()
            for w in workers:
                self._slot_for(w)
            slots = np.array([self._slot_of[w] for w in workers], np.uint32)
            try:
                rpos, hpos = _dump_positions(d)
            except ValueError:
                for w in workers:
                    self._drop_worker_locked(w)
                raise
            rslot = slots[rpos]
            d_hslot = slots[hpos]
            hslot = d_hslot
            rk = np.ascontiguousarray(d.res_keys)
            rc = np.ascontiguousarray(d.res_counts)
            hw = np.ascontiguousarray(d.handle_workers)
            he = np.ascontiguousarray(d.handle_engine)
            hk = np.ascontiguousarray(d.handle_keys)
            nr = rk.shape[0]
            nh = hk.shape[0]
            # A dump lists blocks in table order, i.e. sorted by home slot. Inserted
            # in that order into a table that grows on the way, linear probing
            # piles them into ever longer runs (quadratic); into a table already
            # as large as the original (or larger), they fall where they were.
            # The handle maps likewise.
            while nr * 4 > self._cap * 3:
                if self._grow() < 0:
                    raise MemoryError("BlockIndex.load: out of memory")
            per_slot = np.bincount(d_hslot, minlength=self._nslots) if nh else []
            for slot in range(len(per_slot)):
                if per_slot[slot]:
                    hm = self._slot_handles[slot] = hm_new()
                    while hm != NULL and <uint64_t>per_slot[slot] * 4 > hm.cap * 3:
                        if hm_grow(hm) < 0:
                            break
                    if hm == NULL or <uint64_t>per_slot[slot] * 4 > hm.cap * 3:
                        for w in workers:
                            self._drop_worker_locked(w)
                        raise MemoryError("BlockIndex.load: out of memory")
            with nogil:
                for i in range(nr):
                    slot = rslot[i]
                    word = (<uint64_t>rc[i, 0] | (<uint64_t>rc[i, 1] << COUNT_BITS)
                            | (<uint64_t>rc[i, 2] << (2 * COUNT_BITS))
                            | (<uint64_t>slot << SLOT_SHIFT))
                    ent = self._find_or_insert(rk[i])
                    if ent == NULL:
                        bad = 3
                        break
                    if ent.val == 0:
                        ent.val = word
                    elif self._res(ent, slot) != NULL:
                        bad = 1
                        bad_key = rk[i]
                        bad_worker = self._slot_worker[slot]
                        break
                    elif ent.val & SPILL:
                        if self._set_insert(ent, word) < 0:
                            bad = 3
                            break
                    else:
                        sid = self._set_new(ent.val, word)
                        if sid < 0:
                            bad = 3
                            break
                        ent.val = SPILL | <uint64_t>sid
                    self._slot_resident[slot] += 1
                if not bad:
                    for i in range(nh):
                        slot = hslot[i]
                        ent = self._find(hk[i])
                        rp = NULL if ent == NULL else self._res(ent, slot)
                        if rp == NULL:
                            bad = 2
                            bad_key = hk[i]
                            bad_worker = hw[i]
                            break
                        hm = self._slot_handles[slot]
                        if hm == NULL:
                            hm = self._slot_handles[slot] = hm_new()
                            if hm == NULL:
                                bad = 3
                                break
                        if not hm_get(hm, he[i], &old) or old != hk[i]:
                            if hm_put(hm, he[i], hk[i]) < 0:
                                bad = 3
                                break
                            if res_hc(rp[0]) < 2:
                                rp[0] += (<uint64_t>1) << HC_SHIFT
            if bad:
                for w in workers:
                    self._drop_worker_locked(w)
                if bad == 3:
                    raise MemoryError("BlockIndex.load: out of memory")
                if bad == 1:
                    raise ValueError(
                        f"a BlockIndex dump names block {bad_key} on worker {bad_worker} twice"
                    )
                raise ValueError(
                    f"a BlockIndex dump has a handle of {bad_worker} to a block it lacks"
                )
        finally:
            self._release()

    cdef uint64_t _drop_worker_locked(self, uint64_t w) except? 0xFFFFFFFFFFFFFFFF:
        """``remove_worker`` with the lock held."""
        cdef object s = self._slot_of.get(w)
        cdef uint32_t slot
        cdef uint64_t n
        if s is None:
            return 0
        slot = s
        n = self._clear_slot(slot)
        del self._slot_of[w]
        hm_del(self._slot_map, w)
        self._slot_live[slot] = 0
        self._slot_free[self._nslot_free] = slot
        self._nslot_free += 1
        return n

    cdef uint32_t _match_run(self, const uint64_t* keys, size_t n, int tiers) noexcept nogil:
        """Walk ``keys``; leave counts in _cnt (and _tier_cnt) for the slots in _hits.

        ``_alive[:na]`` holds the workers that held every block so far. A
        block's holders are scanned when the set is small next to the race,
        and the survivors are looked up in it (bisection) when the race has
        thinned out: a long shared prefix on hundreds of workers followed by
        a branch only a few of them took.
        """
        cdef size_t i
        cdef uint32_t nhits = 0, na, nb, j, m, slot, e, prev_m, lag
        cdef int same
        cdef Entry* ent
        cdef uint64_t* it
        cdef uint64_t* prev
        cdef uint64_t* st = NULL
        cdef uint64_t* rp
        cdef uint64_t r
        if n == 0:
            return 0
        ent = self._find(keys[0])
        if ent == NULL:
            return 0
        self._epoch += 1
        if self._epoch == 0:      # wrapped: forget every stale stamp
            memset(self._ep, 0, self._slot_cap * sizeof(uint32_t))
            self._epoch = 1
        e = self._epoch
        if ent.val & SPILL:
            st = self._sets[ent.val & 0xFFFFFFFFu]
            it = set_items(st)
            m = set_len(st)
        else:
            it = &ent.val
            m = 1
        for j in range(m):
            r = it[j]
            slot = res_slot(r)
            self._ep[slot] = e
            self._cnt[slot] = 1
            if tiers:
                self._tier_cnt[3 * slot] = 0
                self._tier_cnt[3 * slot + 1] = 0
                self._tier_cnt[3 * slot + 2] = 0
                self._tier_cnt[3 * slot + res_fastest(r)] = 1
            self._hits[j] = slot
            self._alive[j] = slot
        nhits = na = m
        # A run of blocks with word-for-word the same holders as the block
        # before, all of them still in the race (a shared system prompt), just
        # extends everyone's count: it is tallied in ``lag`` with one memcmp
        # per block, and credited when the run ends.
        same = 1
        prev = it
        prev_m = m
        lag = 0
        for i in range(1, n):
            if i + AHEAD < n:
                prefetch_slots(self._t, self._cap - 1, self._home(keys[i + AHEAD]))
            ent = self._find(keys[i])
            if ent == NULL:
                break
            if ent.val & SPILL:
                st = self._sets[ent.val & 0xFFFFFFFFu]
                it = set_items(st)
                m = set_len(st)
            else:
                it = &ent.val
                m = 1
            if same and m == prev_m and memcmp(it, prev, m * sizeof(uint64_t)) == 0:
                lag += 1
                prev = it
                continue
            if lag:
                self._credit(prev, prev_m, lag, tiers)
                lag = 0
            nb = 0
            if m > SMALL_SET and na * 8 < m:
                for j in range(na):
                    slot = self._alive[j]
                    rp = self._set_find(st, slot)
                    if rp != NULL:
                        self._cnt[slot] = <uint32_t>(i + 1)
                        if tiers:
                            self._tier_cnt[3 * slot + res_fastest(rp[0])] += 1
                        self._alive[nb] = slot
                        nb += 1
            else:
                for j in range(m):
                    r = it[j]
                    slot = res_slot(r)
                    if self._ep[slot] == e and self._cnt[slot] == i:
                        self._cnt[slot] = <uint32_t>(i + 1)
                        if tiers:
                            self._tier_cnt[3 * slot + res_fastest(r)] += 1
                for j in range(na):
                    slot = self._alive[j]
                    if self._cnt[slot] == i + 1:
                        self._alive[nb] = slot
                        nb += 1
            # every holder of this block is still racing: the race is its holders
            same = nb == m
            prev = it
            prev_m = m
            na = nb
            if na == 0:
                break
        if lag:
            self._credit(prev, prev_m, lag, tiers)
        return nhits

    cdef inline void _credit(self, uint64_t* words, uint32_t m, uint32_t lag, int tiers) noexcept nogil:
        """Credit ``lag`` more blocks to each holder in ``words`` (a run's holders)."""
        cdef uint32_t j, slot
        for j in range(m):
            slot = res_slot(words[j])
            self._cnt[slot] += lag
            if tiers:
                self._tier_cnt[3 * slot + res_fastest(words[j])] += lag

    cdef uint32_t _match_locked(self, Py_buffer* kb, int tiers):
        cdef size_t n = <size_t>kb.shape[0]
        cdef const uint64_t* keys = <const uint64_t*>kb.buf
        if n >= NOGIL_MIN:
            with nogil:
                return self._match_run(keys, n, tiers)
        return self._match_run(keys, n, tiers)

    cdef dict _match_dict(self, object hashes, int tiers):
        """``match`` (tiers=0) or ``match_tiers`` (tiers=1) as the twin returns it."""
        cdef Py_buffer kb
        cdef uint32_t nhits, j, slot
        cdef dict out = {}
        get_keys(hashes, "hashes", &kb)
        try:
            self._acquire()
            try:
                nhits = self._match_locked(&kb, tiers)
                for j in range(nhits):
                    slot = self._hits[j]
                    if tiers:
                        out[self._slot_worker[slot]] = (
                            self._tier_cnt[3 * slot],
                            self._tier_cnt[3 * slot + 1],
                            self._tier_cnt[3 * slot + 2],
                        )
                    else:
                        out[self._slot_worker[slot]] = self._cnt[slot]
            finally:
                self._release()
        finally:
            PyBuffer_Release(&kb)
        return out

    def match(self, hashes):
        """Per worker, how many leading blocks of ``hashes`` it holds (any tier).

        See :meth:`kvroute._index_py.BlockIndex.match`.
        """
        return self._match_dict(hashes, 0)

    def match_tiers(self, hashes):
        """Per worker, its matched prefix split by the fastest tier holding each block.

        See :meth:`kvroute._index_py.BlockIndex.match_tiers`.
        """
        return self._match_dict(hashes, 1)

    def match_array(self, hashes, workers):
        """For each id in ``workers``, how many leading blocks of ``hashes`` it holds.

        See :meth:`kvroute._index_py.BlockIndex.match_array`.
        """
        cdef Py_buffer kb, wb
        cdef uint32_t nhits
        cdef size_t j, nw
        cdef const uint64_t* ids
        cdef uint64_t slot
        cdef uint32_t[::1] out
        get_hashes_and_workers(hashes, &kb, workers, &wb)
        try:
            nw = <size_t>wb.shape[0]
            result = np.zeros(nw, dtype=np.uint32)
            out = result
            ids = <const uint64_t*>wb.buf
            self._acquire()
            try:
                nhits = self._match_locked(&kb, 0)
                if nhits:
                    for j in range(nw):
                        if hm_get(self._slot_map, ids[j], &slot):
                            slot -= 1
                            if self._ep[slot] == self._epoch:
                                out[j] = self._cnt[slot]
            finally:
                self._release()
        finally:
            PyBuffer_Release(&kb)
            PyBuffer_Release(&wb)
        return result

    def match_tiers_array(self, hashes, workers):
        """For each id in ``workers``, its matched prefix per tier: rows device, host, disk.

        See :meth:`kvroute._index_py.BlockIndex.match_tiers_array`.
        """
        cdef Py_buffer kb, wb
        cdef uint32_t nhits
        cdef size_t j, nw
        cdef const uint64_t* ids
        cdef uint64_t slot
        cdef uint32_t[:, ::1] out
        get_hashes_and_workers(hashes, &kb, workers, &wb)
        try:
            nw = <size_t>wb.shape[0]
            result = np.zeros((3, nw), dtype=np.uint32)
            out = result
            ids = <const uint64_t*>wb.buf
            self._acquire()
            try:
                nhits = self._match_locked(&kb, 1)
                if nhits:
                    for j in range(nw):
                        if hm_get(self._slot_map, ids[j], &slot):
                            slot -= 1
                            if self._ep[slot] == self._epoch:
                                out[0, j] = self._tier_cnt[3 * slot]
                                out[1, j] = self._tier_cnt[3 * slot + 1]
                                out[2, j] = self._tier_cnt[3 * slot + 2]
            finally:
                self._release()
        finally:
            PyBuffer_Release(&kb)
            PyBuffer_Release(&wb)
        return result

    def resolve(self, worker, engine_hash):
        """The kvroute key that ``worker``'s engine hash names, or None if it names none.

        See :meth:`kvroute._index_py.BlockIndex.resolve`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef uint64_t h = as_u64(engine_hash, "engine_hash")
        cdef uint64_t k = 0
        cdef int found = 0
        self._acquire()
        try:
            s = self._slot_of.get(w)
            if s is not None:
                found = hm_get(self._slot_handles[<uint32_t>s], h, &k)
        finally:
            self._release()
        return k if found else None

    def workers(self):
        """Known workers (those that stored anything and were not removed), ascending."""
        self._acquire()
        try:
            return sorted(self._slot_of)
        finally:
            self._release()

    def worker_len(self, worker):
        """Number of distinct blocks ``worker`` holds (0 for an unknown worker)."""
        cdef uint64_t w = as_u64(worker, "worker")
        self._acquire()
        try:
            s = self._slot_of.get(w)
            return 0 if s is None else self._slot_resident[<uint32_t>s]
        finally:
            self._release()

    def residencies(self):
        """Number of (block, worker) pairs: the sum of ``worker_len`` over workers."""
        cdef uint64_t total = 0
        cdef uint32_t i
        self._acquire()
        try:
            for i in range(self._nslots):
                total += self._slot_resident[i]
        finally:
            self._release()
        return total

    def stats(self):
        """Counters: ``unknown_removals``, ``orphan_stores``, ``saturated``."""
        return {
            "unknown_removals": self._unknown,
            "orphan_stores": self._orphans,
            "saturated": self._saturated,
        }

    def __len__(self):
        """Number of distinct blocks held by at least one worker."""
        return self._used

    def sizeof(self):
        """Bytes owned by the index: tables, worker sets, handles and per-worker arrays."""
        cdef size_t total = sizeof(Entry) * self._cap
        cdef uint32_t i
        self._acquire()
        try:
            total += self._sets_cap * (sizeof(uint64_t*) + sizeof(uint32_t))
            total += self._spare_cap * sizeof(uint64_t*) + self._nspare * (1 + SET_MIN) * 8
            for i in range(self._nsets):
                if self._sets[i] != NULL:
                    total += (1 + set_cap(self._sets[i])) * sizeof(uint64_t)
            # per slot: worker, live, resident, handles ptr, free, ep, cnt, 3 tier
            # counts, hits, alive
            total += self._slot_cap * (8 + 1 + 8 + 8 + 4 + 4 + 4 + 12 + 4 + 4)
            for i in range(self._nslots):
                total += hm_sizeof(self._slot_handles[i])
            total += hm_sizeof(self._slot_map)
        finally:
            self._release()
        return total

    def _check(self):
        """Check every invariant; raise AssertionError on the first broken one. O(n)."""
        cdef uint64_t i, j, mask = self._cap - 1, used = 0, home, h
        cdef uint64_t* s
        cdef uint64_t r, prev
        cdef uint32_t n, sid
        cdef HMap* hm
        self._acquire()
        try:
            resident = [0] * self._nslots
            live_sets = set()
            for i in range(self._cap):
                if self._t[i].val == 0:
                    continue
                used += 1
                # linear probing: no empty entry between the home and the entry
                home = self._home(self._t[i].key)
                j = home
                while j != i:
                    assert self._t[j].val != 0, f"hole in the probe run of {self._t[i].key}"
                    j = (j + 1) & mask
                assert self._find(self._t[i].key) == &self._t[i], "duplicate key"
                if self._t[i].val & SPILL:
                    sid = <uint32_t>(self._t[i].val & 0xFFFFFFFFu)
                    assert sid < self._nsets and self._sets[sid] != NULL, "dangling set"
                    assert sid not in live_sets, "set shared by two blocks"
                    live_sets.add(sid)
                    s = self._sets[sid]
                    n = set_len(s)
                    assert 2 <= n <= set_cap(s), f"set of {n} residencies"
                    for j in range(n):
                        r = set_items(s)[j]
                        if j:
                            assert res_slot(prev) < res_slot(r), "set not sorted by slot"
                        prev = r
                        self._check_res(r, resident)
                else:
                    self._check_res(self._t[i].val, resident)
            assert used == self._used, "entry count is off"
            for i in range(self._nslots):
                assert resident[i] == self._slot_resident[i], "per-worker residency count off"
            free_sets = {self._set_free[i] for i in range(self._nset_free)}
            assert len(free_sets) == self._nset_free
            assert live_sets.isdisjoint(free_sets)
            assert len(live_sets) + len(free_sets) == self._nsets, "leaked worker set"
            assert len(self._slot_of) + self._nslot_free == self._nslots, "leaked worker slot"
            assert self._slot_map.used + self._slot_map.has_zero == len(self._slot_of)
            for w, slot in self._slot_of.items():
                assert self._slot_live[slot] and self._slot_worker[slot] == w
                assert hm_get(self._slot_map, w, &h) and h == slot + 1, "slot map is off"
            for i in range(self._nslot_free):
                assert not self._slot_live[self._slot_free[i]], "free slot is live"
            for i in range(self._nslots):
                hm = self._slot_handles[i]
                if hm == NULL:
                    continue
                assert self._slot_live[i], "handles of a removed worker"
                handles_of = {}
                if hm.has_zero:
                    handles_of[hm.zero_val] = handles_of.get(hm.zero_val, 0) + 1
                for j in range(hm.cap):
                    if hm.e[j].key != 0:
                        h = hm.e[j].val
                        handles_of[h] = handles_of.get(h, 0) + 1
                for k, count in handles_of.items():
                    ent = self._find(k)
                    assert ent != NULL, f"handle names dropped block {k}"
                    rp = self._res(ent, <uint32_t>i)
                    assert rp != NULL, f"handle names block {k} the worker dropped"
                    assert res_hc(rp[0]) >= min(count, 2), "handle count too low"
        finally:
            self._release()

    cdef _check_res(self, uint64_t r, list resident):
        cdef uint32_t slot = res_slot(r)
        assert r & COUNTS_MASK, "residency with no copies"
        assert slot < self._nslots and self._slot_live[slot], "residency of a dead slot"
        resident[slot] += 1

    def __repr__(self):
        return (
            f"<BlockIndex blocks={len(self)} residencies={self.residencies()}"
            f" workers={len(self._slot_of)}>"
        )




cdef inline void _put64(char* p, uint64_t v) noexcept nogil:
    # little-endian whatever the host (compilers make it one store on x86 / arm64)
    cdef int b
    for b in range(8):
        p[b] = <char>((v >> (8 * b)) & 0xFF)


cdef inline void _put_res(char* rk, char* rw, char* rc, uint64_t j, uint64_t key,
                          uint64_t worker, uint64_t r) noexcept nogil:
    cdef int t
    cdef uint64_t c
    _put64(rk + 8 * j, key)
    _put64(rw + 8 * j, worker)
    for t in range(3):
        c = res_count(r, t)
        rc[6 * j + 2 * t] = <char>(c & 0xFF)
        rc[6 * j + 2 * t + 1] = <char>(c >> 8)


cdef inline int _tier(object tier) except -1:
    # Identity first: callers pass the interned literals nearly always.
    if tier is "device":
        return 0
    return tier_index(tier)
