# The router's compiled kernels. kvroute/_route_py.py is their specification:
# same names, signatures, results and errors. Everything here exists for speed;
# behaviour lives in the twin's docstrings.
#
# ActivePrefixes: a radix tree of the prompts in flight
# ------------------------------------------------------
# Every prompt in flight (on any worker) is a path from the root. A node owns
# a run of keys, depths [lo, hi), copied into its own buffer; its children are
# found by (node, first key of the child) in one open-addressing table and
# are also linked as siblings (to find an only child, and to walk the tree).
# Per node and per worker slot it counts the prompts that contain the run
# ("through") and those that end at its last block ("ending"). The tree is
# kept compressed: a node that no prompt ends at has zero or several children,
# never one, so its shape depends only on the prompts in flight.
#
# A worker's active blocks are the runs of the nodes it goes through, so
# * the blocks of a new prompt already active on worker w are the depth
#   reached by the walk in the deepest node w goes through (children's worker
#   sets are subsets of their parent's): one walk gives every worker's answer;
# * add and remove change w's count by the prompt's length minus that depth,
#   measured before the add or after the remove.
# A walk compares each key of the prompt once (a linear scan per run), and
# touches the nodes on its path, so add / remove / match cost O(prompt length)
# sequential reads plus O(nodes on the path + their worker entries), with no
# per-block hashing: the previous design stored and removed every prompt block
# in a reference-counted BlockIndex, ~25 ns a block each way.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from cpython.buffer cimport (
    PyBUF_ANY_CONTIGUOUS, PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_RECORDS_RO, PyBUF_WRITABLE, PyBuffer_IsContiguous,
    PyBuffer_Release, PyObject_GetBuffer,
)
from libc.math cimport INFINITY, fabs

from ._buffers cimport as_u64, get_hashes_and_workers, get_keys, grow_array
from ._u64map cimport HMap, hm_del, hm_free, hm_get, hm_new, hm_put, hm_sizeof

from collections import deque
from collections.abc import Mapping

import numpy as np



__all__ = [
    "ActivePrefixes",
    "ActiveRequest",
    "FreshDecisions",
    "LoadArrays",
    "chained_common_prefix",
    "common_prefix",
    "fresh_overlay",
    "kvroute_costs",
    "kvroute_step",
    "rendezvous_pick",
    "tie_key",
]

cdef object _deque = deque
cdef object _ndarray = np.ndarray

cdef uint64_t FIB = 0x9E3779B97F4A7C15ULL
cdef uint64_t MIX = 0xBF58476D1CE4E5B9ULL

ctypedef struct WSlot:
    uint32_t slot
    uint32_t through       # this worker's prompts that contain the node's run
    uint32_t ending        # of which end at the node's last block

ctypedef struct Node:
    uint64_t* base         # owned key buffer (NULL for the root and free nodes)
    uint64_t* keys         # keys[d - lo] is the key at depth d
    uint32_t lo
    uint32_t hi
    int32_t parent         # -1: the root, or a free node
    int32_t first_child
    int32_t next_sib
    int32_t prev_sib
    uint32_t nchildren
    uint32_t through
    uint32_t ending
    WSlot* ws              # sorted by slot; entries with through > 0 only
    uint32_t nws
    uint32_t ws_cap

# (parent, first key of the child) -> child; child 0 (the root) marks a free cell
ctypedef struct CEntry:
    uint64_t key
    int32_t parent
    int32_t child

cdef inline uint64_t _mix(uint64_t key, int32_t parent) noexcept nogil:
    return (key ^ (<uint64_t><uint32_t>parent * MIX)) * FIB


cdef class ActivePrefixes:
    """The prompts of the requests in flight, per worker: their shared prefixes counted once.

    See :class:`kvroute._route_py.ActivePrefixes`.
    """

    cdef Node* _nodes
    cdef int32_t _nnodes            # ids ever allocated (high-water mark)
    cdef int32_t _nodes_cap
    cdef int32_t* _free_nodes
    cdef int32_t _nfree
    cdef CEntry* _ct
    cdef uint64_t _ct_cap
    cdef uint64_t _ct_used
    cdef uint32_t _ct_bits
    cdef HMap* _slot_map            # worker id -> slot
    cdef dict _slot_of              # worker id -> slot
    cdef uint32_t _nslots
    cdef uint32_t _slot_cap
    cdef uint64_t* _slot_worker
    cdef uint64_t* _slot_len        # distinct active blocks
    cdef uint64_t* _slot_prompts
    cdef uint32_t* _slot_free
    cdef uint32_t _nslot_free
    cdef uint32_t* _ep
    cdef uint32_t* _depth
    cdef uint32_t _epoch
    cdef int32_t* _path             # scratch: the nodes of a walk
    cdef uint32_t* _pdepth          # scratch: the depth reached in each
    cdef uint32_t _path_cap
    cdef uint64_t _prompts

    def __cinit__(self):
        self._nodes_cap = 16
        self._nodes = <Node*>malloc(16 * sizeof(Node))
        self._free_nodes = <int32_t*>malloc(16 * sizeof(int32_t))
        self._ct_bits = 6
        self._ct_cap = 64
        self._ct = <CEntry*>malloc(64 * sizeof(CEntry))
        self._slot_map = hm_new()
        self._path_cap = 64
        self._path = <int32_t*>malloc(64 * sizeof(int32_t))
        self._pdepth = <uint32_t*>malloc(64 * sizeof(uint32_t))
        if (self._nodes == NULL or self._free_nodes == NULL or self._ct == NULL
                or self._slot_map == NULL or self._path == NULL or self._pdepth == NULL):
            raise MemoryError()
        memset(self._ct, 0, 64 * sizeof(CEntry))
        memset(&self._nodes[0], 0, sizeof(Node))
        self._nodes[0].parent = -1
        self._nodes[0].first_child = -1
        self._nodes[0].next_sib = -1
        self._nodes[0].prev_sib = -1
        self._nnodes = 1
        self._slot_of = {}

    def __init__(self):
        pass

    def __dealloc__(self):
        cdef int32_t i
        if self._nodes != NULL:
            for i in range(self._nnodes):
                free(self._nodes[i].base)
                free(self._nodes[i].ws)
        free(self._nodes)
        free(self._free_nodes)
        free(self._ct)
        hm_free(self._slot_map)
        free(self._slot_worker)
        free(self._slot_len)
        free(self._slot_prompts)
        free(self._slot_free)
        free(self._ep)
        free(self._depth)
        free(self._path)
        free(self._pdepth)

    # -- the child table -----------------------------------------------------

    cdef inline uint64_t _ct_home(self, uint64_t key, int32_t parent) noexcept nogil:
        return _mix(key, parent) >> (64 - self._ct_bits)

    cdef int32_t _child(self, int32_t parent, uint64_t key) noexcept nogil:
        cdef uint64_t mask = self._ct_cap - 1
        cdef uint64_t i = self._ct_home(key, parent)
        while self._ct[i].child != 0:
            if self._ct[i].key == key and self._ct[i].parent == parent:
                return self._ct[i].child
            i = (i + 1) & mask
        return -1

    cdef int _ct_grow(self) except -1:
        cdef CEntry* old = self._ct
        cdef uint64_t old_cap = self._ct_cap, j, i, mask
        cdef CEntry* t = <CEntry*>malloc(old_cap * 2 * sizeof(CEntry))
        if t == NULL:
            raise MemoryError()
        memset(t, 0, old_cap * 2 * sizeof(CEntry))
        self._ct = t
        self._ct_cap = old_cap * 2
        self._ct_bits += 1
        mask = self._ct_cap - 1
        for j in range(old_cap):
            if old[j].child != 0:
                i = self._ct_home(old[j].key, old[j].parent)
                while t[i].child != 0:
                    i = (i + 1) & mask
                t[i] = old[j]
        free(old)
        return 0

    cdef int _ct_set(self, int32_t parent, uint64_t key, int32_t child) except -1:
        """Map (parent, key) to child, inserting or replacing."""
        cdef uint64_t mask, i
        if (self._ct_used + 1) * 4 > self._ct_cap * 3:
            self._ct_grow()
        mask = self._ct_cap - 1
        i = self._ct_home(key, parent)
        while self._ct[i].child != 0:
            if self._ct[i].key == key and self._ct[i].parent == parent:
                self._ct[i].child = child
                return 0
            i = (i + 1) & mask
        self._ct[i].key = key
        self._ct[i].parent = parent
        self._ct[i].child = child
        self._ct_used += 1
        return 0

    cdef void _ct_del(self, int32_t parent, uint64_t key) noexcept nogil:
        cdef uint64_t mask = self._ct_cap - 1
        cdef uint64_t i = self._ct_home(key, parent), j, h
        while self._ct[i].child != 0:
            if self._ct[i].key == key and self._ct[i].parent == parent:
                break
            i = (i + 1) & mask
        else:
            return
        # backward-shift deletion: no tombstones
        j = i
        while True:
            j = (j + 1) & mask
            if self._ct[j].child == 0:
                break
            h = self._ct_home(self._ct[j].key, self._ct[j].parent)
            if ((j - h) & mask) >= ((j - i) & mask):
                self._ct[i] = self._ct[j]
                i = j
        self._ct[i].child = 0
        self._ct[i].key = 0
        self._ct[i].parent = 0
        self._ct_used -= 1

    # -- the slot table (worker id -> slot) ------------------------------------

    cdef inline long _slot_get(self, uint64_t w) noexcept nogil:
        """The slot of worker ``w``, or -1."""
        cdef uint64_t slot
        if hm_get(self._slot_map, w, &slot):
            return <long>slot
        return -1

    cdef uint32_t _slot_for(self, uint64_t w) except? 0xFFFFFFFF:
        """The slot of worker ``w``, creating it."""
        cdef long s = self._slot_get(w)
        cdef uint32_t slot, cap
        if s >= 0:
            return <uint32_t>s
        if self._nslot_free:
            self._nslot_free -= 1
            slot = self._slot_free[self._nslot_free]
        else:
            if self._nslots == self._slot_cap:
                cap = self._slot_cap * 2 if self._slot_cap else 16
                if not (
                    grow_array(<void**>&self._slot_worker, cap, sizeof(uint64_t))
                    and grow_array(<void**>&self._slot_len, cap, sizeof(uint64_t))
                    and grow_array(<void**>&self._slot_prompts, cap, sizeof(uint64_t))
                    and grow_array(<void**>&self._slot_free, cap, sizeof(uint32_t))
                    and grow_array(<void**>&self._ep, cap, sizeof(uint32_t))
                    and grow_array(<void**>&self._depth, cap, sizeof(uint32_t))
                ):
                    raise MemoryError()
                memset(&self._ep[self._slot_cap], 0, (cap - self._slot_cap) * sizeof(uint32_t))
                self._slot_cap = cap
            slot = self._nslots
            self._nslots += 1
        self._slot_worker[slot] = w
        self._slot_len[slot] = 0
        self._slot_prompts[slot] = 0
        if hm_put(self._slot_map, w, slot) < 0:
            raise MemoryError()
        self._slot_of[w] = slot
        return slot

    # -- nodes ---------------------------------------------------------------

    cdef int32_t _node_new(self) except -1:
        cdef int32_t x
        cdef Node* nodes
        cdef int32_t* fr
        if self._nfree:
            self._nfree -= 1
            x = self._free_nodes[self._nfree]
        else:
            if self._nnodes == self._nodes_cap:
                if self._nodes_cap >= 0x3FFFFFFF:
                    raise MemoryError("too many prompt nodes")
                nodes = <Node*>realloc(self._nodes, self._nodes_cap * 2 * sizeof(Node))
                if nodes == NULL:
                    raise MemoryError()
                self._nodes = nodes
                fr = <int32_t*>realloc(self._free_nodes, self._nodes_cap * 2 * sizeof(int32_t))
                if fr == NULL:
                    raise MemoryError()
                self._free_nodes = fr
                self._nodes_cap *= 2
            x = self._nnodes
            self._nnodes += 1
        memset(&self._nodes[x], 0, sizeof(Node))
        self._nodes[x].parent = -1
        self._nodes[x].first_child = -1
        self._nodes[x].next_sib = -1
        self._nodes[x].prev_sib = -1
        return x

    cdef void _node_free(self, int32_t x) noexcept nogil:
        free(self._nodes[x].base)
        free(self._nodes[x].ws)
        memset(&self._nodes[x], 0, sizeof(Node))
        self._nodes[x].parent = -1
        self._free_nodes[self._nfree] = x
        self._nfree += 1

    cdef void _link(self, int32_t parent, int32_t c) noexcept nogil:
        """Put ``c`` at the head of ``parent``'s child list (the table is updated apart)."""
        cdef Node* p = &self._nodes[parent]
        cdef Node* n = &self._nodes[c]
        n.parent = parent
        n.prev_sib = -1
        n.next_sib = p.first_child
        if p.first_child >= 0:
            self._nodes[p.first_child].prev_sib = c
        p.first_child = c
        p.nchildren += 1

    cdef void _unlink(self, int32_t c) noexcept nogil:
        cdef Node* n = &self._nodes[c]
        cdef Node* p = &self._nodes[n.parent]
        if n.prev_sib >= 0:
            self._nodes[n.prev_sib].next_sib = n.next_sib
        else:
            p.first_child = n.next_sib
        if n.next_sib >= 0:
            self._nodes[n.next_sib].prev_sib = n.prev_sib
        p.nchildren -= 1
        n.prev_sib = n.next_sib = -1

    cdef inline long _ws_find(self, Node* n, uint32_t slot) noexcept nogil:
        """Index of ``slot``'s entry in ``n.ws``, or -(insertion point) - 1."""
        cdef uint32_t lo = 0, hi = n.nws, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if n.ws[mid].slot < slot:
                lo = mid + 1
            elif n.ws[mid].slot > slot:
                hi = mid
            else:
                return mid
        return -<long>lo - 1

    cdef int _ws_add(self, int32_t x, uint32_t slot, uint32_t ending) except -1:
        cdef Node* n = &self._nodes[x]
        cdef long i = self._ws_find(n, slot)
        cdef uint32_t at, cap
        cdef WSlot* ws
        if i >= 0:
            n.ws[i].through += 1
            n.ws[i].ending += ending
            return 0
        at = <uint32_t>(-i - 1)
        if n.nws == n.ws_cap:
            cap = n.ws_cap * 2 if n.ws_cap else 2
            ws = <WSlot*>realloc(n.ws, cap * sizeof(WSlot))
            if ws == NULL:
                raise MemoryError()
            n.ws = ws
            n.ws_cap = cap
        memmove(&n.ws[at + 1], &n.ws[at], (n.nws - at) * sizeof(WSlot))
        n.ws[at].slot = slot
        n.ws[at].through = 1
        n.ws[at].ending = ending
        n.nws += 1
        return 0

    cdef void _ws_drop(self, Node* n, uint32_t at) noexcept nogil:
        memmove(&n.ws[at], &n.ws[at + 1], (n.nws - at - 1) * sizeof(WSlot))
        n.nws -= 1

    cdef int _reserve_path(self, size_t n) except -1:
        cdef int32_t* p
        cdef uint32_t* d
        cdef size_t cap
        if n <= self._path_cap:
            return 0
        cap = self._path_cap
        while cap < n:
            cap *= 2
        p = <int32_t*>realloc(self._path, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self._path = p
        d = <uint32_t*>realloc(self._pdepth, cap * sizeof(uint32_t))
        if d == NULL:
            raise MemoryError()
        self._pdepth = d
        self._path_cap = <uint32_t>cap
        return 0

    cdef uint32_t _walk(self, const uint64_t* q, uint32_t L) noexcept nogil:
        """Follow ``q`` from the root; fill _path / _pdepth, return the nodes visited.

        _pdepth[i] is the depth the prompt agrees with node _path[i] up to
        (its hi when the whole run matched). Needs _path_cap >= L.
        """
        cdef uint32_t n = 0, d = 0, m, end
        cdef int32_t c, x = 0
        cdef Node* node
        cdef const uint64_t* k
        while d < L:
            c = self._child(x, q[d])
            if c < 0:
                break
            node = &self._nodes[c]
            end = node.hi if node.hi < L else L
            k = node.keys - node.lo
            m = d + 1
            while m < end and k[m] == q[m]:
                m += 1
            self._path[n] = c
            self._pdepth[n] = m
            n += 1
            if m < node.hi:
                break
            x = c
            d = m
        return n

    cdef int32_t _split(self, int32_t c, uint32_t m) except -1:
        """Split node ``c`` at depth ``m`` (lo < m < hi); return the new upper node."""
        cdef int32_t u = self._node_new()
        cdef Node* n = &self._nodes[c]
        cdef Node* up = &self._nodes[u]
        cdef uint32_t k = m - n.lo, j
        cdef uint64_t first = n.keys[0]
        cdef int32_t parent = n.parent
        up.base = <uint64_t*>malloc(k * sizeof(uint64_t))
        up.ws = <WSlot*>malloc((n.nws if n.nws else 1) * sizeof(WSlot))
        if up.base == NULL or up.ws == NULL:
            raise MemoryError()
        memcpy(up.base, n.keys, k * sizeof(uint64_t))
        up.keys = up.base
        up.lo = n.lo
        up.hi = m
        up.through = n.through
        up.ending = 0
        memcpy(up.ws, n.ws, n.nws * sizeof(WSlot))
        up.nws = up.ws_cap = n.nws
        for j in range(up.nws):
            up.ws[j].ending = 0
        # u takes c's place among its parent's children, and c hangs below u
        up.parent = parent
        up.prev_sib = n.prev_sib
        up.next_sib = n.next_sib
        if n.prev_sib >= 0:
            self._nodes[n.prev_sib].next_sib = u
        else:
            self._nodes[parent].first_child = u
        if n.next_sib >= 0:
            self._nodes[n.next_sib].prev_sib = u
        n.prev_sib = n.next_sib = -1
        n.parent = u
        up.first_child = c
        up.nchildren = 1
        n.keys += k
        n.lo = m
        self._ct_set(parent, first, u)
        self._ct_set(u, n.keys[0], c)
        return u

    cdef int32_t _leaf(self, int32_t parent, const uint64_t* q, uint32_t lo, uint32_t hi) except -1:
        cdef int32_t x = self._node_new()
        cdef Node* n = &self._nodes[x]
        n.base = <uint64_t*>malloc((hi - lo) * sizeof(uint64_t))
        if n.base == NULL:
            raise MemoryError()
        memcpy(n.base, &q[lo], (hi - lo) * sizeof(uint64_t))
        n.keys = n.base
        n.lo = lo
        n.hi = hi
        self._link(parent, x)
        self._ct_set(parent, q[lo], x)
        return x

    cdef int _merge_down(self, int32_t x) except -1:
        """Node ``x`` has one child and no prompt ends at it: fold it into the child."""
        cdef Node* n = &self._nodes[x]
        cdef int32_t c = n.first_child, parent = n.parent
        cdef Node* ch = &self._nodes[c]
        cdef uint32_t a = n.hi - n.lo, b = ch.hi - ch.lo
        cdef uint64_t* buf = <uint64_t*>malloc((a + b) * sizeof(uint64_t))
        cdef uint64_t first = n.keys[0]
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, n.keys, a * sizeof(uint64_t))
        memcpy(&buf[a], ch.keys, b * sizeof(uint64_t))
        self._ct_del(x, ch.keys[0])
        free(ch.base)
        ch.base = ch.keys = buf
        ch.lo = n.lo
        # c takes x's place among its parent's children
        ch.parent = parent
        ch.prev_sib = n.prev_sib
        ch.next_sib = n.next_sib
        if n.prev_sib >= 0:
            self._nodes[n.prev_sib].next_sib = c
        else:
            self._nodes[parent].first_child = c
        if n.next_sib >= 0:
            self._nodes[n.next_sib].prev_sib = c
        self._ct_set(parent, first, c)
        self._node_free(x)
        return 0

    cdef void _delete(self, int32_t x) noexcept nogil:
        """Drop a node no prompt goes through (it has no children left)."""
        self._ct_del(self._nodes[x].parent, self._nodes[x].keys[0])
        self._unlink(x)
        self._node_free(x)

    # -- public API ----------------------------------------------------------

    def add(self, worker, hashes):
        """Record one more prompt in flight on ``worker``; return its blocks new to the worker.

        See :meth:`kvroute._route_py.ActivePrefixes.add`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef Py_buffer kb
        get_keys(hashes, "hashes", &kb)
        try:
            return self._add(w, <const uint64_t*>kb.buf, <size_t>kb.shape[0])
        finally:
            PyBuffer_Release(&kb)

    cdef uint32_t _add(self, uint64_t w, const uint64_t* q, size_t nq) except? 0xFFFFFFFF:
        """:meth:`add` on validated keys."""
        cdef uint32_t L, npath, i, shared = 0, slot, m
        cdef int32_t x, c, term
        if nq >= 0xFFFFFFFFu:
            raise OverflowError("a prompt of 2**32 blocks or more")
        L = <uint32_t>nq
        if L == 0:
            return 0
        slot = self._slot_for(w)
        self._reserve_path(L)
        npath = self._walk(q, L)
        i = npath
        while i > 0:
            i -= 1
            if self._ws_find(&self._nodes[self._path[i]], slot) >= 0:
                shared = self._pdepth[i]
                break
        # where the prompt ends: an existing node, a split, or a new leaf
        if npath == 0:
            term = self._leaf(0, q, 0, L)
            self._path[0] = term
            npath = 1
        else:
            c = self._path[npath - 1]
            m = self._pdepth[npath - 1]
            if m < self._nodes[c].hi:
                c = self._split(c, m)
                self._path[npath - 1] = c
            if m < L:
                term = self._leaf(c, q, m, L)
                self._path[npath] = term
                npath += 1
            else:
                term = c
        for i in range(npath):
            x = self._path[i]
            self._nodes[x].through += 1
            self._ws_add(x, slot, 1 if x == term else 0)
        self._nodes[term].ending += 1
        self._slot_len[slot] += L - shared
        self._slot_prompts[slot] += 1
        self._prompts += 1
        return L - shared

    def remove(self, worker, hashes):
        """Drop one prompt in flight on ``worker``; return its blocks no longer active there.

        See :meth:`kvroute._route_py.ActivePrefixes.remove`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef Py_buffer kb
        cdef const uint64_t* q
        cdef uint32_t L, npath, i, kept = 0
        cdef long s, at = -1
        cdef int32_t x, term, last
        cdef Node* n
        get_keys(hashes, "hashes", &kb)
        try:
            L = <uint32_t>min(<size_t>kb.shape[0], <size_t>0xFFFFFFFFu)
            if L == 0:
                return 0
            q = <const uint64_t*>kb.buf
            s = self._slot_get(w)
            npath = 0
            if s >= 0:
                self._reserve_path(L)
                npath = self._walk(q, L)
            if npath:
                term = self._path[npath - 1]
                n = &self._nodes[term]
                if self._pdepth[npath - 1] == L and n.hi == L and <size_t>L == <size_t>kb.shape[0]:
                    at = self._ws_find(n, <uint32_t>s)
                    if at >= 0 and n.ws[at].ending == 0:
                        at = -1
            if at < 0:
                raise KeyError(
                    f"no prompt of {kb.shape[0]} blocks equal to this one is in flight on {w}"
                )
            last = -1
            i = npath
            while i > 0:
                i -= 1
                x = self._path[i]
                n = &self._nodes[x]
                at = self._ws_find(n, <uint32_t>s)
                n.through -= 1
                n.ws[at].through -= 1
                if x == term:
                    n.ending -= 1
                    n.ws[at].ending -= 1
                if n.ws[at].through == 0:
                    self._ws_drop(n, <uint32_t>at)
                elif kept == 0:
                    kept = n.hi
                if n.through == 0:
                    self._delete(x)
                elif last < 0:
                    last = x
            # the deepest node left may now be a pass-through with one child
            if last > 0 and self._nodes[last].ending == 0 and self._nodes[last].nchildren == 1:
                self._merge_down(last)
            self._slot_len[s] -= L - kept
            self._slot_prompts[s] -= 1
            self._prompts -= 1
            return L - kept
        finally:
            PyBuffer_Release(&kb)

    cdef uint32_t _match_locked(self, Py_buffer* kb) except? 0xFFFFFFFF:
        """Walk ``kb``; stamp every slot on the path with the depth it reaches. Returns L."""
        return self._stamp(<const uint64_t*>kb.buf, <size_t>kb.shape[0])

    cdef uint32_t _stamp(self, const uint64_t* q, size_t nq) except? 0xFFFFFFFF:
        """:meth:`_match_locked` on validated keys."""
        cdef uint32_t L = <uint32_t>min(nq, <size_t>0xFFFFFFFFu)
        cdef uint32_t npath, i, j, d
        cdef Node* n
        self._epoch += 1
        if self._epoch == 0:
            if self._slot_cap:
                memset(self._ep, 0, self._slot_cap * sizeof(uint32_t))
            self._epoch = 1
        if L == 0 or self._prompts == 0:
            return L
        self._reserve_path(L)
        npath = self._walk(q, L)
        for i in range(npath):
            n = &self._nodes[self._path[i]]
            d = self._pdepth[i]
            for j in range(n.nws):
                self._ep[n.ws[j].slot] = self._epoch
                self._depth[n.ws[j].slot] = d
        return L

    cdef int _new_blocks_into(
        self, const uint64_t* q, size_t nq, const uint64_t* ids, size_t nw, double* out
    ) except -1:
        """:meth:`new_blocks` on validated keys, into ``out[:nw]``."""
        cdef size_t j
        cdef long s
        self._stamp(q, nq)
        for j in range(nw):
            out[j] = <double>nq
        if self._prompts:
            for j in range(nw):
                s = self._slot_get(ids[j])
                if s >= 0 and self._ep[s] == self._epoch:
                    out[j] -= self._depth[s]
        return 0

    def match_array(self, hashes, workers):
        """For each id in ``workers``, how many leading blocks of ``hashes`` are active on it.

        See :meth:`kvroute._route_py.ActivePrefixes.match_array`.
        """
        cdef Py_buffer kb, wb
        cdef size_t j, nw
        cdef const uint64_t* ids
        cdef long s
        cdef uint32_t[::1] out
        get_hashes_and_workers(hashes, &kb, workers, &wb)
        try:
            nw = <size_t>wb.shape[0]
            result = np.zeros(nw, dtype=np.uint32)
            out = result
            ids = <const uint64_t*>wb.buf
            self._match_locked(&kb)
            if self._prompts:
                for j in range(nw):
                    s = self._slot_get(ids[j])
                    if s >= 0 and self._ep[s] == self._epoch:
                        out[j] = self._depth[s]
        finally:
            PyBuffer_Release(&kb)
            PyBuffer_Release(&wb)
        return result

    def new_blocks(self, hashes, workers):
        """For each id in ``workers``, how many blocks of ``hashes`` are not active on it.

        See :meth:`kvroute._route_py.ActivePrefixes.new_blocks`.
        """
        cdef Py_buffer kb, wb
        cdef size_t nw
        cdef double[::1] out
        get_hashes_and_workers(hashes, &kb, workers, &wb)
        try:
            nw = <size_t>wb.shape[0]
            result = np.empty(nw, dtype=np.float64)
            out = result
            self._new_blocks_into(<const uint64_t*>kb.buf, <size_t>kb.shape[0],
                                  <const uint64_t*>wb.buf, nw, &out[0] if nw else NULL)
        finally:
            PyBuffer_Release(&kb)
            PyBuffer_Release(&wb)
        return result

    def worker_len(self, worker):
        """Distinct blocks (prefixes) of ``worker``'s prompts in flight; 0 if it has none."""
        cdef uint64_t w = as_u64(worker, "worker")
        cdef long s = self._slot_get(w)
        return 0 if s < 0 else self._slot_len[s]

    def remove_worker(self, worker):
        """Drop every prompt of ``worker``; return how many there were.

        See :meth:`kvroute._route_py.ActivePrefixes.remove_worker`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef long s = self._slot_get(w)
        cdef uint64_t n
        cdef int32_t* order
        cdef int32_t x, c, head, tail, k
        cdef long at
        cdef Node* node
        if s < 0:
            return 0
        n = self._slot_prompts[s]
        if n:
            # Take the worker out of every node, then repair the tree bottom-up
            # (children before parents: reverse breadth-first order).
            order = <int32_t*>malloc(self._nnodes * sizeof(int32_t))
            if order == NULL:
                raise MemoryError()
            try:
                head = tail = 0
                order[tail] = 0
                tail += 1
                while head < tail:
                    x = order[head]
                    head += 1
                    c = self._nodes[x].first_child
                    while c >= 0:
                        order[tail] = c
                        tail += 1
                        c = self._nodes[c].next_sib
                k = tail
                while k > 1:
                    k -= 1
                    x = order[k]
                    node = &self._nodes[x]
                    at = self._ws_find(node, <uint32_t>s)
                    if at >= 0:
                        node.through -= node.ws[at].through
                        node.ending -= node.ws[at].ending
                        self._ws_drop(node, <uint32_t>at)
                    if node.through == 0:
                        self._delete(x)
                    elif node.ending == 0 and node.nchildren == 1:
                        self._merge_down(x)
            finally:
                free(order)
            self._prompts -= n
        del self._slot_of[w]
        hm_del(self._slot_map, w)
        self._slot_free[self._nslot_free] = <uint32_t>s
        self._nslot_free += 1
        return n

    def __len__(self):
        """Prompts in flight, all workers."""
        return self._prompts

    def sizeof(self):
        """Bytes this object owns (nodes, their keys and worker entries, tables)."""
        cdef size_t total
        cdef int32_t x
        total = self._nodes_cap * (sizeof(Node) + sizeof(int32_t))
        total += self._ct_cap * sizeof(CEntry) + hm_sizeof(self._slot_map)
        total += self._slot_cap * (3 * sizeof(uint64_t) + 3 * sizeof(uint32_t))
        total += self._path_cap * (sizeof(int32_t) + sizeof(uint32_t))
        for x in range(self._nnodes):
            if self._nodes[x].base != NULL:
                total += (self._nodes[x].hi - self._nodes[x].lo) * sizeof(uint64_t)
            total += self._nodes[x].ws_cap * sizeof(WSlot)
        return total

    def _check(self):
        """Check the tree's invariants and recount every worker's blocks; AssertionError if off."""
        cdef int32_t x, c, nlive = 0
        cdef uint32_t j, kk
        cdef WSlot wsl
        cdef Node* n
        cdef Node* ch
        cdef dict child_through
        cdef dict slot_len = {}
        cdef dict slot_prompts = {}
        cdef uint64_t prompts = 0, links = 0
        free_ids = {self._free_nodes[x] for x in range(self._nfree)}
        assert len(free_ids) == self._nfree, "a node freed twice"
        assert 0 not in free_ids, "the root was freed"
        for x in range(self._nnodes):
            if x in free_ids:
                continue
            nlive += 1
            n = &self._nodes[x]
            if x == 0:
                assert n.lo == 0 and n.hi == 0 and n.parent == -1 and n.nws == 0
            else:
                assert n.parent >= 0 and n.parent not in free_ids, "dangling parent"
                assert n.lo == self._nodes[n.parent].hi, "a run does not continue its parent"
                assert n.hi > n.lo, "empty run"
                assert self._child(n.parent, n.keys[0]) == x, "child table is off"
                assert n.through > 0, "a node no prompt goes through"
                assert n.ending > 0 or n.nchildren != 1, "an uncompressed pass-through node"
            child_through = {}
            total = n.ending
            j = 0
            c = n.first_child
            while c >= 0:
                ch = &self._nodes[c]
                assert ch.parent == x, "sibling list is off"
                j += 1
                total += ch.through
                for kk in range(ch.nws):
                    wsl = ch.ws[kk]
                    child_through[wsl.slot] = child_through.get(wsl.slot, 0) + wsl.through
                c = ch.next_sib
            links += j
            assert j == n.nchildren, "child count is off"
            if x:
                assert total == n.through, "through != ending + children's through"
            through = ending = 0
            for j in range(n.nws):
                wsl = n.ws[j]
                if j:
                    assert n.ws[j - 1].slot < wsl.slot, "worker entries not sorted"
                assert wsl.through > 0, "a worker entry with no prompt"
                assert wsl.through == wsl.ending + child_through.pop(wsl.slot, 0), (
                    "a worker's through != ending + children's through"
                )
                through += wsl.through
                ending += wsl.ending
                slot_len[wsl.slot] = slot_len.get(wsl.slot, 0) + (n.hi - n.lo)
                slot_prompts[wsl.slot] = slot_prompts.get(wsl.slot, 0) + wsl.ending
            assert x == 0 or not child_through, "a worker in a child but not its parent"
            if x:
                assert through == n.through and ending == n.ending, "worker counts are off"
            prompts += n.ending
        assert nlive + self._nfree == self._nnodes, "leaked node"
        assert links + 1 == <uint64_t>nlive, "a node outside the tree"
        assert self._ct_used == links, "child table holds stale entries"
        assert prompts == self._prompts, "prompt count is off"
        assert len(self._slot_of) + self._nslot_free == self._nslots, "leaked slot"
        for w, slot in self._slot_of.items():
            assert self._slot_worker[slot] == w and self._slot_get(w) == slot, "slot map is off"
            assert self._slot_len[slot] == slot_len.get(slot, 0), f"worker {w}: block count is off"
            assert self._slot_prompts[slot] == slot_prompts.get(slot, 0), "prompt count is off"
        assert (
            <Py_ssize_t>self._slot_map.used + self._slot_map.has_zero == len(self._slot_of)
        ), "slot map holds stale workers"

    def __repr__(self):
        return f"<ActivePrefixes prompts={len(self)} workers={len(self._slot_of)}>"


# -- fresh decisions ---------------------------------------------------------

cdef inline size_t _chained_cp(const uint64_t* a, size_t na, const uint64_t* b, size_t nb) noexcept nogil:
    cdef size_t m = na if na < nb else nb, lo, hi, mid
    if m == 0 or a[m - 1] == b[m - 1]:
        return m
    lo = 0
    hi = m - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] == b[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def common_prefix(a, b):
    """Length of the longest common prefix of two key arrays (every key compared).

    See :func:`kvroute._route_py.common_prefix`.
    """
    cdef Py_buffer ab, bb
    cdef size_t m, i = 0
    cdef const uint64_t* x
    cdef const uint64_t* y
    get_keys(a, "hashes", &ab)
    try:
        get_keys(b, "hashes", &bb)
    except BaseException:
        PyBuffer_Release(&ab)
        raise
    try:
        x = <const uint64_t*>ab.buf
        y = <const uint64_t*>bb.buf
        m = min(<size_t>ab.shape[0], <size_t>bb.shape[0])
        while i < m and x[i] == y[i]:
            i += 1
        return i
    finally:
        PyBuffer_Release(&ab)
        PyBuffer_Release(&bb)


def chained_common_prefix(a, b):
    """Length of the common prefix of two arrays of *chained* keys, by bisection.

    See :func:`kvroute._route_py.chained_common_prefix`.
    """
    cdef Py_buffer ab, bb
    get_keys(a, "hashes", &ab)
    try:
        get_keys(b, "hashes", &bb)
    except BaseException:
        PyBuffer_Release(&ab)
        raise
    try:
        return _chained_cp(<const uint64_t*>ab.buf, <size_t>ab.shape[0],
                           <const uint64_t*>bb.buf, <size_t>bb.shape[0])
    finally:
        PyBuffer_Release(&ab)
        PyBuffer_Release(&bb)


cdef int _raise_overlaps(Py_ssize_t* P, const size_t* K, Py_ssize_t c, int64_t* ov,
                         int64_t* host, int64_t* disk) noexcept nogil:
    """Raise ``ov[P[a]]`` to the largest ``K`` of its position; return how many were raised.

    ``P``/``K``: ``c`` (position, common prefix) pairs, a position possibly more
    than once (``P`` is overwritten). A raised position's host and disk figures
    are zeroed (the device prefix now covers them).
    """
    cdef Py_ssize_t a, b, p
    cdef size_t k
    cdef int raised = 0
    for a in range(c):
        p = P[a]
        if p < 0:
            continue
        k = K[a]
        for b in range(a + 1, c):
            if P[b] == p:
                if K[b] > k:
                    k = K[b]
                P[b] = -1
        if <int64_t>k > ov[p]:
            ov[p] = <int64_t>k
            if host != NULL and disk != NULL:
                host[p] = 0
                disk[p] = 0
            raised += 1
    return raised


cdef int _overlay(object entries, const uint64_t* q, size_t nq, double now, int64_t* ov,
                  object pos, bint skip_known, int64_t* host, int64_t* disk) except -1:
    """:func:`fresh_overlay` on validated arrays; returns how many positions were raised.

    Every live decision is compared against the overlaps as given (the twin
    collects its matches before raising any), then each position takes the
    largest of its decisions' common prefixes.
    """
    cdef Py_buffer hb
    cdef const uint64_t* h
    cdef size_t nh, k
    cdef Py_ssize_t m, c = 0, p
    cdef Py_ssize_t* P
    cdef size_t* K
    if not isinstance(entries, (list, _deque)):
        entries = list(entries)
    m = len(entries)
    if m == 0:
        return 0
    P = <Py_ssize_t*>malloc(m * (sizeof(Py_ssize_t) + sizeof(size_t)))
    if P == NULL:
        raise MemoryError()
    K = <size_t*>(P + m)
    try:
        for entry in entries:
            worker, harr, expiry = entry
            if expiry <= now:
                continue
            pp = pos.get(worker)
            get_keys(harr, "hashes", &hb)
            try:
                h = <const uint64_t*>hb.buf
                nh = <size_t>hb.shape[0]
                if skip_known:
                    k = 0 if pp is None else <size_t>ov[<Py_ssize_t>pp]
                    if k >= nh or k >= nq or h[k] != q[k]:
                        continue
                k = _chained_cp(h, nh, q, nq)
            finally:
                PyBuffer_Release(&hb)
            if pp is not None and k > 0:
                P[c] = pp
                K[c] = k
                c += 1
        return _raise_overlaps(P, K, c, ov, host, disk)
    finally:
        free(P)


def fresh_overlay(entries, hashes, double now, int64_t[::1] ov, pos, bint skip_known,
                  int64_t[::1] host=None, int64_t[::1] disk=None):
    """Raise ``ov[pos[worker]]`` to the common prefix of ``hashes`` with each live decision.

    See :func:`kvroute._route_py.fresh_overlay`.
    """
    cdef Py_buffer qb
    cdef int64_t* hp = NULL
    cdef int64_t* dp = NULL
    if host is not None and disk is not None and host.shape[0] and disk.shape[0]:
        hp = &host[0]
        dp = &disk[0]
    get_keys(hashes, "hashes", &qb)
    try:
        if ov.shape[0] == 0:
            return 0
        return _overlay(entries, <const uint64_t*>qb.buf, <size_t>qb.shape[0], now, &ov[0], pos,
                        skip_known, hp, dp)
    finally:
        PyBuffer_Release(&qb)


# -- FreshDecisions: the newest decisions per prompt start -------------------------
# Per first key, a _Bucket of at most per_key C records, oldest first, each
# holding its prompt's buffer (so matching reads the keys with no per-use
# buffer request). The route step reads them with no Python object access.

ctypedef struct FEntry:
    uint64_t worker
    double expiry
    uint64_t seq
    Py_buffer keys          # held while the record lives; keys.obj keeps the array


cdef class _Bucket:
    cdef FEntry* e
    cdef Py_ssize_t n

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.e != NULL:
            for i in range(self.n):
                PyBuffer_Release(&self.e[i].keys)
            free(self.e)

    cdef void drop(self, Py_ssize_t i) noexcept:
        """Drop record ``i``, keeping the order of the others."""
        PyBuffer_Release(&self.e[i].keys)
        memmove(&self.e[i], &self.e[i + 1], (self.n - i - 1) * sizeof(FEntry))
        self.n -= 1


cdef int _bucket_overlay(
    _Bucket b, const uint64_t* q, size_t nq, double now, int64_t* ov, HMap* posmap, object pos,
    bint skip_known, int64_t* host, int64_t* disk,
) except -1:
    """FreshDecisions.overlay over one bucket (positions from ``posmap``, else ``pos``)."""
    cdef Py_ssize_t j, c = 0, p
    cdef size_t k, nh
    cdef const uint64_t* h
    cdef uint64_t slot
    cdef Py_ssize_t[16] P_small
    cdef size_t[16] K_small
    cdef Py_ssize_t* P = P_small
    cdef size_t* K = K_small
    cdef FEntry* e
    if b.n > 16:
        P = <Py_ssize_t*>malloc(b.n * (sizeof(Py_ssize_t) + sizeof(size_t)))
        if P == NULL:
            raise MemoryError()
        K = <size_t*>(P + b.n)
    try:
        for j in range(b.n):
            e = &b.e[j]
            if e.expiry <= now:
                continue
            if posmap != NULL:
                p = <Py_ssize_t>slot if hm_get(posmap, e.worker, &slot) else -1
            else:
                pp = pos.get(e.worker)
                p = -1 if pp is None else <Py_ssize_t>pp
            h = <const uint64_t*>e.keys.buf
            nh = <size_t>e.keys.shape[0]
            if skip_known:
                k = 0 if p < 0 else <size_t>ov[p]
                if k >= nh or k >= nq or h[k] != q[k]:
                    continue
            k = _chained_cp(h, nh, q, nq)
            if p >= 0 and k > 0:
                P[c] = p
                K[c] = k
                c += 1
        return _raise_overlaps(P, K, c, ov, host, disk)
    finally:
        if P != P_small:
            free(P)


cdef class FreshDecisions:
    """The newest routing decisions per prompt start, for ``ttl`` seconds.

    See :class:`kvroute._route_py.FreshDecisions`. The handle :meth:`record`
    returns is ``(first key, sequence number)``.
    """

    cdef readonly double ttl
    cdef readonly Py_ssize_t per_key
    cdef dict _buckets       # first key -> _Bucket
    cdef uint64_t _seq
    cdef Py_ssize_t _len

    def __init__(self, ttl=5.0, per_key=4):
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl}")
        if per_key < 1:
            raise ValueError(f"per_key must be >= 1, got {per_key}")
        self.ttl = float(ttl)
        self.per_key = int(per_key)
        self._buckets = {}

    def __len__(self):
        """Number of remembered decisions (expired ones included until purged)."""
        return self._len

    cdef object _record(self, uint64_t worker, object hashes, Py_buffer* kb, double now):
        """:meth:`record` on validated keys (``kb`` is the caller's view of ``hashes``)."""
        cdef const uint64_t* q = <const uint64_t*>kb.buf
        cdef Py_ssize_t j
        cdef _Bucket b
        cdef FEntry* e
        if kb.shape[0] == 0:
            return None
        key = q[0]
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket.__new__(_Bucket)
            b.e = <FEntry*>malloc(self.per_key * sizeof(FEntry))
            if b.e == NULL:
                raise MemoryError()
            self._buckets[key] = b
        else:
            for j in range(b.n):
                if b.e[j].worker == worker:
                    b.drop(j)
                    self._len -= 1
                    break
            if b.n == self.per_key:  # deque(maxlen=per_key): the oldest goes
                b.drop(0)
                self._len -= 1
        e = &b.e[b.n]
        PyObject_GetBuffer(<object>kb.obj, &e.keys, PyBUF_ANY_CONTIGUOUS | PyBUF_FORMAT)
        self._seq += 1
        e.worker = worker
        e.expiry = now + self.ttl
        e.seq = self._seq
        b.n += 1
        self._len += 1
        return (key, self._seq)

    def record(self, worker, hashes, double now):
        """Remember that ``hashes`` were just routed to ``worker``; return a handle for forget.

        See :meth:`kvroute._route_py.FreshDecisions.record`.
        """
        cdef uint64_t w = as_u64(worker, "worker")
        cdef Py_buffer kb
        get_keys(hashes, "hashes", &kb)
        try:
            return self._record(w, hashes, &kb, now)
        finally:
            PyBuffer_Release(&kb)

    def started(self, key):
        """Whether a remembered decision's prompt starts with block ``key``; None if none is kept.

        See :meth:`kvroute._route_py.FreshDecisions.started`.
        """
        cdef uint64_t k = as_u64(key, "key")
        if not self._buckets:
            return None
        return k in self._buckets

    def forget(self, entry):
        """Drop a remembered decision (its request failed); None and stale handles are ignored."""
        cdef _Bucket b
        cdef Py_ssize_t j
        cdef uint64_t seq
        if entry is None:
            return
        key, s = entry
        seq = s
        b = self._buckets.get(key)
        if b is None:
            return
        for j in range(b.n):
            if b.e[j].seq == seq:
                b.drop(j)
                self._len -= 1
                break
        if b.n == 0:
            del self._buckets[key]

    def match(self, hashes, double now, known=None):
        """Per worker, the longest prefix of ``hashes`` among its live remembered decisions.

        See :meth:`kvroute._route_py.FreshDecisions.match`.
        """
        cdef Py_buffer kb
        cdef _Bucket b
        cdef Py_ssize_t j
        cdef size_t k, nq, nh
        cdef const uint64_t* q
        cdef const uint64_t* h
        cdef dict out = {}
        get_keys(hashes, "hashes", &kb)
        try:
            nq = <size_t>kb.shape[0]
            if nq == 0:
                return out
            q = <const uint64_t*>kb.buf
            b = self._buckets.get(q[0])
            if b is None:
                return out
            for j in range(b.n):
                if b.e[j].expiry <= now:
                    continue
                worker = b.e[j].worker
                h = <const uint64_t*>b.e[j].keys.buf
                nh = <size_t>b.e[j].keys.shape[0]
                if known:
                    k = known.get(worker, 0)
                    if k >= nh or k >= nq or h[k] != q[k]:
                        continue
                k = _chained_cp(h, nh, q, nq)
                if k > out.get(worker, 0):
                    out[worker] = k
            return out
        finally:
            PyBuffer_Release(&kb)

    def overlay(self, hashes, double now, int64_t[::1] ov, pos, *, bint skip_known=False,
                int64_t[::1] host=None, int64_t[::1] disk=None):
        """:meth:`match` merged into per-position overlaps in place, in one compiled pass.

        See :meth:`kvroute._route_py.FreshDecisions.overlay`.
        """
        cdef Py_buffer kb
        cdef _Bucket b
        cdef int64_t* hp = NULL
        cdef int64_t* dp = NULL
        if host is not None and disk is not None and host.shape[0] and disk.shape[0]:
            hp = &host[0]
            dp = &disk[0]
        get_keys(hashes, "hashes", &kb)
        try:
            if kb.shape[0] == 0 or ov.shape[0] == 0:
                return 0
            b = self._buckets.get((<const uint64_t*>kb.buf)[0])
            if b is None:
                return 0
            return _bucket_overlay(b, <const uint64_t*>kb.buf, <size_t>kb.shape[0], now, &ov[0],
                                   NULL, pos, skip_known, hp, dp)
        finally:
            PyBuffer_Release(&kb)

    def remove_worker(self, worker):
        """Forget the decisions that went to ``worker``. O(remembered decisions)."""
        cdef uint64_t w = as_u64(worker, "worker")
        cdef _Bucket b
        cdef Py_ssize_t j
        for key in list(self._buckets):
            b = self._buckets[key]
            j = 0
            while j < b.n:
                if b.e[j].worker == w:
                    b.drop(j)
                    self._len -= 1
                else:
                    j += 1
            if b.n == 0:
                del self._buckets[key]

    def purge(self, double now):
        """Drop expired decisions; return how many. O(remembered decisions)."""
        cdef _Bucket b
        cdef Py_ssize_t dropped = 0
        for key in list(self._buckets):
            b = self._buckets[key]
            while b.n and b.e[0].expiry <= now:
                b.drop(0)
                dropped += 1
            if b.n == 0:
                del self._buckets[key]
        self._len -= dropped
        return dropped

    @property
    def _by_first(self):
        """The decisions as the twin keeps them: first key -> ``[worker, hashes, expiry]`` lists."""
        cdef _Bucket b
        cdef Py_ssize_t j
        return {
            key: [[b.e[j].worker, <object>b.e[j].keys.obj, b.e[j].expiry] for j in range(b.n)]
            for key, b in self._buckets.items()
        }

    def _check(self):
        """Check the record's invariants; AssertionError if one fails."""
        cdef _Bucket b
        cdef Py_ssize_t j, total = 0
        for key, b in self._buckets.items():
            assert b.n, "an empty key is kept"
            assert b.n <= self.per_key, "more decisions than per_key"
            workers = [b.e[j].worker for j in range(b.n)]
            assert len(set(workers)) == len(workers), "two decisions for one worker"
            for j in range(b.n):
                assert b.e[j].keys.shape[0] and (<const uint64_t*>b.e[j].keys.buf)[0] == key, (
                    "a decision under another key"
                )
                if j:
                    assert b.e[j - 1].seq < b.e[j].seq, "decisions out of order"
            total += b.n
        assert total == self._len, "decision count is off"

    def __repr__(self):
        return f"<FreshDecisions decisions={self._len} keys={len(self._buckets)}>"


# -- the kvroute policy's arithmetic -------------------------------------------
# One pass per quantity over the candidates, in C doubles, each operation in
# the twin's order (setup.py builds this module with -ffp-contract=off: a fused
# multiply-add would round differently from numpy and could flip a near-tie).

cdef enum:
    F64 = 0
    I64 = 1
    BOOL = 2

# the Candidates fields the pass reads, in the order of its pointers; the
# last two only for a tiered snapshot
_CANDIDATE_FIELDS = (
    "overlap", "prefill_tokens", "decode_blocks", "new_decode_blocks",
    "active_requests", "waiting", "kv_usage", "busy", "overlap_host", "overlap_disk",
)
cdef int[10] _CANDIDATE_KINDS = [I64, F64, F64, F64, I64, F64, F64, BOOL, I64, I64]


cdef int _get_array(object obj, Py_buffer* view, int kind, Py_ssize_t n, str name,
                    bint writable=False, str prefix="candidates.") except -1:
    """Fill ``view`` with a contiguous array of ``n`` items of ``kind``, or raise the twin's error."""
    cdef const char* f
    cdef bint ok = False
    if isinstance(obj, _ndarray):
        try:
            PyObject_GetBuffer(
                obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (PyBUF_WRITABLE if writable else 0)
            )
        except (ValueError, BufferError, TypeError):
            pass
        else:
            f = view.format  # numpy names a native-order item without a prefix
            if f[0] == b"=" or f[0] == b"@":
                f += 1
            if view.ndim == 1 and view.shape[0] == n and f[0] != 0 and f[1] == 0:
                if kind == F64:
                    ok = view.itemsize == 8 and f[0] == b"d"
                elif kind == I64:
                    ok = view.itemsize == 8 and (f[0] == b"l" or f[0] == b"q")
                else:
                    ok = view.itemsize == 1 and f[0] == b"?"
            if ok:
                return 0
            PyBuffer_Release(view)
    dtype = ("float64", "int64", "bool")[kind]
    raise TypeError(f"{prefix}{name} must be a contiguous {dtype} array of {n} values")


cdef inline double _nan_min(const double* a, Py_ssize_t n) noexcept nogil:
    # numpy's min: the first NaN if there is one
    cdef double m = a[0], v
    cdef Py_ssize_t i
    for i in range(n):
        v = a[i]
        if v != v:
            return v
        if v < m:
            m = v
    return m


cdef inline double _no_nan(double v) noexcept nogil:
    return v if v == v and fabs(v) != INFINITY else INFINITY


ctypedef struct KvParams:
    double bs
    double prompt
    double k_host          # bs x (1 - host_hit_weight)
    double k_disk
    double dtw             # decode_token_weight x bs
    double art
    double wrt
    double kh
    double kpt
    double slack
    double abs_slack
    double stake_tokens
    double stake_max
    double uw


ctypedef struct KvRaw:
    # the policy's parameters as it holds them, in KvRoute._PARAMS order
    double dtw
    double art
    double wrt
    double hw
    double dw
    double kh
    double kpt
    double slack
    double abs_slack
    double stake_tokens
    double stake_max
    double uw


cdef int _read_raw(object params, KvRaw* r) except -1:
    """The policy's parameters, read on every call (a test changes them between calls).

    From ``params._packed_params`` when it is a 12-tuple (``KvRoute`` keeps
    one current: one read instead of twelve), else attribute by attribute.
    """
    try:
        packed = params._packed_params
    except AttributeError:
        packed = None
    if type(packed) is tuple and len(<tuple>packed) == 12:
        (r.dtw, r.art, r.wrt, r.hw, r.dw, r.kh, r.kpt, r.slack, r.abs_slack, r.stake_tokens,
         r.stake_max, r.uw) = <tuple>packed
    else:
        r.dtw = params.decode_token_weight
        r.art = params.active_request_tokens
        r.wrt = params.waiting_request_tokens
        r.hw = params.host_hit_weight
        r.dw = params.disk_hit_weight
        r.kh = params.kv_high
        r.kpt = params.kv_pressure_tokens
        r.slack = params.balance_slack
        r.abs_slack = params.balance_abs_slack
        r.stake_tokens = params.balance_stake_tokens
        r.stake_max = params.balance_stake_limit
        r.uw = params.uncached_weight
    return 0


cdef inline void _derive(const KvRaw* r, double bs, double prompt, KvParams* k) noexcept:
    """The pass's parameters for one request (each product as the twin forms it)."""
    k.bs = bs
    k.prompt = prompt
    k.dtw = r.dtw * bs
    k.art = r.art
    k.wrt = r.wrt
    k.kh = r.kh
    k.kpt = r.kpt
    k.slack = r.slack
    k.abs_slack = r.abs_slack
    k.stake_tokens = r.stake_tokens
    k.stake_max = r.stake_max
    k.uw = r.uw
    k.k_host = bs * (1.0 - r.hw)
    k.k_disk = bs * (1.0 - r.dw)


cdef int _read_params(object params, object prompt_tokens, object block_size, KvParams* k) except -1:
    cdef KvRaw r
    _read_raw(params, &r)
    _derive(&r, <double>block_size, <double>prompt_tokens, k)
    return 0


# rows of the pass's output block, n doubles each
cdef enum:
    R_U = 0       # uncached_tokens
    R_QP = 1      # queued_prefill
    R_D = 2       # decode
    R_QU = 3      # queue
    R_C = 4       # cost
    R_PR = 5      # kv_pressure (written only if some worker is over kv_high)
    R_ST = 6      # stake_tokens (written only if the gate bound some worker)
    R_L = 7       # load: active + waiting (scratch)
    NROWS = 8


cdef Py_ssize_t _kvroute_pass(
    Py_ssize_t n, const KvParams* k, const int64_t* ov, const int64_t* host, const int64_t* disk,
    const double* pt, const double* db, const double* nd, const int64_t* act, const double* wt,
    const double* kv, const unsigned char* busy, double* o, unsigned char* e, Py_ssize_t* ties,
    bint* pressure, bint* staked,
) noexcept nogil:
    """The kvroute policy over ``n >= 1`` candidates: costs in ``o``, gate in ``e``, ties.

    ``host`` / ``disk`` NULL: untiered; ``busy`` NULL: none busy. Returns the
    number of ties written to ``ties`` (the twin's ``ties``, in order).
    """
    cdef Py_ssize_t i, j, alt, nt = 0, nk
    cdef double* U = o + R_U * n
    cdef double* QP = o + R_QP * n
    cdef double* D = o + R_D * n
    cdef double* QU = o + R_QU * n
    cdef double* C = o + R_C * n
    cdef double* PR = o + R_PR * n
    cdef double* ST = o + R_ST * n
    cdef double* L = o + R_L * n
    # the parameters in locals: the output stores could alias *k, forcing reloads
    cdef double bs = k.bs, k_host = k.k_host, k_disk = k.k_disk, prompt = k.prompt
    cdef double dtw = k.dtw, wrt = k.wrt, art = k.art, uw = k.uw
    cdef double u, v, mx, total = 0.0, cap, thr, best, scale, a, w, q, dd, qq, l
    cdef bint kv_nan = False, all_el = True, el
    cdef bint any_busy = False, all_busy = True, any_el, use_fin = False, load_nan = False
    pressure[0] = False
    staked[0] = False
    # every value in a register, each output stored once (no reloads through the
    # pointers, which may alias as far as the compiler knows); branch-free flags
    mx = kv[0]
    for i in range(n):
        a = <double>act[i]
        w = wt[i]
        q = pt[i]
        u = <double>ov[i] * -bs
        if host != NULL:
            u = u + k_host * <double>host[i]
            u = u + k_disk * <double>disk[i]
        u = u + prompt
        if u < 0.0:
            u = 0.0
        dd = (db[i] + nd[i]) * dtw
        qq = w * wrt + art * a
        l = a + w
        U[i] = u
        QP[i] = q
        D[i] = dd
        QU[i] = qq
        L[i] = l
        C[i] = ((u * uw + q) + dd) + qq
        total += l
        v = kv[i]
        kv_nan |= v != v
        mx = v if v > mx else mx
    if busy != NULL:
        for i in range(n):
            any_busy |= busy[i] != 0
            all_busy &= busy[i] != 0
    else:
        all_busy = False
    if not kv_nan and mx > k.kh:
        pressure[0] = True
        scale = k.kpt / (1.0 - k.kh)
        for i in range(n):
            v = kv[i] - k.kh
            if v < 0.0:
                v = 0.0
            PR[i] = v * scale
            C[i] = C[i] + PR[i]
    cap = (1.0 + k.slack) * (total + 1.0) / <double>n + k.abs_slack
    thr = cap - 1.0
    # the gate, and the cheapest eligible cost while at it (redone if the gate moves)
    best = INFINITY
    for i in range(n):
        el = L[i] <= thr
        e[i] = el
        all_el &= el
        v = C[i] if el else INFINITY
        use_fin |= v != v
        best = v if v < best else best
    if not all_el:
        staked[0] = True
        # numpy's argmin over where(eligible, cost, inf): the first NaN, else the first minimum
        alt = 0
        best = C[0] if e[0] else INFINITY
        if best == best:
            for i in range(1, n):
                v = C[i] if e[i] else INFINITY
                if v != v:
                    alt = i
                    best = v
                    break
                if v < best:
                    alt = i
                    best = v
        if not best < INFINITY:
            alt = 0
            best = _no_nan(C[0]) if e[0] else INFINITY
            for i in range(1, n):
                v = _no_nan(C[i]) if e[i] else INFINITY
                if v < best:
                    alt = i
                    best = v
            if not e[alt]:
                for i in range(n):
                    if e[i]:
                        alt = i
                        break
        scale = cap / k.stake_tokens
        for i in range(n):
            v = U[alt] - U[i]
            if v < 0.0:
                v = 0.0
            if v > k.stake_max:
                v = k.stake_max
            ST[i] = v
            e[i] = L[i] <= v * scale + thr
    if any_busy and not all_busy:
        any_el = False
        for i in range(n):
            if busy[i]:
                e[i] = False
            elif e[i]:
                any_el = True
        if not any_el:
            v = _nan_min(L, n)
            for i in range(n):
                e[i] = L[i] == v
    if staked[0] or (any_busy and not all_busy):
        best = INFINITY
        use_fin = False
        for i in range(n):
            v = C[i] if e[i] else INFINITY
            use_fin |= v != v
            best = v if v < best else best
    if use_fin or best == -INFINITY:
        use_fin = True
        best = INFINITY
        for i in range(n):
            v = _no_nan(C[i]) if e[i] else INFINITY
            if v < best:
                best = v
    thr = best + 1e-9 * (fabs(best) if fabs(best) >= 1.0 else 1.0)
    mx = INFINITY  # the least load among the ties; NaN (numpy's min) keeps them all
    for i in range(n):
        if e[i]:
            v = _no_nan(C[i]) if use_fin else C[i]
        else:
            v = INFINITY
        if v <= thr:
            ties[nt] = i
            nt += 1
            if L[i] != L[i]:
                load_nan = True
            elif L[i] < mx:
                mx = L[i]
    if nt > 1 and not load_nan:
        nk = 0
        for j in range(nt):
            if L[ties[j]] == mx:
                nk += 1
        if nk:
            nk = 0
            for j in range(nt):
                if L[ties[j]] == mx:
                    ties[nk] = ties[j]
                    nk += 1
            nt = nk
    return nt


def kvroute_costs(candidates, prompt_tokens, block_size, params):
    """The ``kvroute`` policy's costs, gate and cheapest eligible candidates.

    See :func:`kvroute._route_py.kvroute_costs`.
    """
    c = candidates
    cdef bint tiered = bool(c.tiered)
    cdef Py_ssize_t n = len(c.workers), i, nt, nb = 0
    cdef Py_buffer bufs[12]  # 10 candidate arrays, the two outputs
    cdef const void* arrays[10]
    cdef int j
    cdef Py_ssize_t* ties = NULL
    cdef KvParams k
    cdef bint pressure, staked
    if n <= 0:
        raise ValueError("Candidates needs at least one worker")
    _read_params(params, prompt_tokens, block_size, &k)
    out = np.empty((NROWS, n))
    el = np.empty(n, np.bool_)
    try:
        for j in range(10 if tiered else 8):
            name = _CANDIDATE_FIELDS[j]
            _get_array(getattr(c, name), &bufs[nb], _CANDIDATE_KINDS[j], n, name)
            arrays[j] = bufs[nb].buf
            nb += 1
        PyObject_GetBuffer(out, &bufs[nb], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE); nb += 1
        PyObject_GetBuffer(el, &bufs[nb], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE); nb += 1
        ties = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
        if ties == NULL:
            raise MemoryError()
        nt = _kvroute_pass(
            n, &k, <const int64_t*>arrays[0],
            <const int64_t*>arrays[8] if tiered else NULL,
            <const int64_t*>arrays[9] if tiered else NULL,
            <const double*>arrays[1], <const double*>arrays[2], <const double*>arrays[3],
            <const int64_t*>arrays[4], <const double*>arrays[5], <const double*>arrays[6],
            <const unsigned char*>arrays[7],
            <double*>bufs[nb - 2].buf, <unsigned char*>bufs[nb - 1].buf, ties,
            &pressure, &staked,
        )
        tie_list = [ties[i] for i in range(nt)]
    finally:
        free(ties)
        for i in range(nb):
            PyBuffer_Release(&bufs[i])
    costs = {"uncached_tokens": out[R_U], "queued_prefill": out[R_QP], "decode": out[R_D],
             "queue": out[R_QU]}
    if pressure:
        costs["kv_pressure"] = out[R_PR]
    if staked:
        costs["stake_tokens"] = out[R_ST]
    costs["eligible"] = el
    costs["cost"] = out[R_C]
    return costs, tie_list


# -- the kvroute policy's step: everything route() does after the index match ----------

# LoadArrays' arrays: (kind, written by the step), named as the twin names them
cdef int[5] _LOAD_KINDS = [F64, F64, I64, F64, F64]
_LOAD_NAMES = ("prefill_tokens", "decode_blocks", "active_requests", "waiting", "kv_usage")


cdef class ActiveRequest:
    """The router's record of one request in flight.

    See :class:`kvroute._route_py.ActiveRequest` (a dataclass there; the
    fields are the same, the three numbers stored as C doubles).
    """

    cdef public object worker
    cdef public double prefill_tokens
    cdef public double decode_blocks
    cdef public double last_seen
    cdef public object payload
    cdef public object hashes

    def __init__(self, worker, double prefill_tokens, double decode_blocks, double last_seen,
                 payload=None, hashes=None):
        self.worker = worker
        self.prefill_tokens = prefill_tokens
        self.decode_blocks = decode_blocks
        self.last_seen = last_seen
        self.payload = payload
        self.hashes = hashes

    def __eq__(self, other):
        if not isinstance(other, ActiveRequest):
            return NotImplemented
        o = <ActiveRequest>other
        return (self.worker, self.prefill_tokens, self.decode_blocks, self.last_seen,
                self.payload, self.hashes) == (o.worker, o.prefill_tokens, o.decode_blocks,
                                               o.last_seen, o.payload, o.hashes)

    __hash__ = None

    def __repr__(self):
        return (
            f"ActiveRequest(worker={self.worker!r}, prefill_tokens={self.prefill_tokens!r}, "
            f"decode_blocks={self.decode_blocks!r}, last_seen={self.last_seen!r}, "
            f"payload={self.payload!r}, hashes={self.hashes!r})"
        )


cdef class LoadArrays:
    """A LoadTracker's live per-position arrays, held for :func:`kvroute_step`.

    See :class:`kvroute._route_py.LoadArrays`. The arrays' buffers are
    acquired once, here, not on every step (they were most of a step's
    fixed cost); a ``LoadTracker`` builds a new one when its arrays change.
    """

    cdef Py_buffer _b[6]
    cdef int _nb
    cdef HMap* _posmap              # worker id -> position
    cdef readonly Py_ssize_t n
    cdef readonly object workers, prefill_tokens, decode_blocks, active_requests, waiting
    cdef readonly object kv_usage, active
    cdef readonly dict requests
    cdef const uint64_t* _ids
    cdef double* _pt
    cdef double* _db
    cdef int64_t* _act
    cdef const double* _wt
    cdef const double* _kv
    # the step's scratch (new decode blocks, ties, host, disk) and what it last read
    # from the policy: LoadArrays is used under its router's lock, one step at a time
    cdef char* _scratch
    cdef object _packed             # the policy's packed parameters, as last parsed
    cdef KvRaw _raw
    cdef object _rng
    cdef object _getrandbits

    def __init__(self, workers, prefill_tokens, decode_blocks, active_requests, waiting,
                 kv_usage, active, dict requests):
        cdef int j
        cdef Py_ssize_t i
        if self._nb:
            raise RuntimeError("LoadArrays is immutable")
        get_keys(workers, "workers", &self._b[0])
        self._nb = 1
        self.n = self._b[0].shape[0]
        arrays = (prefill_tokens, decode_blocks, active_requests, waiting, kv_usage)
        for j in range(5):
            _get_array(arrays[j], &self._b[j + 1], _LOAD_KINDS[j], self.n, _LOAD_NAMES[j],
                       j < 3, "")
            self._nb += 1
        self._ids = <const uint64_t*>self._b[0].buf
        self._pt = <double*>self._b[1].buf
        self._db = <double*>self._b[2].buf
        self._act = <int64_t*>self._b[3].buf
        self._wt = <const double*>self._b[4].buf
        self._kv = <const double*>self._b[5].buf
        self._posmap = hm_new()
        self._scratch = <char*>malloc(
            1 + self.n * (sizeof(double) + sizeof(Py_ssize_t) + 2 * sizeof(int64_t))
        )
        if self._posmap == NULL or self._scratch == NULL:
            raise MemoryError()
        for i in range(self.n):
            if hm_put(self._posmap, self._ids[i], <uint64_t>i) < 0:
                raise MemoryError()
        self.workers = <object>self._b[0].obj
        self.prefill_tokens = prefill_tokens
        self.decode_blocks = decode_blocks
        self.active_requests = active_requests
        self.waiting = waiting
        self.kv_usage = kv_usage
        self.active = active
        self.requests = requests

    def __dealloc__(self):
        cdef int j
        for j in range(self._nb):
            PyBuffer_Release(&self._b[j])
        hm_free(self._posmap)
        free(self._scratch)

    @property
    def pos(self):
        """Worker id -> position."""
        cdef Py_ssize_t i
        return {self._ids[i]: i for i in range(self.n)}

    def __repr__(self):
        return f"<LoadArrays n={self.n}>"


cdef class _StepCosts:
    """The costs of one :func:`kvroute_step`, as :func:`kvroute_costs` names them, built on first use.

    A read-only mapping over the step's own copy of the pass's rows (and the
    gate): a decision keeps it and turns it into arrays only if asked
    (``Decision.explain``).
    """

    cdef double* _buf        # NROWS rows of n doubles, then the gate (n bytes)
    cdef Py_ssize_t _n
    cdef bint _pressure, _staked
    cdef dict _d

    def __dealloc__(self):
        free(self._buf)

    cdef dict _dict(self):
        cdef Py_buffer view
        cdef Py_ssize_t n = self._n
        if self._d is None:
            out = np.empty((NROWS, n))
            el = np.empty(n, np.bool_)
            PyObject_GetBuffer(out, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
            memcpy(view.buf, self._buf, NROWS * n * sizeof(double))
            PyBuffer_Release(&view)
            PyObject_GetBuffer(el, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
            memcpy(view.buf, self._buf + NROWS * n, n)
            PyBuffer_Release(&view)
            d = {"uncached_tokens": out[R_U], "queued_prefill": out[R_QP], "decode": out[R_D],
                 "queue": out[R_QU]}
            if self._pressure:
                d["kv_pressure"] = out[R_PR]
            if self._staked:
                d["stake_tokens"] = out[R_ST]
            d["eligible"] = el
            d["cost"] = out[R_C]
            self._d = d
        return self._d

    def __getitem__(self, key):
        return self._dict()[key]

    def __iter__(self):
        return iter(self._dict())

    def __len__(self):
        return len(self._dict())

    def __contains__(self, key):
        return key in self._dict()

    def get(self, key, default=None):
        return self._dict().get(key, default)

    def keys(self):
        return self._dict().keys()

    def items(self):
        return self._dict().items()

    def values(self):
        return self._dict().values()

    def __eq__(self, other):
        return Mapping.__eq__(self, other)

    def __repr__(self):
        return f"<kvroute step costs {list(self._dict())}>"


Mapping.register(_StepCosts)


cdef int _get_match(object match, Py_buffer* view, Py_ssize_t n) except -1:
    """``match`` as a contiguous uint32 buffer of shape (n,) or (3, n), or the twin's TypeError."""
    cdef const char* f
    cdef bint ok = False
    if isinstance(match, _ndarray):
        try:
            PyObject_GetBuffer(match, view, PyBUF_RECORDS_RO)
        except (ValueError, BufferError, TypeError):
            pass
        else:
            f = view.format
            if f[0] == b"=" or f[0] == b"@":
                f += 1
            ok = view.itemsize == 4 and (f[0] == b"I" or f[0] == b"L") and f[1] == 0 and (
                (view.ndim == 1 and view.shape[0] == n)
                or (view.ndim == 2 and view.shape[0] == 3 and view.shape[1] == n)
            )
            if ok and not PyBuffer_IsContiguous(view, b"C"):
                PyBuffer_Release(view)
                return _get_match(np.ascontiguousarray(match), view, n)
            if ok:
                return 0
            PyBuffer_Release(view)
    raise TypeError(f"match must be a uint32 array of shape ({n},) or (3, {n})")


cdef inline uint64_t _splitmix64(uint64_t x) noexcept nogil:
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef Py_ssize_t _rendezvous(const Py_ssize_t* ties, Py_ssize_t nt, const uint64_t* ids,
                            uint64_t key) noexcept nogil:
    """The tie whose worker weighs most for ``key`` (see ``rendezvous_pick``); nt >= 1."""
    cdef Py_ssize_t i, p, best = -1
    cdef uint64_t w, best_w = 0
    for i in range(nt):
        p = ties[i]
        w = _splitmix64(key ^ _splitmix64(ids[p]))
        if best < 0 or w > best_w or (w == best_w and p < best):
            best = p
            best_w = w
    return best


cdef inline uint64_t _tie_key(const uint64_t* q, size_t L, const Py_ssize_t* ties, Py_ssize_t nt,
                              const int64_t* ov) noexcept nogil:
    """The key of the prompt's first block no tied worker holds (its last, 0 if empty)."""
    cdef Py_ssize_t i
    cdef int64_t m = 0
    if L == 0:
        return 0
    for i in range(nt):
        if ov[ties[i]] > m:
            m = ov[ties[i]]
    if <size_t>m >= L:
        m = <int64_t>L - 1
    return q[m]


def tie_key(hashes, ties, overlap):
    """The block key a rendezvous tie-break hashes.

    See :func:`kvroute._route_py.tie_key`.
    """
    cdef Py_buffer kb
    get_keys(hashes, "hashes", &kb)
    try:
        L = kb.shape[0]
        if L == 0:
            return 0
        m = max([int(overlap[t]) for t in ties], default=0)
        m = min(max(m, 0), L - 1)
        return (<const uint64_t*>kb.buf)[m]
    finally:
        PyBuffer_Release(&kb)


def rendezvous_pick(ties, workers, key):
    """Among the tied positions, the one whose worker ranks first for ``key``.

    See :func:`kvroute._route_py.rendezvous_pick`.
    """
    cdef Py_buffer wb
    cdef uint64_t k = as_u64(key, "key")
    cdef Py_ssize_t n, i, p, best = -1
    cdef uint64_t w, best_w = 0
    cdef const uint64_t* ids
    get_keys(workers, "workers", &wb)
    try:
        ids = <const uint64_t*>wb.buf
        n = wb.shape[0]
        for t in ties:
            p = t
            if p < 0 or p >= n:
                raise IndexError(f"tie {p} is not a position among {n} workers")
            w = _splitmix64(k ^ _splitmix64(ids[p]))
            if best < 0 or w > best_w or (w == best_w and p < best):
                best = p
                best_w = w
    finally:
        PyBuffer_Release(&wb)
    if best < 0:
        raise ValueError("rendezvous_pick needs at least one tie")
    return best


cdef Py_ssize_t _randbelow(object getrandbits, Py_ssize_t n) except -1:
    """``rng.randrange(n)`` for n >= 1, drawing the same bits (``_randbelow_with_getrandbits``).

    ``getrandbits`` is the generator's bound method.
    """
    cdef Py_ssize_t r
    cdef int k = 0
    cdef Py_ssize_t m = n
    while m:
        k += 1
        m >>= 1
    r = getrandbits(k)
    while r >= n:
        r = getrandbits(k)
    return r


cdef int _py_overlay(object fresh, object hashes, double now, object ov_arr, object pos,
                     bint tiered, Py_ssize_t n, int64_t* host, int64_t* disk) except -1:
    """``fresh.overlay`` for a record that is not this module's (the twin's, say)."""
    cdef Py_ssize_t i
    if not tiered:
        fresh.overlay(hashes, now, ov_arr, pos, skip_known=True)
        return 0
    h = np.array([host[i] for i in range(n)], np.int64)
    d = np.array([disk[i] for i in range(n)], np.int64)
    fresh.overlay(hashes, now, ov_arr, pos, skip_known=False, host=h, disk=d)
    for i in range(n):
        host[i] = h[i]
        disk[i] = d[i]
    return 0


cdef object _np_empty = np.empty
cdef object _I64 = np.dtype(np.int64)


def kvroute_step(policy, load, fresh, request_id, payload, match, hashes, double now,
                 prompt_tokens, block_size, double out_blocks, busy=None):
    """Choose a worker with the ``kvroute`` policy over every live worker, and count the request.

    See :func:`kvroute._route_py.kvroute_step`.
    """
    cdef Py_buffer kb, mb, bb, ob
    cdef bint have_k = False, have_m = False, have_b = False, have_o = False
    cdef Py_ssize_t n, i, nt, p
    cdef size_t L
    cdef const uint64_t* q
    cdef const uint32_t* m
    cdef int64_t* ov
    cdef int64_t* host = NULL
    cdef int64_t* disk = NULL
    cdef double* nd
    cdef Py_ssize_t* ties
    cdef bint tiered, pressure, staked
    cdef KvParams k
    cdef KvRaw raw
    cdef int64_t matched, cached, prompt, bsz
    cdef uint32_t added
    cdef LoadArrays la
    cdef ActiveRequest rec
    cdef ActivePrefixes ap = None
    cdef _StepCosts costs
    cdef FreshDecisions fd = None
    cdef _Bucket bucket = None
    cdef uint64_t slot
    if not isinstance(load, LoadArrays):
        raise TypeError(f"load must be a LoadArrays, not {type(load).__name__}")
    la = <LoadArrays>load
    if request_id in la.requests:
        raise ValueError(f"request {request_id!r} is already in flight")
    n = la.n
    entry = None
    try:
        get_keys(hashes, "hashes", &kb)
        have_k = True
        q = <const uint64_t*>kb.buf
        L = <size_t>kb.shape[0]
        if n == 0:
            raise ValueError("Candidates needs at least one worker")
        _get_match(match, &mb, n)
        have_m = True
        tiered = mb.ndim == 2
        m = <const uint32_t*>mb.buf
        if busy is not None:
            _get_array(busy, &bb, BOOL, n, "busy", False, "")
            have_b = True
        try:
            packed = policy._packed_params
        except AttributeError:
            packed = None
        if packed is None or packed is not la._packed:
            _read_raw(policy, &raw)
            if type(packed) is tuple:
                la._packed = packed
                la._raw = raw
        else:
            raw = la._raw
        _derive(&raw, <double>block_size, <double>prompt_tokens, &k)
        prompt = prompt_tokens
        bsz = block_size
        # outputs: the overlap, and the costs (their rows, then the gate)
        ov_arr = _np_empty(n, _I64)
        PyObject_GetBuffer(ov_arr, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        have_o = True
        ov = <int64_t*>ob.buf
        costs = _StepCosts.__new__(_StepCosts)
        costs._n = n
        costs._buf = <double*>malloc(n * (NROWS * sizeof(double) + 1))
        if costs._buf == NULL:
            raise MemoryError()
        # scratch: new decode blocks, ties, host and disk
        nd = <double*>la._scratch
        ties = <Py_ssize_t*>(nd + n)
        host = <int64_t*>(ties + n)
        disk = host + n
        if tiered:
            for i in range(n):
                host[i] = m[n + i]
                disk[i] = m[2 * n + i]
                ov[i] = <int64_t>m[i] + host[i] + disk[i]
        else:
            for i in range(n):
                ov[i] = m[i]
        # the fresh decisions of the prompt's first block (FreshDecisions.overlay)
        if type(fresh) is FreshDecisions:
            fd = <FreshDecisions>fresh
            if L:
                bucket = fd._buckets.get(q[0])
                if bucket is not None:
                    _bucket_overlay(bucket, q, L, now, ov, la._posmap, None, not tiered,
                                    host if tiered else NULL, disk if tiered else NULL)
        elif fresh is not None:
            _py_overlay(fresh, <object>kb.obj, now, ov_arr, la.pos, tiered, n, host, disk)
        if type(la.active) is ActivePrefixes:
            ap = <ActivePrefixes>la.active
            ap._new_blocks_into(q, L, la._ids, <size_t>n, nd)
        else:
            nb_arr = la.active.new_blocks(<object>kb.obj, la.workers)
            for i in range(n):
                nd[i] = nb_arr[i]
        if out_blocks:
            for i in range(n):
                nd[i] += out_blocks
        nt = _kvroute_pass(
            n, &k, ov, host if tiered else NULL, disk if tiered else NULL, la._pt, la._db, nd,
            la._act, la._wt, la._kv, <const unsigned char*>bb.buf if have_b else NULL,
            costs._buf, <unsigned char*>(costs._buf + NROWS * n), ties, &pressure, &staked,
        )
        costs._pressure = pressure
        costs._staked = staked
        if nt == 1:
            p = ties[0]
        elif getattr(policy, "_rendezvous", False):
            p = _rendezvous(ties, nt, la._ids, _tie_key(q, L, ties, nt, ov))
        else:
            rng = policy._rng
            if rng is not la._rng:
                la._rng = rng
                la._getrandbits = rng.getrandbits
            p = ties[_randbelow(la._getrandbits, nt)]
        worker = la._ids[p]
        matched = ov[p]
        cached = matched * bsz
        if cached > prompt:
            cached = prompt
        if fd is not None:
            entry = fd._record(la._ids[p], <object>kb.obj, &kb, now)
        elif fresh is not None:
            entry = fresh.record(worker, <object>kb.obj, now)
        la._pt[p] += <double>(prompt - cached)
        la._act[p] += 1
        if ap is not None:
            added = ap._add(<uint64_t>la._ids[p], q, L)
        else:
            added = la.active.add(worker, <object>kb.obj)
        la._db[p] += out_blocks + <double>added
        rec = ActiveRequest.__new__(ActiveRequest)
        rec.worker = worker
        rec.prefill_tokens = <double>(prompt - cached)
        rec.decode_blocks = out_blocks
        rec.last_seen = now
        rec.payload = payload
        rec.hashes = <object>kb.obj
        la.requests[request_id] = rec
    finally:
        if have_o:
            PyBuffer_Release(&ob)
        if have_b:
            PyBuffer_Release(&bb)
        if have_m:
            PyBuffer_Release(&mb)
        if have_k:
            PyBuffer_Release(&kb)
    return p, worker, matched, ov_arr, costs, entry
