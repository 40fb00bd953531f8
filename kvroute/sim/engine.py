"""A per-worker engine model: vLLM-like prefix cache, chunked prefill, decode batches.

One :class:`Engine` stands for one vLLM worker. It owns a prefix cache of
``num_gpu_blocks`` blocks, a waiting queue and a running set, and advances in
*passes* (engine steps), as vLLM's scheduler does:

1. Running requests are scheduled first, in admission order: a request still
   prefilling gets the next chunk of its prompt, a decoding request one token;
   each costs its tokens from the pass budget ``max_num_batched_tokens``.
2. Waiting requests are admitted in FIFO order while fewer than
   ``max_num_seqs`` run and budget remains. On admission the request's prompt
   is matched against the cache (leading full blocks only) and the matched
   blocks are not computed again.
3. The pass lasts ``prefill_ms(new tokens) + decode_ms(utilisation)``; every
   request whose prompt is fully computed emits one token at the pass end
   (the pass that finishes a prompt emits its first token).

The cache is :class:`kvroute._block_pool.BlockPool`, the model of vLLM's
block pool that the benchmark and the mock worker use too: a block referenced
by a running request is *active*; when its last reference goes it becomes
*inactive* but stays cached and reusable until evicted, least recently
released first. A finished request releases its blocks tail-first, so its
last blocks are evicted before its first ones (shared prefixes survive
longest). Here a slot is allocated before its tokens are computed: a block
becomes reusable (and a ``stored`` event is emitted) once its tokens are
computed and it is full; a partial tail block is never shared.

Timing defaults reproduce NVIDIA Dynamo's mocker polynomial model
(``aisimulate`` ``perf_model.rs``): prefill of ``t`` new tokens in a pass
takes ``4.209989e-7 t^2 + 1.518344e-2 t + 16.50142`` ms; a decode step takes
``max(1, -25.74 u^2 + 54.01 u + 5.74)`` ms where ``u`` is the decoding
requests' total context over the cache capacity, in tokens (clamped to 1).
See docs/simulator.md for the calibration.

Quiet decode stretches (no arrivals, no block boundary, no completion) are
advanced in bulk with numpy, so the cost of a replay grows with the number of
requests and blocks, not with the number of output tokens.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .._block_pool import BlockPool
from .workloads import SimRequest, fresh_key

__all__ = [
    "Engine",
    "EngineConfig",
    "PassResult",
    "TimingModel",
]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class TimingModel:
    """How long a pass takes, in milliseconds (defaults: Dynamo 1.6.1's mocker polynomial).

    >>> t = TimingModel()
    >>> round(t.prefill_ms(8192), 2), round(t.decode_ms(0.0), 2), round(t.decode_ms(1.0), 2)
    (169.14, 5.74, 34.01)

    :param prefill_a: ms per squared new token of the pass.
    :param prefill_b: ms per new token.
    :param prefill_c: fixed ms per pass that prefills anything.
    :param prefill_context: ms per (new token x cached context token): attention
        of the new tokens over the context already in cache. 0 in Dynamo's model;
        ``2 * prefill_a`` is the physically matching value.
    :param decode_a: ms per squared utilisation.
    :param decode_b: ms per utilisation.
    :param decode_c: ms per decode step at zero utilisation.
    :param decode_floor: minimum decode step, ms.
    :param speedup: divides every duration (Dynamo's ``speedup_ratio``).
    :raises ValueError: ``speedup`` is not > 0.
    """

    prefill_a: float = 4.209989e-07
    prefill_b: float = 1.518344e-02
    prefill_c: float = 16.50142
    prefill_context: float = 0.0
    decode_a: float = -25.74
    decode_b: float = 54.01
    decode_c: float = 5.74
    decode_floor: float = 1.0
    speedup: float = 1.0

    def __post_init__(self) -> None:
        if not self.speedup > 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup!r}")

    def prefill_ms(self, new_tokens: int, context_pairs: float = 0.0) -> float:
        """Prefill time of one pass.

        :param new_tokens: uncached prompt tokens computed in the pass (all requests).
        :param context_pairs: sum over the pass's chunks of ``chunk x tokens before it``.
        :returns: milliseconds (0 when nothing is prefilled).
        """
        if new_tokens <= 0:
            return 0.0
        t = float(new_tokens)
        ms = self.prefill_a * t * t + self.prefill_b * t + self.prefill_c
        ms += self.prefill_context * context_pairs
        return ms / self.speedup

    def decode_ms(self, utilization: float) -> float:
        """Decode time of one step.

        :param utilization: decoding context tokens / cache capacity in tokens.
        :returns: milliseconds.
        """
        u = min(max(utilization, 0.0), 1.0)
        ms = self.decode_a * u * u + self.decode_b * u + self.decode_c
        return max(ms, self.decode_floor) / self.speedup

    def decode_ms_array(self, utilization: F64) -> F64:
        """:meth:`decode_ms` over an array of utilisations (for bulk decode).

        :param utilization: utilisations, one per step.
        :returns: milliseconds, one per step.
        """
        u = np.clip(utilization, 0.0, 1.0)
        ms = (self.decode_a * u + self.decode_b) * u + self.decode_c
        out: F64 = np.maximum(ms, self.decode_floor) / self.speedup
        return out


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """One worker's engine settings (defaults: Dynamo 1.6.1 mocker's vLLM defaults).

    :param num_gpu_blocks: KV cache capacity in blocks.
    :param block_size: tokens per KV block.
    :param max_num_seqs: most requests running at once.
    :param max_num_batched_tokens: token budget of one pass (prefill chunks + decodes).
    :param enable_prefix_caching: reuse cached prompt blocks.
    :param decode_load: ``"logical"`` (sum of the decoding requests' context
        lengths, Dynamo 1.6's choice) or ``"physical"`` (referenced blocks) as
        the decode utilisation's numerator.
    :param timing: the pass duration model.
    :raises ValueError: a limit is not a positive int, or ``decode_load`` is unknown.
    """

    num_gpu_blocks: int = 16384
    block_size: int = 64
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    decode_load: str = "logical"
    timing: TimingModel = field(default_factory=TimingModel)

    def blocks_needed(self, prompt_len: int, output_len: int) -> int:
        """KV blocks a request holds when it ends; more than ``num_gpu_blocks`` and it is rejected.

        >>> EngineConfig(block_size=4).blocks_needed(8, 0)   # at least one token is generated
        3

        :param prompt_len: prompt tokens.
        :param output_len: tokens to generate.
        :returns: ``ceil((prompt_len + max(1, output_len)) / block_size)``.
        """
        return -(-(prompt_len + max(1, output_len)) // self.block_size)

    def __post_init__(self) -> None:
        for name in ("num_gpu_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.decode_load not in ("logical", "physical"):
            raise ValueError(
                f"decode_load must be 'logical' or 'physical', not {self.decode_load!r}"
            )


class _Seq:
    """One request inside an engine."""

    __slots__ = (
        "blocks",
        "cached",
        "computed",
        "generated",
        "hashes",
        "idx",
        "out_len",
        "prompt_len",
        "req",
        "seq_len",
        "tail",
    )

    def __init__(self, req: SimRequest, idx: int) -> None:
        self.req = req
        self.idx = idx
        self.prompt_len = req.prompt_len
        self.out_len = max(1, req.output_len)
        self.seq_len = req.prompt_len
        self.computed = 0
        self.generated = 0
        #: known full-block keys of the sequence (grows with fresh keys)
        self.hashes: list[int] = list(req.hashes)
        #: full blocks held, in order
        self.blocks: list[int] = []
        #: 1 if a partial tail slot is held
        self.tail = 0
        #: prompt tokens found cached at first admission (-1: not admitted yet)
        self.cached = -1


@dataclass(slots=True)
class PassResult:
    """What a pass (or a bulk decode stretch) produced, all at its end time.

    :param first_token: requests (indices) that emitted their first token.
    :param finished: requests (indices) that emitted their last token.
    :param stored: ``(keys, parent)`` chains that became reusable.
    :param removed: keys evicted.
    :param rejected: requests (indices) dropped because they can never fit the cache.
    :param steps: engine steps covered.
    """

    first_token: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    stored: list[tuple[list[int], int | None]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    steps: int = 0


class Engine:
    """One simulated worker. Driven by :mod:`kvroute.sim.replay`; time is passed in, in seconds.

    Usage: :meth:`enqueue` requests; :meth:`begin` a pass at time ``t`` (returns
    its end, or None if idle); at that end call :meth:`finish`. An arrival
    during a bulk decode stretch calls :meth:`interrupt`, which shortens it to
    the steps already started.

    >>> from kvroute.sim.workloads import SimRequest
    >>> e = Engine(EngineConfig(num_gpu_blocks=8, block_size=4))
    >>> e.enqueue(SimRequest("a", 0.0, 10, 3, (1, 2)))
    0
    >>> end = e.begin(0.0)
    >>> r = e.finish(); r.first_token, r.stored
    ([0], [([1, 2], None)])

    :param config: the engine settings.
    :param on_fresh_key: returns a new unique block key (for blocks the
        workload did not name, e.g. generated tokens); default :func:`fresh_key`.
    :param bulk_decode: advance quiet decode stretches in bulk (False: one
        step per pass; same results, for testing).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        on_fresh_key: Callable[[], int] | None = None,
        *,
        bulk_decode: bool = True,
    ) -> None:
        self.config = config or EngineConfig()
        self._bulk_ok = bulk_decode
        self.cache = BlockPool(self.config.num_gpu_blocks)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._fresh = on_fresh_key or fresh_key
        self._next_idx = 0
        #: requests this engine ever received, by local index
        self.requests: list[_Seq] = []
        self._pending: PassResult | None = None
        self._emit: list[_Seq] = []
        self._bulk: tuple[float, F64] | None = None
        self.preemptions = 0
        self.steps = 0

    # -- queueing ----------------------------------------------------------------

    def enqueue(self, req: SimRequest) -> int:
        """Add a request to the waiting queue.

        :returns: its local index (as reported in :class:`PassResult`).
        """
        s = _Seq(req, self._next_idx)
        self._next_idx += 1
        self.requests.append(s)
        self.waiting.append(s)
        return s.idx

    def idle(self) -> bool:
        """True when nothing is waiting or running."""
        return not self.waiting and not self.running

    def cached_prefix(self, keys: Sequence[int]) -> int:
        """Leading blocks of ``keys`` this engine holds now (ground truth, for regret)."""
        return self.cache.match(keys)

    # -- one pass ----------------------------------------------------------------

    def begin(self, now: float) -> float | None:
        """Schedule the pass starting at ``now``.

        :param now: seconds.
        :returns: when it ends (seconds), or None if the engine is idle.
        :raises RuntimeError: a pass is already in progress.
        """
        if self._pending is not None:
            raise RuntimeError("finish() the previous pass first")
        if not self.running and not self.waiting:
            return None
        k = self._quiet_steps() if self._bulk_ok else 0
        if k > 0:
            return self._begin_bulk(now, k)
        return self._begin_pass(now)

    def _quiet_steps(self) -> int:
        # Steps every running request can take with no allocation, no block
        # becoming full, no completion, and no admission possible.
        if self.waiting or not self.running:
            return 0
        cfg = self.config
        if len(self.running) > cfg.max_num_batched_tokens:
            return 0
        bs = cfg.block_size
        k = 1 << 62
        for s in self.running:
            if s.computed != s.seq_len - 1 or s.generated == 0:
                return 0
            slots = (len(s.blocks) + s.tail) * bs
            # step j computes token seq_len+j: quiet while it is inside the held
            # slots and does not complete a block, and the emission is not the last
            q = min(s.out_len - s.generated - 1, (-s.seq_len) % bs, slots - s.seq_len + 1)
            if q < k:
                k = q
                if k <= 0:
                    return 0
        return k

    def _begin_bulk(self, now: float, k: int) -> float:
        cfg = self.config
        cap = float(cfg.num_gpu_blocks * cfg.block_size)
        if cfg.decode_load == "logical":
            s0 = float(sum(s.seq_len for s in self.running))
            util = (s0 + len(self.running) * np.arange(k, dtype=np.float64)) / cap
        else:
            util = np.full(k, self.cache.active_blocks() * cfg.block_size / cap)
        ends = now + np.cumsum(cfg.timing.decode_ms_array(util)) / 1000.0
        self._bulk = (now, ends)
        self._pending = PassResult(steps=k)
        return float(ends[-1])

    def interrupt(self, t: float) -> float | None:
        """A request arrived at ``t``: cut a bulk decode stretch after the step running at ``t``.

        :returns: the new end of the current pass, or None if it is unchanged.
        """
        if self._bulk is None or self._pending is None:
            return None
        start, ends = self._bulk
        # steps starting before t run; the one starting at or after t sees the arrival
        k = int(np.searchsorted(ends, t, side="left")) + 1
        if t <= start:
            k = 0
        if k >= len(ends):
            return None
        self._bulk = (start, ends[:k])
        self._pending.steps = k
        return float(ends[k - 1]) if k else start

    def _begin_pass(self, now: float) -> float:
        cfg = self.config
        cache = self.cache
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        res = PassResult(steps=1)
        new_tokens = 0
        pairs = 0.0
        cache.removed = res.removed
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            want = min(s.seq_len - s.computed, budget)
            if want <= 0:
                i += 1
                continue
            if not self._grow(s, s.computed + want, res):
                # out of cache: preempt the newest running request (vLLM's LIFO)
                victim = running.pop()
                self._preempt(victim)
                if victim is s:
                    continue
                continue
            if not (want == 1 and s.generated > 0 and s.computed == s.seq_len - 1):
                # prefill work (a prompt chunk, or recomputation after preemption)
                new_tokens += want
                pairs += want * s.computed
            s.computed += want
            budget -= want
            i += 1
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            s = waiting[0]
            if cfg.blocks_needed(s.prompt_len, s.out_len) > cache.capacity:
                waiting.popleft()  # can never fit, even alone
                res.rejected.append(s.idx)
                continue
            keys = s.hashes
            nfull = min(len(keys), (s.seq_len - 1) // bs)
            m = cache.match(keys[:nfull]) if cfg.enable_prefix_caching else 0
            start = m * bs
            want = min(s.seq_len - start, budget)
            need = -(-(start + want) // bs) - m
            pinned = sum(1 for k in keys[:m] if cache.ref[k] == 0)
            if not cache.can_allocate(need, pinned):
                break
            waiting.popleft()
            cache.acquire(keys[:m])
            s.blocks = list(keys[:m])
            s.computed = start
            if s.cached < 0:
                s.cached = min(start, s.prompt_len)
            ok = self._grow(s, start + want, res)
            assert ok
            new_tokens += want
            pairs += want * start
            s.computed = start + want
            budget -= want
            running.append(s)
        self.steps += 1
        t = cfg.timing
        ms = t.prefill_ms(new_tokens, pairs)
        emit = [s for s in running if s.computed >= s.seq_len]
        if emit:
            cap = float(cfg.num_gpu_blocks * bs)
            if cfg.decode_load == "logical":
                util = sum(s.seq_len for s in emit) / cap
            else:
                util = cache.active_blocks() * bs / cap
            ms += t.decode_ms(util)
        self._emit = emit
        self._pending = res
        return now + ms / 1000.0

    def _grow(self, s: _Seq, upto: int, res: PassResult) -> bool:
        """Hold slots for ``s``'s first ``upto`` tokens; name blocks that became full."""
        cache = self.cache
        bs = self.config.block_size
        have = len(s.blocks) + s.tail
        need = -(-upto // bs) - have
        if need > 0 and not cache.allocate(need):
            return False
        if need > 0:
            s.tail += need
        full = upto // bs
        nb = len(s.blocks)
        if full > nb:
            hashes = s.hashes
            chain: list[int] = []
            parent = s.blocks[-1] if nb else None
            for j in range(nb, full):
                if j < len(hashes):
                    key = hashes[j]
                else:
                    key = self._fresh()
                    hashes.append(key)
                new = cache.name(key)
                s.tail -= 1
                s.blocks.append(key)
                if new:
                    chain.append(key)
                elif chain:
                    res.stored.append((chain, parent))
                    chain = []
                if not chain:
                    parent = key
            if chain:
                res.stored.append((chain, parent))
        return True

    def _preempt(self, s: _Seq) -> None:
        self.cache.release(s.blocks, s.tail)
        s.blocks = []
        s.tail = 0
        s.computed = 0
        self.preemptions += 1
        self.waiting.appendleft(s)

    def finish(self) -> PassResult:
        """Apply the pass that just ended: emit tokens, release finished requests.

        :returns: what happened.
        :raises RuntimeError: no pass in progress.
        """
        res = self._pending
        if res is None:
            raise RuntimeError("no pass in progress")
        self._pending = None
        if self._bulk is not None:
            self._bulk = None
            k = res.steps
            self.steps += k
            for s in self.running:
                s.generated += k
                s.seq_len += k
                s.computed += k
            return res
        cache = self.cache
        done = False
        for s in self._emit:
            s.generated += 1
            if s.generated == 1:
                res.first_token.append(s.idx)
            if s.generated >= s.out_len:
                res.finished.append(s.idx)
                cache.release(s.blocks, s.tail)
                s.blocks = []
                s.tail = 0
                done = True
            else:
                s.seq_len += 1
        if done:
            fin = set(res.finished)
            self.running = [s for s in self.running if s.idx not in fin]
        self._emit = []
        return res

    def _check(self) -> None:
        """O(n) invariant check over the cache and the requests' block holdings.

        :raises AssertionError: an invariant is broken.
        """
        self.cache._check()
        held: dict[int, int] = {}
        anon = 0
        for s in self.running:
            for k in s.blocks:
                held[k] = held.get(k, 0) + 1
            anon += s.tail
            assert s.computed <= s.seq_len
            assert (len(s.blocks) + s.tail) * self.config.block_size >= s.computed
            assert math.ceil(s.computed / self.config.block_size) == len(s.blocks) + s.tail
        for k, c in self.cache.ref.items():
            assert held.get(k, 0) == c, (k, c, held.get(k, 0))
        assert anon == self.cache.unnamed
