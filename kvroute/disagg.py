"""Prefill/decode disaggregation: worker roles, the decode worker's choice, the conditional rule.

In a disaggregated fleet a request's prompt is prefilled on one worker, its
KV cache moves to another, and that one generates the reply. The router then
makes two choices per request and tracks both workers' load. This part holds
what the coordinator (:class:`~kvroute.router.Router`) asks of it:

* **Roles.** Every worker is ``"both"`` (prefills and decodes, the default),
  ``"prefill"`` or ``"decode"``. A fleet is *disaggregated* as soon as one
  worker has a role other than ``"both"``; until then the router routes as
  it always has (its compiled common path, untouched). Prefill candidates are
  the ``"prefill"`` and ``"both"`` workers; decode candidates the
  ``"decode"`` and ``"both"`` ones.
* **The decode choice** (:func:`decode_costs`), by decode load and free KV
  capacity, in prompt-token equivalents like the ``kvroute`` policy::

      cost = decode_token_weight x (active + new decode blocks) x block_size
           + transfer_weight x prompt tokens the worker does not hold
           + active_request_tokens x active requests
           + waiting_request_tokens x waiting requests
           + kv_pressure_tokens x max(kv_usage - kv_high, 0) / (1 - kv_high)

  A worker whose free KV capacity (known capacity minus active decode blocks)
  cannot take the request's new blocks is not eligible while another can;
  neither is a busy one, nor one whose request load would pass the fair share
  ``(1 + balance_slack) x (total + 1) / n + balance_abs_slack``. The prompt a
  decode worker already holds (the previous turn's transfer left it there)
  need not move again, which the ``transfer`` term counts: a session's turns
  keep to one decode worker while its load allows.
* **Conditional disaggregation** (:meth:`Disaggregation.prefill_locally`):
  when the chosen decode worker's prefill work, the prompt's tokens
  uncached there plus the prefill tokens it has queued, stays under
  ``local_prefill_tokens``, it prefills the prompt itself and nothing moves
  (Dynamo's and llm-d's rule, with the decode worker's queue counted so its
  decoding is never stalled by more than that). With ``local_if_held`` (the
  default) it also does, while its queue is under the threshold, when it
  holds more of the prompt than every prefill candidate: a session whose
  turns were prefilled on its decode worker is not sent back to a prefill
  worker that would recompute them (``docs/disaggregation.md`` measures
  both). 0 (the default threshold) always prefills remotely.
* **Both legs' load.** A remotely prefilled request is counted twice in the
  router's :class:`~kvroute.load.LoadTracker`: on the prefill worker under its
  own id (its uncached prompt tokens, until ``prefill_done`` or
  ``first_token``), and on the decode worker under :func:`decode_key` (its
  prompt's blocks and expected output, until ``finished`` / ``failed``).

>>> cfg = DisaggConfig(local_prefill_tokens=512)
>>> cfg.prefill_locally(prompt_tokens=4096, cached_tokens=3840)   # 256 uncached < 512
True
>>> roles = Roles()
>>> roles.set(0, "prefill"), roles.set(1, "decode"), roles.disaggregated
(None, None, True)
>>> p, d = roles.masks(np.array([0, 1], np.uint64))
>>> p.tolist(), d.tolist()
([True, False], [False, True])

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from .policies.base import check_nonneg
from .request import Decision, cost_rows, cost_table

__all__ = [
    "ROLES",
    "DecodeChoice",
    "DisaggConfig",
    "DisaggDecision",
    "Role",
    "Roles",
    "check_role",
    "decode_costs",
    "decode_key",
]

#: A worker's part in serving: both prefill and decode, or one of them.
Role = Literal["both", "prefill", "decode"]
#: The roles, in that order (the same as :data:`kvroute.fleet.spec.ROLES`).
ROLES: Final[tuple[str, ...]] = get_args(Role)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
BOOL = npt.NDArray[np.bool_]


def check_role(role: object) -> Role:
    """``role`` if it is one of :data:`ROLES`.

    >>> check_role("decode")
    'decode'
    >>> check_role("mixed")
    Traceback (most recent call last):
    ...
    ValueError: role must be one of both, prefill, decode, not 'mixed'

    :raises ValueError: any other value.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role  # type: ignore[return-value]


def decode_key(request_id: str | int) -> tuple[str, str | int]:
    """The key a request's decode leg has in the load tracker (its prefill leg has the id).

    >>> decode_key("r1")
    ('decode', 'r1')
    """
    return ("decode", request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class DisaggConfig:
    """The settings of a disaggregated fleet's second choice and of the conditional rule.

    >>> DisaggConfig(local_prefill_tokens=-1)
    Traceback (most recent call last):
    ...
    ValueError: local_prefill_tokens must be an int >= 0, got -1

    :param local_prefill_tokens: prefill on the decode worker, skipping the
        transfer, when fewer than this many prompt tokens are uncached there
        (its queued prefill tokens counted too); 0 (default): always prefill
        on a prefill worker.
    :param decode_token_weight: weight of a token of decode context (active
        decode blocks, the request's new ones included).
    :param transfer_weight: weight of a prompt token the decode worker does
        not hold (it moves over the network, or is prefilled there).
    :param active_request_tokens: cost of each request in flight on the worker.
    :param waiting_request_tokens: cost of each request the worker reports waiting.
    :param kv_high: KV usage above which the pressure term applies, in [0, 1).
    :param kv_pressure_tokens: the pressure term at full KV usage.
    :param balance_slack: relative slack of the fair-share gate on requests.
    :param balance_abs_slack: absolute slack of that gate, in requests.
    :param balance_stake_tokens: each this many prompt tokens a worker holds
        beyond the cheapest worker within the gate buys it one more bound of
        room (as the ``kvroute`` policy's gate); 0: no stake.
    :param balance_stake_limit: the stake counted at most, in tokens.
    :param local_if_held: with the conditional rule on, also prefill on a decode
        worker that holds more of the prompt than every prefill candidate (while
        its queued prefill tokens are under ``local_prefill_tokens``).
    :param seed: seeds the tie-break among equally cheap workers.
    :raises TypeError, ValueError: a setting out of range, naming it.
    """

    local_prefill_tokens: int = 0
    decode_token_weight: float = 0.1
    transfer_weight: float = 1.0
    active_request_tokens: float = 32.0
    waiting_request_tokens: float = 1024.0
    kv_high: float = 0.9
    kv_pressure_tokens: float = 4096.0
    balance_slack: float = 0.25
    balance_abs_slack: float = 2.0
    balance_stake_tokens: float = 40_000.0
    balance_stake_limit: float = 60_000.0
    local_if_held: bool = True
    seed: int | None = 0

    def __post_init__(self) -> None:
        n = self.local_prefill_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"local_prefill_tokens must be an int >= 0, got {n!r}")
        for f in fields(self):
            if f.name in ("local_prefill_tokens", "seed", "local_if_held"):
                continue
            object.__setattr__(self, f.name, check_nonneg(getattr(self, f.name), f.name))
        if self.kv_high >= 1.0:
            raise ValueError(f"kv_high must be < 1, got {self.kv_high}")
        if self.seed is not None:
            object.__setattr__(self, "seed", operator.index(self.seed))

    def prefill_locally(self, prompt_tokens: int, cached_tokens: int, backlog: float = 0.0) -> bool:
        """Whether the decode worker, holding ``cached_tokens`` of the prompt, prefills it itself.

        It does when its prefill work, the prompt's uncached tokens and what it
        has queued already, stays under ``local_prefill_tokens``.

        :param prompt_tokens: the prompt's length.
        :param cached_tokens: its tokens cached on the decode worker.
        :param backlog: prefill tokens already queued on the decode worker.
        """
        return backlog + prompt_tokens - cached_tokens < self.local_prefill_tokens


class Roles:
    """Each worker's role, and per position of the load arrays, who may prefill and decode.

    A worker never given a role is ``"both"``. :meth:`masks` is cached per
    worker-id array (the load tracker replaces it on every membership change).
    """

    def __init__(self) -> None:
        self._roles: dict[int, Role] = {}
        self._special = 0  # workers whose role is not "both"
        self._masks: tuple[Any, BOOL, BOOL] | None = None

    @property
    def disaggregated(self) -> bool:
        """Whether some worker only prefills or only decodes."""
        return self._special > 0

    def get(self, worker: int) -> Role:
        """The worker's role (``"both"`` if it was never given one)."""
        return self._roles.get(worker, "both")

    def set(self, worker: int, role: Role) -> None:
        """Give ``worker`` a role (``"both"`` forgets it)."""
        old = self._roles.pop(worker, "both")
        self._special -= old != "both"
        if role != "both":
            self._roles[worker] = role
            self._special += 1
        self._masks = None

    def drop(self, worker: int) -> None:
        """Forget a removed worker's role."""
        self.set(worker, "both")

    def masks(self, ids: npt.NDArray[np.uint64]) -> tuple[BOOL, BOOL]:
        """Per position of ``ids``: ``(may prefill, may decode)``, read-only arrays.

        Runtime complexity: O(n) once per ``ids`` array, then O(1).
        """
        cached = self._masks
        if cached is not None and cached[0] is ids:
            return cached[1], cached[2]
        roles = [self._roles.get(w, "both") for w in ids.tolist()]
        prefill = np.array([r != "decode" for r in roles], np.bool_)
        decode = np.array([r != "prefill" for r in roles], np.bool_)
        prefill.flags.writeable = decode.flags.writeable = False
        self._masks = (ids, prefill, decode)
        return prefill, decode

    def items(self) -> list[tuple[int, Role]]:
        """``(worker, role)`` of the workers with a role other than ``"both"``."""
        return sorted(self._roles.items())

    def _check(self, known: Mapping[int, int]) -> None:
        """Every role names a known worker; the count is right. AssertionError if not."""
        assert self._special == len(self._roles), "role count drifted"
        for w in self._roles:
            assert w in known, f"role of unknown worker {w}"


@dataclass(frozen=True, slots=True)
class DecodeChoice:
    """The decode worker chosen for a request, and why.

    :param position: its position in the load arrays.
    :param worker: its id.
    :param matched_blocks: prompt blocks it holds already.
    :param local: it prefills the request itself (the conditional rule's threshold).
    :param workers: the decode candidates' ids.
    :param overlap: their matched blocks.
    :param costs: per cost term, one value per candidate.
    :param index: the chosen candidate's index in those arrays.
    :param backlog: prefill tokens queued on it already.
    """

    position: int
    worker: int
    matched_blocks: int
    local: bool
    workers: npt.NDArray[np.uint64]
    overlap: I64
    costs: dict[str, npt.NDArray[Any]]
    index: int
    backlog: float = 0.0


def decode_costs(
    config: DisaggConfig,
    *,
    overlap: I64,
    decode_blocks: F64,
    new_blocks: F64,
    active: I64,
    waiting: F64,
    kv_usage: F64,
    free_blocks: F64,
    busy: BOOL,
    prompt_tokens: int,
    block_size: int,
) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.intp]]:
    """The decode candidates' costs and the cheapest eligible ones (see the module docstring).

    Every array is one value per candidate (n >= 1).

    >>> c, best = decode_costs(DisaggConfig(), overlap=np.array([4, 0]),
    ...     decode_blocks=np.zeros(2), new_blocks=np.array([1.0, 5.0]),
    ...     active=np.zeros(2, np.int64), waiting=np.zeros(2), kv_usage=np.zeros(2),
    ...     free_blocks=np.full(2, np.inf), busy=np.zeros(2, bool),
    ...     prompt_tokens=80, block_size=16)
    >>> c["transfer"].tolist(), best.tolist()     # worker 0 holds 64 of the 80 tokens
    ([16.0, 80.0], [0])

    :param free_blocks: KV blocks free for decoding (``inf`` when unknown).
    :returns: ``(costs, ties)``: the terms ``decode``, ``transfer``, ``queue``,
        ``kv_pressure``, ``eligible`` and ``cost``; the positions of the
        cheapest eligible candidates, the least loaded of them if several.
    """
    bs = float(block_size)
    need = new_blocks
    decode = (decode_blocks + need) * (config.decode_token_weight * bs)
    uncached = np.maximum(float(prompt_tokens) - overlap * bs, 0.0)
    transfer = uncached * config.transfer_weight
    queue = active * config.active_request_tokens + waiting * config.waiting_request_tokens
    pressure = np.maximum(kv_usage - config.kv_high, 0.0)
    pressure *= config.kv_pressure_tokens / (1.0 - config.kv_high)
    cost = decode + transfer + queue + pressure
    cost = np.nan_to_num(cost, nan=np.inf, posinf=np.inf)
    load = active + waiting
    n = len(cost)
    bound = (1.0 + config.balance_slack) * (float(load.sum()) + 1.0) / n + config.balance_abs_slack
    eligible = load <= bound - 1.0
    if not eligible.all() and config.balance_stake_tokens > 0:
        # as the kvroute policy's gate: the prompt a worker holds beyond the cheapest
        # worker within the bound buys it room, so a session is not moved for a few
        # requests of imbalance
        alt = int(np.argmin(np.where(eligible, cost, np.inf)))
        stake = np.clip(uncached[alt] - uncached, 0.0, config.balance_stake_limit)
        eligible = load <= stake * (bound / config.balance_stake_tokens) + (bound - 1.0)
    for keep in (free_blocks >= need, ~busy):
        if (eligible & keep).any():
            eligible &= keep
    if not eligible.any():
        eligible = load == load.min()
    gated = np.where(eligible, cost, np.inf)
    best = float(gated.min())
    if not math.isfinite(best):  # every eligible worker has broken state: the least loaded
        ties = np.flatnonzero(eligible)
    else:
        ties = np.flatnonzero(gated <= best + 1e-9 * max(abs(best), 1.0))
    if len(ties) > 1:
        tl = load[ties]
        ties = ties[tl == tl.min()]
    costs: dict[str, npt.NDArray[Any]] = {
        "decode": decode,
        "transfer": transfer,
        "queue": np.asarray(queue, np.float64),
        "kv_pressure": pressure,
        "eligible": eligible,
        "cost": cost,
    }
    return costs, ties


class Disaggregation:
    """The router's part for disaggregated fleets: roles, capacities, the decode choice.

    :param config: the decode choice's weights and the conditional rule.
    """

    def __init__(self, config: DisaggConfig | None = None) -> None:
        self.config = config or DisaggConfig()
        #: Each worker's role.
        self.roles = Roles()
        self._capacity: dict[int, int] = {}
        self._rng = random.Random(self.config.seed)
        #: Requests whose prefill ran (or runs) on another worker than their decode.
        self.remote = 0
        #: Requests the conditional rule prefilled on their decode worker.
        self.local = 0

    def set_capacity(self, worker: int, blocks: int | None) -> None:
        """A worker's KV capacity in blocks (None: unknown)."""
        if blocks is None:
            self._capacity.pop(worker, None)
        else:
            self._capacity[worker] = blocks

    def drop(self, worker: int) -> None:
        """Forget a removed worker."""
        self.roles.drop(worker)
        self._capacity.pop(worker, None)

    def plan(
        self,
        lt: Any,
        ok: BOOL,
        overlap: I64,
        new_blocks: F64,
        busy: BOOL,
        prompt_tokens: int,
        block_size: int,
    ) -> tuple[DecodeChoice | None, npt.NDArray[np.intp] | None]:
        """A request's decode worker, among the positions ``ok`` allows, and where to prefill it.

        :param lt: the router's :class:`~kvroute.load.LoadTracker`.
        :param ok: per position, healthy and not excluded.
        :param overlap: per position, the prompt's matched blocks.
        :param new_blocks: per position, the blocks the request adds to its decode load.
        :param busy: per position, over the router's busy threshold.
        :returns: ``(decode choice, prefill candidates' positions)``: the
            candidates are None when the decode worker prefills the request
            itself (:meth:`prefill_locally`), and may be empty (no prefill
            worker may take it); ``(None, None)`` when no decode worker may.
        """
        may_prefill, may_decode = self.roles.masks(lt.ids_frozen)
        cand = np.flatnonzero(ok & may_decode)
        if len(cand) == 0:
            return None, None
        n = lt.n
        ids = lt.worker_ids[cand]
        cap = self._capacity
        free = np.full(len(cand), np.inf)
        if cap:
            for i, w in enumerate(ids.tolist()):
                c = cap.get(w)
                if c is not None:
                    free[i] = c - float(lt.decode_blocks[cand[i]])
        ov = overlap[cand]
        costs, ties = decode_costs(
            self.config,
            overlap=ov,
            decode_blocks=lt.decode_blocks[:n][cand],
            new_blocks=new_blocks[cand],
            active=lt.active[:n][cand],
            waiting=lt.waiting[:n][cand],
            kv_usage=lt.kv_usage[:n][cand],
            free_blocks=free,
            busy=busy[cand],
            prompt_tokens=prompt_tokens,
            block_size=block_size,
        )
        i = int(ties[0]) if len(ties) == 1 else int(ties[self._rng.randrange(len(ties))])
        matched = int(ov[i])
        cached = min(matched * block_size, prompt_tokens)
        backlog = float(lt.prefill_tokens[int(cand[i])])
        local = self.config.prefill_locally(prompt_tokens, cached, backlog)
        dec = DecodeChoice(int(cand[i]), int(ids[i]), matched, local, ids, ov, costs, i, backlog)
        prefill = np.flatnonzero(ok & may_prefill)
        return dec, None if self.prefill_locally(dec, overlap, prefill) else prefill

    def prefill_locally(
        self, dec: DecodeChoice, overlap: I64, prefill: npt.NDArray[np.intp]
    ) -> bool:
        """Whether the decode worker prefills the request itself (the conditional rule).

        With ``local_prefill_tokens`` > 0: when its prefill work, the prompt's
        uncached tokens there and its queued prefill tokens, stays under that
        (:attr:`DecodeChoice.local`); or, with ``local_if_held``, when it holds
        more of the prompt than every prefill candidate (a remote prefill would
        recompute what it holds) and its queued prefill tokens are under the
        threshold; or when no prefill worker is left. With 0: never.

        :param dec: the decode choice.
        :param overlap: per position, the prompt's matched blocks.
        :param prefill: the prefill candidates' positions.
        """
        cfg = self.config
        if not cfg.local_prefill_tokens:
            return False
        if dec.local or len(prefill) == 0:
            return True
        if not cfg.local_if_held or dec.backlog >= cfg.local_prefill_tokens:
            return False
        return int(overlap[dec.position]) > int(overlap[prefill].max())

    def counters(self) -> dict[str, int]:
        """``remote_prefills`` and ``local_prefills`` so far."""
        return {"remote_prefills": self.remote, "local_prefills": self.local}


class DisaggDecision(Decision):
    """A :class:`~kvroute.request.Decision` in a disaggregated fleet: both workers, both reasons.

    :attr:`worker` prefills (its :attr:`matched_blocks` and
    :attr:`predicted_cached_tokens` are the prefill's cache hit);
    :attr:`decode_worker` generates the reply. When the conditional rule kept
    the prefill on the decode worker, the two are the same worker and
    :attr:`remote_prefill` is False.

    :ivar decode_worker: the worker that decodes.
    :ivar decode_matched_blocks: prompt blocks the decode worker holds already.
    :ivar remote_prefill: the prefill runs on another worker; the KV moves.
    """

    __slots__ = ("_decode", "decode_matched_blocks", "decode_worker", "remote_prefill")

    def __init__(self, base: Decision, decode: DecodeChoice, remote: bool) -> None:
        Decision.__init__(
            self,
            base.request_id,
            base.worker,
            base.policy,
            base.matched_blocks,
            base.predicted_cached_tokens,
            base.prompt_tokens,
            base.seq,
            base._workers,
            base._overlap,
            base._costs,
            base._index,
        )
        self._decode = decode
        self.decode_worker = decode.worker
        self.decode_matched_blocks = decode.matched_blocks
        self.remote_prefill = remote

    def decode_view(self) -> Decision:
        """The decision as the decode worker's answer shows it: its worker, the prefill's hit.

        A proxy relays the decode worker's reply with this view (its worker
        header, its health on a broken stream), while the cache figures stay
        the prefill's, where the cache hit happened.
        """
        return Decision(
            self.request_id,
            self._decode.worker,
            self.policy,
            self.matched_blocks,
            self.predicted_cached_tokens,
            self.prompt_tokens,
            self.seq,
            self._workers,
            self._overlap,
            self._costs,
            self._index,
        )

    def transfer_blocks(self, block_size: int) -> int:
        """Full prompt blocks the decode worker lacks and pulls from the prefill worker.

        :param block_size: tokens per block.
        """
        if not self.remote_prefill:
            return 0
        return max(self.prompt_tokens // block_size - self.decode_matched_blocks, 0)

    def decode_breakdown(self) -> list[dict[str, float | int]]:
        """Per decode candidate: its worker, its matched blocks and each cost term."""
        d = self._decode
        return cost_rows(d.workers, d.overlap, d.costs)

    def explain(self) -> str:
        """The prefill choice's table, then the decode choice's, chosen workers marked ``*``."""
        d = self._decode
        how = (
            f"KV moves to decode worker {self.decode_worker}"
            if self.remote_prefill
            else f"prefilled on decode worker {self.decode_worker} (conditional rule)"
        )
        table = cost_table(self.decode_breakdown(), d.costs, self.decode_worker)
        return "\n".join([Decision.explain(self), f"  {how}:", *table])

    def __repr__(self) -> str:
        return (
            f"DisaggDecision(request_id={self.request_id!r}, worker={self.worker}, "
            f"decode_worker={self.decode_worker}, remote_prefill={self.remote_prefill}, "
            f"policy={self.policy!r}, matched_blocks={self.matched_blocks}, "
            f"decode_matched_blocks={self.decode_matched_blocks}, "
            f"predicted_cached_tokens={self.predicted_cached_tokens})"
        )
