"""Workloads for the simulator: Mooncake-format traces and an agentic-session generator.

Every workload becomes a list of :class:`SimRequest`, sorted by arrival. A
request names the KV blocks of its sequence by *block keys*: uint64 values
that encode the whole prefix up to and including the block, exactly like a
chained block hash. Two requests share a cached prefix of ``k`` blocks iff
their first ``k`` keys are equal. Keys are scrambled with a bijective 64-bit
mixer, so they look like hashes to the index (no clustering) and never
collide.

A request's ``hashes`` may run past its prompt into its output: an agentic
turn's output is part of the next turn's prompt, so the engine names the
blocks its decode fills with those keys and the next turn finds them cached.
Blocks the workload does not name (e.g. a Mooncake request's output) get
fresh, never-shared keys from :func:`fresh_key`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..traces import TraceRequest, iter_trace

__all__ = [
    "AgenticConfig",
    "SimRequest",
    "agentic_sessions",
    "fresh_key",
    "fresh_key_at",
    "load_mooncake",
    "mix64",
    "mooncake_requests",
]

U64 = npt.NDArray[np.uint64]
_MASK = (1 << 64) - 1
_FRESH_BASE = 1 << 63
_fresh_counter = itertools.count()

#: The bundled Mooncake conversation trace (12,031 requests, one hour).


def mix64(x: U64) -> U64:
    """The splitmix64 finaliser: a bijection on uint64 that scatters sequential keys.

    >>> mix64(np.array([0, 1], dtype=np.uint64)).tolist()
    [0, 6238072747940578789]

    :param x: keys.
    :returns: mixed keys (a new array).
    """
    z = np.asarray(x, dtype=np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _mix_int(x: int) -> int:
    z = x & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def fresh_key_at(k: int) -> int:
    """The ``k``-th block key no workload produces (for blocks of unshared content).

    :param k: a counter value (>= 0); distinct values give distinct keys.
    :returns: a uint64 key (top bit set before mixing, so it never equals a workload's).
    """
    return _mix_int(_FRESH_BASE + k)


def fresh_key() -> int:
    """A block key no workload produces, from a process-wide counter.

    An engine outside a replay uses it; :func:`kvroute.sim.replay.replay`
    counts its own keys (:func:`fresh_key_at`) so a replay's outcome never
    depends on what ran before it in the process.

    :returns: a unique uint64 key.
    """
    return fresh_key_at(next(_fresh_counter))


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a workload.

    :param request_id: unique id (used with the dispatcher's lifecycle calls).
    :param arrival: arrival time, seconds from the start of the workload.
    :param prompt_len: prompt tokens.
    :param output_len: tokens to generate (at least one is generated).
    :param hashes: block keys of the sequence's full blocks, prompt first; may
        extend into the output.
    :param session_id: conversation / agent session, if known.
    """

    request_id: str | int
    arrival: float
    prompt_len: int
    output_len: int
    hashes: Sequence[int]
    session_id: str | None = None

    def prompt_blocks(self, block_size: int) -> int:
        """Number of full prompt blocks named by :attr:`hashes`.

        :param block_size: tokens per block.
        :returns: ``min(len(hashes), prompt_len // block_size)``.
        """
        return min(len(self.hashes), self.prompt_len // block_size)


def _block_keys(ids: Sequence[int], n: int, block_size: int, trace_block_size: int) -> U64:
    """Keys of the first ``n`` engine blocks, from a row's trace block ids."""
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.asarray(ids, dtype=np.uint64)
    if block_size == trace_block_size:
        raw = h[:n]
    elif trace_block_size % block_size == 0:
        r = trace_block_size // block_size
        i = np.arange(n)
        raw = h[i // r] * np.uint64(r) + (i % r).astype(np.uint64)
    else:
        r = block_size // trace_block_size
        raw = h[(np.arange(n) + 1) * r - 1] * np.uint64(r) + np.uint64(r - 1)
    # a per-geometry salt keeps keys of different block sizes apart
    return mix64(raw ^ np.uint64(block_size << 48))


def mooncake_requests(
    rows: Iterable[TraceRequest],
    *,
    block_size: int,
    trace_block_size: int = 512,
    speedup: float = 1.0,
) -> list[SimRequest]:
    """Turn trace requests (see :mod:`kvroute.traces`) into simulator requests.

    >>> from kvroute.traces import TraceRequest
    >>> r, = mooncake_requests([TraceRequest(1000, 1100, 5, (7, 8, 9))], block_size=512)
    >>> r.arrival, r.prompt_len, len(r.hashes)
    (1.0, 1100, 2)

    :param rows: the trace's requests, as :func:`kvroute.traces.iter_trace` yields them.
    :param block_size: the engine's tokens per block; must divide, or be a
        multiple of, ``trace_block_size``.
    :param trace_block_size: tokens per trace hash id.
    :param speedup: arrival times are divided by this.
    :returns: requests, sorted by arrival (stable); ``request_id`` is the row number.
    :raises ValueError: incompatible block sizes or a bad speed-up.
    """
    if block_size < 1 or trace_block_size < 1:
        raise ValueError("block sizes must be >= 1")
    if trace_block_size % block_size and block_size % trace_block_size:
        raise ValueError(
            f"block_size {block_size} must divide or be a multiple of "
            f"trace_block_size {trace_block_size}"
        )
    if not (speedup > 0 and math.isfinite(speedup)):
        raise ValueError(f"speedup must be a finite number > 0, got {speedup!r}")
    out: list[SimRequest] = []
    for i, row in enumerate(rows):
        covered = len(row.hash_ids) * trace_block_size
        n = min(row.input_length, covered) // block_size
        keys = _block_keys(list(row.hash_ids), n, block_size, trace_block_size)
        out.append(
            SimRequest(
                i,
                float(row.timestamp) / 1000.0 / speedup,
                row.input_length,
                row.output_length,
                tuple(keys.tolist()),
                row.session_id,
            )
        )
    out.sort(key=lambda r: r.arrival)
    return out


def load_mooncake(
    path: str | os.PathLike[str] | None = None,
    *,
    block_size: int = 512,
    trace_block_size: int = 512,
    speedup: float = 1.0,
    limit: int | None = None,
) -> list[SimRequest]:
    """Read a Mooncake-format jsonl trace (optionally gzipped) as simulator requests.

    The file is read by :func:`kvroute.traces.iter_trace`. Hash id ``k`` of a
    row names the row's ``k``-th block of ``trace_block_size`` tokens; equal
    ids mean an equal prefix up to and including that block. Only full
    engine blocks inside the prompt get keys (a partial last block is never
    shared, as in vLLM).

    :param path: the trace (default: the bundled conversation trace).
    :param block_size: the engine's tokens per block.
    :param trace_block_size: tokens per trace hash id (Mooncake: 512).
    :param speedup: divide arrival times by this (2.0 = twice the request rate).
    :param limit: read only the first ``limit`` rows.
    :returns: requests sorted by arrival; ``request_id`` is the row number.
    :raises ValueError: see :func:`mooncake_requests`.
    :raises kvroute.traces.TraceError: a malformed line, named ``FILE:LINE``.
    :raises OSError: the file cannot be read.
    """
    return mooncake_requests(
        iter_trace(path, limit=limit),
        block_size=block_size,
        trace_block_size=trace_block_size,
        speedup=speedup,
    )


# -- agentic sessions -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgenticConfig:
    """Knobs of :func:`agentic_sessions` (defaults: Claude-Code-like sessions).

    Token counts are drawn from lognormal distributions given by their median
    and ``sigma``; pauses from a lognormal body with a Pareto tail.

    :param sessions: top-level sessions to generate.
    :param harnesses: distinct harnesses (system prompt + tool schemas); each
        session uses one, chosen uniformly.
    :param harness_tokens: (min, max) harness prefix length, uniform.
    :param session_rate: new sessions per second (Poisson arrivals).
    :param turns_median: median model calls per session (lognormal, sigma 0.6, >= 1).
    :param first_user_tokens: median tokens of the session's first user message.
    :param tool_result_tokens: median tool-result tokens appended per turn.
    :param tool_result_sigma: lognormal sigma of tool results (long tail: file reads).
    :param tool_result_max: cap on one tool result (agent harnesses truncate).
    :param output_tokens: median assistant output tokens per call.
    :param output_sigma: lognormal sigma of output lengths.
    :param tool_pause_s: median pause between a response and the next call (tool runtime).
    :param tool_pause_tail: probability a pause comes from the Pareto tail.
    :param tool_pause_tail_alpha: Pareto shape of the tail (smaller: heavier).
    :param response_s_per_token: nominal decode time per output token, used to
        place the next turn after a response (the workload is open-loop).
    :param response_s_fixed: nominal time to first token.
    :param fanout_prob: probability a turn fans out to subagents.
    :param fanout_width: (min, max) subagents per fan-out.
    :param subagent_turns: median turns of a subagent.
    :param subagent_task_tokens: median tokens of a subagent's task message.
    :param subagent_result_tokens: median tokens each subagent's result adds to
        the parent on reconvergence.
    :param context_limit: compact when the context would exceed this many tokens.
    :param compact_summary_tokens: median tokens of the summary that replaces
        the history on compaction.
    :param max_fanout_depth: subagents of subagents up to this depth.
    """

    sessions: int = 64
    harnesses: int = 3
    harness_tokens: tuple[int, int] = (10_000, 25_000)
    session_rate: float = 0.05
    turns_median: float = 20.0
    first_user_tokens: float = 400.0
    tool_result_tokens: float = 1500.0
    tool_result_sigma: float = 1.1
    tool_result_max: int = 25_000
    output_tokens: float = 180.0
    output_sigma: float = 0.9
    tool_pause_s: float = 2.0
    tool_pause_tail: float = 0.1
    tool_pause_tail_alpha: float = 1.3
    response_s_per_token: float = 0.02
    response_s_fixed: float = 0.5
    fanout_prob: float = 0.06
    fanout_width: tuple[int, int] = (2, 5)
    subagent_turns: float = 6.0
    subagent_task_tokens: float = 600.0
    subagent_result_tokens: float = 800.0
    context_limit: int = 160_000
    compact_summary_tokens: float = 6_000.0
    max_fanout_depth: int = 1


class _Context:
    """An append-only token stream, as segments, with the keys of its full blocks.

    Block ``i``'s key chains the previous key with the pieces (segment id,
    start, end) the block covers, so equal keys mean equal prefixes.
    """

    __slots__ = ("block_size", "keys", "length", "tail")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.keys: list[int] = []
        self.length = 0
        self.tail: list[tuple[int, int, int]] = []

    def copy(self) -> _Context:
        c = _Context(self.block_size)
        c.keys = list(self.keys)
        c.length = self.length
        c.tail = list(self.tail)
        return c

    def append(self, seg: int, n: int) -> None:
        bs = self.block_size
        pos = 0
        while pos < n:
            room = bs - (self.length % bs)
            take = min(room, n - pos)
            self.tail.append((seg, pos, pos + take))
            self.length += take
            pos += take
            if self.length % bs == 0:
                h = self.keys[-1] if self.keys else 0x9E3779B97F4A7C15
                for piece in self.tail:
                    for v in piece:
                        h = _mix_int(h ^ (v + 0x632BE59BD9B4E019))
                self.keys.append(h)
                self.tail = []


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> int:
    return max(1, round(float(rng.lognormal(math.log(median), sigma))))


@dataclass(slots=True)
class _Pending:
    """A session or subagent waiting to issue its next call."""

    t: float
    ctx: _Context
    turns_left: int
    sid: str
    depth: int
    parent: _Pending | None = None
    children_open: int = 0
    child_results: list[int] = field(default_factory=list)


def agentic_sessions(
    config: AgenticConfig | None = None, *, block_size: int = 64, seed: int = 0
) -> list[SimRequest]:
    """Generate agentic coding sessions as requests (deterministic for a seed).

    A session's context starts with its harness prefix (shared by every session
    of that harness) and the user's first message; each model call sends the
    whole context and appends its output plus the tool result that followed
    (append-only). The next call comes after a tool pause (lognormal with a
    Pareto tail). With probability ``fanout_prob`` a call fans out to
    subagents: each starts from the parent's context plus its own task, runs
    its own turns in parallel, and when all have finished the parent resumes
    with their results appended. When the context would exceed
    ``context_limit`` it is compacted: harness + a fresh summary.

    Session ids are ``"s<i>"``; the ``k``-th subagent of a session's ``f``-th
    fan-out is ``"s<i>/<f>.<k>"``; request ids are ``"<session id>#<call>"``.

    :param config: the knobs (default :class:`AgenticConfig`).
    :param block_size: tokens per block for the keys (the engine's).
    :param seed: random seed.
    :returns: requests sorted by arrival.
    :raises ValueError: a knob out of range.
    """
    cfg = config or AgenticConfig()
    if cfg.sessions < 0 or cfg.harnesses < 1 or cfg.session_rate <= 0:
        raise ValueError("sessions >= 0, harnesses >= 1 and session_rate > 0 are required")
    if not 0 < cfg.harness_tokens[0] <= cfg.harness_tokens[1]:
        raise ValueError(f"bad harness_tokens {cfg.harness_tokens!r}")
    if not 1 <= cfg.fanout_width[0] <= cfg.fanout_width[1]:
        raise ValueError(f"bad fanout_width {cfg.fanout_width!r}")
    rng = np.random.default_rng(seed)
    seg_ids = itertools.count(1 << 20)
    harness_len = [
        int(rng.integers(cfg.harness_tokens[0], cfg.harness_tokens[1] + 1))
        for _ in range(cfg.harnesses)
    ]
    base: list[_Context] = []
    for h, n in enumerate(harness_len):
        c = _Context(block_size)
        c.append(h, n)  # segment id h < 2**20: the harness, identical across sessions
        base.append(c)

    def pause() -> float:
        if rng.random() < cfg.tool_pause_tail:
            return cfg.tool_pause_s * float(rng.pareto(cfg.tool_pause_tail_alpha) + 1.0) * 5.0
        return float(rng.lognormal(math.log(cfg.tool_pause_s), 0.7))

    def turns(median: float) -> int:
        return max(1, round(float(rng.lognormal(math.log(median), 0.6))))

    out: list[SimRequest] = []
    heap: list[tuple[float, int, _Pending]] = []
    order = itertools.count()
    calls: dict[str, int] = {}
    fanouts: dict[str, int] = {}
    harness_of: dict[str, int] = {}
    t = 0.0

    for i in range(cfg.sessions):
        t += float(rng.exponential(1.0 / cfg.session_rate))
        h = int(rng.integers(cfg.harnesses))
        ctx = base[h].copy()
        ctx.append(next(seg_ids), _lognormal(rng, cfg.first_user_tokens, 0.8))
        sid = f"s{i}"
        harness_of[sid] = h
        p = _Pending(t, ctx, turns(cfg.turns_median), sid, 0)
        heapq.heappush(heap, (p.t, next(order), p))

    def maybe_compact(p: _Pending, extra: int) -> None:
        if p.ctx.length + extra > cfg.context_limit:
            root = p.sid.split("/", 1)[0]
            c = base[harness_of[root]].copy()
            c.append(next(seg_ids), _lognormal(rng, cfg.compact_summary_tokens, 0.3))
            p.ctx = c

    while heap:
        _t, _o, p = heapq.heappop(heap)
        n_call = calls.get(p.sid, 0)
        calls[p.sid] = n_call + 1
        olen = _lognormal(rng, cfg.output_tokens, cfg.output_sigma)
        prompt_len = p.ctx.length
        full = p.ctx.copy()
        full.append(next(seg_ids), olen)
        out.append(SimRequest(f"{p.sid}#{n_call}", p.t, prompt_len, olen, tuple(full.keys), p.sid))
        done_at = p.t + cfg.response_s_fixed + olen * cfg.response_s_per_token
        p.ctx = full
        p.turns_left -= 1
        if p.turns_left <= 0:
            par = p.parent
            if par is not None:
                par.child_results.append(_lognormal(rng, cfg.subagent_result_tokens, 0.5))
                par.children_open -= 1
                par.t = max(par.t, done_at)
                if par.children_open == 0:
                    for n in par.child_results:
                        maybe_compact(par, n)
                        par.ctx.append(next(seg_ids), n)
                    par.child_results = []
                    par.t += pause()
                    heapq.heappush(heap, (par.t, next(order), par))
            continue
        if p.depth < cfg.max_fanout_depth and rng.random() < cfg.fanout_prob:
            width = int(rng.integers(cfg.fanout_width[0], cfg.fanout_width[1] + 1))
            fan = fanouts.get(p.sid, 0)
            fanouts[p.sid] = fan + 1
            p.children_open = width
            p.t = done_at
            for k in range(width):
                c = p.ctx.copy()
                c.append(next(seg_ids), _lognormal(rng, cfg.subagent_task_tokens, 0.5))
                child = _Pending(
                    done_at + pause() * 0.2,
                    c,
                    turns(cfg.subagent_turns),
                    f"{p.sid}/{fan}.{k}",
                    p.depth + 1,
                    parent=p,
                )
                harness_of[child.sid.split("/", 1)[0]] = harness_of[p.sid.split("/", 1)[0]]
                heapq.heappush(heap, (child.t, next(order), child))
            continue
        tool = min(
            _lognormal(rng, cfg.tool_result_tokens, cfg.tool_result_sigma), cfg.tool_result_max
        )
        maybe_compact(p, tool)
        p.ctx.append(next(seg_ids), tool)
        p.t = done_at + pause()
        heapq.heappush(heap, (p.t, next(order), p))
    out.sort(key=lambda r: r.arrival)
    return out
