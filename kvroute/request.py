"""What a proxy hands the router (:class:`Request`) and what it gets back (:class:`Decision`).

A :class:`Request` validates its agent hints when it is built, so a malformed
hint fails at the proxy's edge with a clear ``TypeError`` / ``ValueError``
instead of deep inside :meth:`kvroute.router.Router.route`.

A :class:`Decision` is cheap to build: it keeps the candidates' arrays and
formats the per-candidate cost breakdown only when :meth:`Decision.breakdown`
or :meth:`Decision.explain` is called.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._convert import as_u64_array

__all__ = ["CACHE_TTLS", "CacheControl", "Decision", "Request", "WarmupPlan", "cache_segments"]

_U64 = np.dtype(np.uint64)

#: Anthropic-style cache TTLs, in seconds.
CACHE_TTLS: Final[Mapping[str, float]] = {"5m": 300.0, "1h": 3600.0}


@dataclass(frozen=True, slots=True)
class CacheControl:
    """One ``cache_control`` breakpoint: keep the prompt's prefix warm for ``ttl`` seconds.

    Anthropic's prompt caching marks a breakpoint on a content block: the
    prompt up to and including that block is cached for the breakpoint's TTL.
    ``prefix_tokens`` is that prefix's length in the prompt's tokens (None:
    the whole prompt, as for a breakpoint on the last block).

    >>> CacheControl.parse({"type": "ephemeral", "ttl": "1h"})
    CacheControl(ttl=3600.0, prefix_tokens=None)
    >>> CacheControl.parse({"type": "ephemeral"}, prefix_tokens=1200)   # default TTL: 5 min
    CacheControl(ttl=300.0, prefix_tokens=1200)
    >>> CacheControl.parse({"type": "persistent"})
    Traceback (most recent call last):
    ...
    ValueError: cache_control type must be 'ephemeral', not 'persistent'

    :param ttl: seconds, > 0.
    :param prefix_tokens: the cached prefix's length in tokens (None: the whole prompt).
    :raises TypeError, ValueError: a malformed field.
    """

    ttl: float
    prefix_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, (int, float)):
            raise TypeError(f"cache_control ttl must be a number, not {type(self.ttl).__name__}")
        if not self.ttl > 0:
            raise ValueError(f"cache_control ttl must be > 0, got {self.ttl}")
        object.__setattr__(self, "ttl", float(self.ttl))
        object.__setattr__(
            self,
            "prefix_tokens",
            _opt_nonneg_int(self.prefix_tokens, "cache_control prefix_tokens"),
        )

    @classmethod
    def parse(
        cls, value: object, *, prefix_tokens: int | None = None, strict: bool = True
    ) -> CacheControl:
        """Parse ``{"type": "ephemeral", "ttl": "5m" | "1h"}`` (``ttl`` defaults to ``"5m"``).

        :param value: a mapping as found in an Anthropic-style request, or a
            :class:`CacheControl` (returned as is).
        :param prefix_tokens: the breakpoint's prefix length, if known.
        :param strict: refuse keys other than ``type`` and ``ttl`` (a proxy
            passing clients' requests on ignores them, as the engines do).
        :returns: the parsed hint.
        :raises TypeError: ``value`` is not a mapping.
        :raises ValueError: unknown keys (``strict``), a type other than
            ``"ephemeral"``, or a ttl other than ``"5m"`` / ``"1h"``.
        """
        if isinstance(value, CacheControl):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"cache_control must be a mapping like {{'type': 'ephemeral', 'ttl': '5m'}}, "
                f"not {type(value).__name__}"
            )
        extra = set(value) - {"type", "ttl"}
        if extra and strict:
            raise ValueError(f"cache_control has unknown keys {sorted(map(str, extra))}")
        kind = value.get("type")
        if kind != "ephemeral":
            raise ValueError(f"cache_control type must be 'ephemeral', not {kind!r}")
        ttl = value.get("ttl", "5m")
        if not isinstance(ttl, str) or ttl not in CACHE_TTLS:
            raise ValueError(f"cache_control ttl must be '5m' or '1h', not {ttl!r}")
        return cls(CACHE_TTLS[ttl], prefix_tokens)


def cache_segments(
    breakpoints: Sequence[CacheControl], num_blocks: int, block_size: int
) -> list[tuple[int, float]]:
    """The blocks each TTL keeps warm: ``(leading blocks, ttl)``, longest prefix first.

    A breakpoint's prefix covers the *full* blocks inside its ``prefix_tokens``
    (a partial block is never cached). A breakpoint whose prefix and TTL
    another one covers adds nothing and is left out, so the TTLs strictly
    grow as the prefixes shrink.

    >>> bps = [CacheControl(3600.0, 40), CacheControl(300.0, 100), CacheControl(300.0, 50)]
    >>> cache_segments(bps, num_blocks=8, block_size=10)
    [(8, 300.0), (4, 3600.0)]
    """
    spans = sorted(
        (
            (
                num_blocks
                if b.prefix_tokens is None
                else min(b.prefix_tokens // block_size, num_blocks),
                b.ttl,
            )
            for b in breakpoints
        ),
        key=lambda s: (-s[0], -s[1]),
    )
    out: list[tuple[int, float]] = []
    for blocks, ttl in spans:
        if blocks and (not out or ttl > out[-1][1]):
            out.append((blocks, ttl))
    return out


def _opt_nonneg_int(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


def _opt_str(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{what} must be a str or None, not {type(value).__name__}")


# eq=False: requests compare by identity (their numpy fields have no plain ==).
@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One request to route: its prompt (tokens or block hashes) and its hints.

    Exactly one of ``tokens`` / ``block_hashes`` is required; both may be
    given (the hashes are then used as is, and the tokens are kept for
    :meth:`kvroute.router.Router.warmup_plan`).

    >>> r = Request("r1", tokens=range(40), session_id="s",
    ...             cache_control={"type": "ephemeral", "ttl": "1h"})
    >>> r.num_prompt_tokens(block_size=16), r.cache_control
    (40, (CacheControl(ttl=3600.0, prefix_tokens=None),))
    >>> Request("r2", tokens=[1, 2], priority="high")
    Traceback (most recent call last):
    ...
    TypeError: priority must be an integer, not str

    :param request_id: the proxy's id for the request (a str or int), used by
        the lifecycle calls.
    :param tokens: prompt token ids (a sequence of ints, or an integer numpy
        array), as the engine will see them (chat template applied).
    :param block_hashes: precomputed kvroute block keys of the prompt (uint64s:
        ``kvroute_block_hashes(tokens, block_size)``, not an engine's hashes).
    :param prompt_tokens: prompt length (an int) when only ``block_hashes`` is
        given (default: ``len(block_hashes) * block_size``).
    :param lora_name: LoRA adapter name (a str); part of the hash chain.
    :param cache_salt: vLLM-style cache salt (a str); part of the hash chain.
    :param session_id: a conversation / agent session (a str), for
        stickiness, pins and warm-up plans.
    :param priority: admission priority (an int); *lower values are admitted
        first* (vLLM's convention). Default 0.
    :param expected_output_tokens: predicted output length, a count of tokens
        (an int >= 0), for decode load.
    :param cache_control: the prompt's cache breakpoints: one Anthropic-style
        ``{"type": "ephemeral", "ttl": "5m" | "1h"}`` (the whole prompt) or
        :class:`CacheControl`, or a sequence of them; stored parsed, as a
        tuple of :class:`CacheControl`.
    :param speculative_prefill: ask for a warm-up plan when the response completes.
    :raises TypeError, ValueError: a malformed field, with a message naming it.
    """

    request_id: str | int
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None
    block_hashes: npt.NDArray[np.uint64] | None = None
    prompt_tokens: int | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    priority: int = 0
    expected_output_tokens: int | None = None
    cache_control: (
        CacheControl
        | Mapping[str, str]
        | Sequence[CacheControl | Mapping[str, str]]
        | tuple[CacheControl, ...]
        | None
    ) = field(default=None)
    speculative_prefill: bool = False

    def __post_init__(self) -> None:
        rid = self.request_id
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise TypeError(f"request_id must be a str or int, not {type(rid).__name__}")
        if self.tokens is None and self.block_hashes is None:
            raise ValueError("a Request needs tokens or block_hashes")
        if self.tokens is not None:
            toks = self.tokens
            if isinstance(toks, (str, bytes)):
                raise TypeError(f"tokens must be a sequence of ints, not {type(toks).__name__}")
            if not isinstance(toks, np.ndarray):
                if not isinstance(toks, Sequence):
                    toks = list(toks)
                object.__setattr__(self, "tokens", toks)
        bh = self.block_hashes
        # Fast path (a proxy builds one Request per call): an array the router can
        # use as is needs no conversion, and a field already valid no re-store.
        if bh is not None and not (
            type(bh) is np.ndarray and bh.dtype is _U64 and bh.ndim == 1 and bh.flags.c_contiguous
        ):
            object.__setattr__(self, "block_hashes", as_u64_array(bh, "block_hashes"))
        if self.prompt_tokens is not None:
            object.__setattr__(
                self, "prompt_tokens", _opt_nonneg_int(self.prompt_tokens, "prompt_tokens")
            )
        _opt_str(self.lora_name, "lora_name")
        _opt_str(self.cache_salt, "cache_salt")
        _opt_str(self.session_id, "session_id")
        prio = self.priority
        if type(prio) is not int:
            if isinstance(prio, bool):
                raise TypeError("priority must be an integer, not bool")
            try:
                object.__setattr__(self, "priority", operator.index(prio))
            except TypeError:
                raise TypeError(f"priority must be an integer, not {type(prio).__name__}") from None
        if self.expected_output_tokens is not None:
            object.__setattr__(
                self,
                "expected_output_tokens",
                _opt_nonneg_int(self.expected_output_tokens, "expected_output_tokens"),
            )
        cc = self.cache_control
        if cc is not None:
            if isinstance(cc, (CacheControl, Mapping)):
                cc = (cc,)
            elif isinstance(cc, (str, bytes)) or not isinstance(cc, Sequence):
                raise TypeError(
                    "cache_control must be a mapping like {'type': 'ephemeral', 'ttl': '5m'}, "
                    f"a CacheControl or a sequence of them, not {type(cc).__name__}"
                )
            parsed = tuple(map(CacheControl.parse, cc))
            object.__setattr__(self, "cache_control", parsed or None)
        if not isinstance(self.speculative_prefill, bool):
            raise TypeError(
                f"speculative_prefill must be a bool, not {type(self.speculative_prefill).__name__}"
            )
        if self.speculative_prefill and self.session_id is None:
            raise ValueError("speculative_prefill needs a session_id")

    def cache_ttl(self) -> float | None:
        """The longest ``cache_control`` TTL in seconds, or None without a breakpoint.

        >>> Request("r", tokens=[1], cache_control={"type": "ephemeral"}).cache_ttl()
        300.0
        """
        bps = self.cache_breakpoints()
        return max(b.ttl for b in bps) if bps else None

    def cache_breakpoints(self) -> tuple[CacheControl, ...]:
        """The parsed ``cache_control`` breakpoints (empty without any)."""
        cc = self.cache_control
        return cc if isinstance(cc, tuple) else ()

    def num_prompt_tokens(self, block_size: int) -> int:
        """The prompt length in tokens.

        :param block_size: tokens per KV block, for a hashes-only request.
        :returns: ``prompt_tokens`` if given, else ``len(tokens)``, else
            ``len(block_hashes) * block_size``.
        """
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        if self.tokens is not None:
            return len(self.tokens)
        assert self.block_hashes is not None
        return len(self.block_hashes) * block_size


@dataclass(frozen=True, slots=True, eq=False)
class WarmupPlan:
    """Where and what to prefill (``max_tokens=1``) so a session's next turn hits the cache.

    :param worker: the worker that served the session's last response.
    :param tokens: the prompt plus the output tokens passed to ``finished``
        (None when the request carried only block hashes).
    :param block_hashes: the prompt's block hashes.
    """

    worker: int
    tokens: tuple[int, ...] | None
    block_hashes: npt.NDArray[np.uint64]


def cost_rows(
    workers: Any, overlap: Any, costs: Mapping[str, Any]
) -> list[dict[str, float | int]]:
    """Per candidate: its worker, its matched blocks and each cost term (non-finite: NaN).

    Runtime complexity: O(candidates x cost terms).
    """
    rows: list[dict[str, float | int]] = []
    for i in range(len(workers)):
        row: dict[str, float | int] = {"worker": int(workers[i]), "matched_blocks": int(overlap[i])}
        for name, arr in costs.items():
            v = float(arr[i])
            row[name] = v if math.isfinite(v) else float("nan")
        rows.append(row)
    return rows


def cost_table(
    rows: list[dict[str, float | int]], cost_names: Iterable[str], chosen: int | None
) -> list[str]:
    """:func:`cost_rows` as text: a header line, then a line per row, ``chosen``'s marked ``*``."""
    names = ["worker", "matched_blocks", *cost_names]
    lines = ["  " + " ".join(f"{n:>14}" for n in names)]
    for row in rows:
        mark = "*" if row["worker"] == chosen else " "
        cells = " ".join(
            f"{row[n]:>14}" if isinstance(row[n], int) else f"{row[n]:>14.3f}" for n in names
        )
        lines.append(f"{mark} {cells}")
    return lines


class Decision:
    """The router's answer for one request.

    The per-candidate cost breakdown is stored as arrays and formatted only
    on demand (:meth:`breakdown`, :meth:`explain`), so building a Decision
    costs a few attribute stores.

    :ivar request_id: the request's id.
    :ivar worker: the chosen worker.
    :ivar policy: the policy's name (``"pin"`` when a cache_control pin decided).
    :ivar matched_blocks: leading blocks of the prompt cached on ``worker``.
    :ivar predicted_cached_tokens: prompt tokens expected to hit the cache.
    :ivar prompt_tokens: the prompt length.
    :ivar seq: the router's operation number (orders decisions and events).
    :ivar decode_worker: in a prefill/decode-disaggregated fleet, the worker
        that decodes (see :class:`kvroute.disagg.DisaggDecision`); else None.
    :ivar remote_prefill: whether the prefill runs on another worker than the
        decode (False outside a disaggregated fleet).
    """

    # Outside a disaggregated fleet (kvroute.disagg.DisaggDecision's slots shadow them).
    decode_worker: int | None = None
    remote_prefill: bool = False

    __slots__ = (
        "_alt",
        "_costs",
        "_index",
        "_overlap",
        "_workers",
        "matched_blocks",
        "policy",
        "predicted_cached_tokens",
        "prompt_tokens",
        "request_id",
        "seq",
        "worker",
    )

    def __init__(
        self,
        request_id: str | int,
        worker: int,
        policy: str,
        matched_blocks: int,
        predicted_cached_tokens: int,
        prompt_tokens: int,
        seq: int,
        workers: npt.NDArray[np.uint64],
        overlap: npt.NDArray[np.int64],
        costs: Mapping[str, npt.NDArray[Any]],
        index: int,
    ) -> None:
        self.request_id = request_id
        self.worker = worker
        self.policy = policy
        self.matched_blocks = matched_blocks
        self.predicted_cached_tokens = predicted_cached_tokens
        self.prompt_tokens = prompt_tokens
        self.seq = seq
        self._workers = workers
        self._overlap = overlap
        self._costs = costs
        self._index = index
        self._alt: tuple[int | None, int] | None = None

    def _best_alternative(self) -> tuple[int | None, int]:
        if self._alt is None:
            if len(self._overlap) < 2:
                self._alt = (None, 0)
            else:
                tmp = self._overlap.copy()
                tmp[self._index] = -1
                j = int(np.argmax(tmp))
                self._alt = (int(self._workers[j]), int(self._overlap[j]))
        return self._alt

    @property
    def alt_worker(self) -> int | None:
        """The other candidate with the longest match (ties: lowest position); None if alone."""
        return self._best_alternative()[0]

    @property
    def alt_matched_blocks(self) -> int:
        """Blocks matched on :attr:`alt_worker` (0 if there is none)."""
        return self._best_alternative()[1]

    def breakdown(self) -> list[dict[str, float | int]]:
        """Per candidate: its worker, its matched blocks and each cost term of the policy.

        Runtime complexity: O(candidates x cost terms).
        """
        return cost_rows(self._workers, self._overlap, self._costs)

    def explain(self) -> str:
        """A human-readable table of :meth:`breakdown`, the chosen worker marked ``*``."""
        head = (
            f"request {self.request_id!r} -> worker {self.worker} (policy {self.policy}, "
            f"{self.predicted_cached_tokens}/{self.prompt_tokens} tokens cached)"
        )
        return "\n".join([head, *cost_table(self.breakdown(), self._costs, self.worker)])

    def __repr__(self) -> str:
        return (
            f"Decision(request_id={self.request_id!r}, worker={self.worker}, "
            f"policy={self.policy!r}, matched_blocks={self.matched_blocks}, "
            f"alt_worker={self.alt_worker}, alt_matched_blocks={self.alt_matched_blocks}, "
            f"predicted_cached_tokens={self.predicted_cached_tokens})"
        )
