"""Sweeps of the replay over fleet size, capacity and arrival speed: where each policy wins.

One replay answers for one fleet on one trace, and a policy tuned there can
lose elsewhere. :func:`run_sweep` replays every policy at every
:class:`GridPoint` (workload x workers x KV blocks per worker x arrival
speed-up) through :func:`kvroute.sim.replay.replay`, exactly as
``python -m kvroute replay`` does, and returns one :class:`SweepRow` per
(point, policy, seed) with the point's two reuse bounds beside it.
:func:`star_grid` builds the usual grid (one factor at a time around a
centre), :func:`median_rows` collapses seeds, :func:`win_table` and
:func:`metric_table` render markdown; :mod:`kvroute.sim.plots` draws them.

``benchmarks/sweep_replay.py`` is the command line; docs/simulator.md
("Sweeps") shows what it measured.

>>> rows = run_sweep([GridPoint("tiny", 2, 64, 1.0)], ["round_robin", "kvroute"],
...                  {"tiny": mooncake_workload(limit=50)})
>>> [(r.policy, r.seeds, r.requests) for r in rows]
[('round_robin', (), 50), ('kvroute', (0,), 50)]
>>> all(r.prefix_reuse <= r.bounds["unbounded"] for r in rows)
True
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .engine import EngineConfig
from .replay import ReplayResult, make_dispatcher, pooled_lru_reuse, replay, unbounded_reuse
from .seeding import takes_seed
from .workloads import AgenticConfig, SimRequest, agentic_sessions, load_mooncake

__all__ = [
    "CENTER",
    "GridPoint",
    "SweepRow",
    "WorkloadFn",
    "agentic_workload",
    "default_workloads",
    "median_rows",
    "metric_table",
    "mooncake_workload",
    "run_sweep",
    "star_grid",
    "win_table",
]

#: ``(block_size, speedup) -> requests sorted by arrival``.
WorkloadFn = Callable[[int, float], list[SimRequest]]

#: The fleet every axis of :func:`star_grid` passes through: (workers, gpu_blocks, speedup);
#: the fleet of the Dynamo calibration in docs/simulator.md.
CENTER: tuple[int, int, float] = (8, 2048, 1.0)

#: Grid axes, as :class:`GridPoint` field names.
AXES = ("workers", "gpu_blocks", "speedup")


def mooncake_workload(
    path: str | os.PathLike[str] | None = None,
    *,
    trace_block_size: int = 512,
    limit: int | None = None,
) -> WorkloadFn:
    """A Mooncake-format trace as a workload (default: the bundled conversation trace).

    The speed-up divides arrival times, as ``load_mooncake(speedup=)`` and
    ``kvroute replay --speedup`` do: 2.0 is twice the request rate.

    :param path: the jsonl(.gz) trace.
    :param trace_block_size: tokens per trace hash id.
    :param limit: the first ``limit`` requests only.
    :returns: the workload function.
    """

    def load(block_size: int, speedup: float) -> list[SimRequest]:
        return load_mooncake(
            path,
            block_size=block_size,
            trace_block_size=trace_block_size,
            speedup=speedup,
            limit=limit,
        )

    return load


def agentic_workload(config: AgenticConfig | None = None, *, seed: int = 0) -> WorkloadFn:
    """The agentic-session generator as a workload.

    The speed-up divides every arrival time, as ``kvroute replay agentic
    --speedup`` does: sessions start closer together and tool pauses shrink
    by the same factor (the generator is open-loop, so a slow fleet never
    delays the next turn).

    :param config: the generator's knobs (default :class:`AgenticConfig`).
    :param seed: the generator's seed.
    :returns: the workload function.
    """

    def gen(block_size: int, speedup: float) -> list[SimRequest]:
        if not (speedup > 0 and math.isfinite(speedup)):
            raise ValueError(f"speedup must be a finite number > 0, got {speedup!r}")
        reqs = agentic_sessions(config, block_size=block_size, seed=seed)
        if speedup != 1.0:
            reqs = [replace(r, arrival=r.arrival / speedup) for r in reqs]
        return reqs

    return gen


def default_workloads() -> dict[str, WorkloadFn]:
    """The two workloads of docs/simulator.md: the bundled Mooncake trace and 64 agentic sessions.

    :returns: ``{"mooncake": ..., "agentic": ...}``.
    """
    return {"mooncake": mooncake_workload(), "agentic": agentic_workload()}


@dataclass(frozen=True, slots=True)
class GridPoint:
    """One fleet and load to replay every policy on.

    :param workload: a key of the workloads mapping given to :func:`run_sweep`.
    :param workers: fleet size.
    :param gpu_blocks: KV cache blocks per worker.
    :param speedup: arrival times are divided by this.
    :raises ValueError: a non-positive size or speed-up.
    """

    workload: str
    workers: int
    gpu_blocks: int
    speedup: float

    def __post_init__(self) -> None:
        for name in ("workers", "gpu_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (self.speedup > 0 and math.isfinite(self.speedup)):
            raise ValueError(f"speedup must be a finite number > 0, got {self.speedup!r}")


def star_grid(
    workloads: Sequence[str],
    *,
    workers: Sequence[int] = (4, 8, 16, 32),
    gpu_blocks: Sequence[int] = (1024, 2048, 4096),
    speedups: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    center: tuple[int, int, float] = CENTER,
) -> list[GridPoint]:
    """One factor at a time around ``center``, for each workload: a "star", not a full product.

    Runtime complexity: ``O(len(workloads) x (len(workers) + len(gpu_blocks) + len(speedups)))``
    points, against the full product's ``O(W x B x S)``.

    >>> [(p.workers, p.gpu_blocks, p.speedup) for p in star_grid(["m"], workers=(4, 8),
    ...  gpu_blocks=(2048,), speedups=(1.0, 2.0))]
    [(8, 2048, 1.0), (4, 2048, 1.0), (8, 2048, 2.0)]

    :param workloads: workload names.
    :param workers: fleet sizes, at the centre's capacity and speed.
    :param gpu_blocks: capacities per worker, at the centre's fleet size and speed.
    :param speedups: arrival speed-ups, at the centre's fleet size and capacity.
    :param center: (workers, gpu_blocks, speedup) shared by the three axes; listed first.
    :returns: points, per workload: the centre, then each axis in the given order, no repeats.
    :raises ValueError: a non-positive value.
    """
    cw, cb, cs = center
    out: list[GridPoint] = []
    for wl in workloads:
        pts = [GridPoint(wl, cw, cb, cs)]
        pts += [GridPoint(wl, w, cb, cs) for w in workers]
        pts += [GridPoint(wl, cw, b, cs) for b in gpu_blocks]
        pts += [GridPoint(wl, cw, cb, float(s)) for s in speedups]
        out += [p for p in dict.fromkeys(pts) if p not in out]
    return out


@dataclass(frozen=True, slots=True)
class SweepRow:
    """One policy's figures at one grid point (one seed, or the median over seeds).

    :param policy: the policy (or dispatcher) name.
    :param workload: the workload name.
    :param workers: fleet size.
    :param gpu_blocks: KV blocks per worker.
    :param speedup: arrival speed-up.
    :param seeds: the policy seeds behind the figures; empty for a policy
        that draws no random numbers (one run says all).
    :param prefix_reuse: cached prompt tokens / prompt tokens.
    :param ttft_mean_ms: mean time to first token.
    :param ttft_p99_ms: 99th percentile time to first token.
    :param throughput_tok_s: output tokens per second over the replay.
    :param tpot_mean_ms: mean time per output token after the first.
    :param e2e_mean_ms: mean end-to-end latency.
    :param load_spread: requests on the busiest worker / the mean.
    :param preemptions: engine preemptions, all workers.
    :param requests: requests in the workload.
    :param completed: requests that finished.
    :param wall_s: wall-clock seconds of the replay.
    :param bounds: prefix reuse of ``unbounded`` (one cache that never
        evicts) and ``pooled_lru`` (one LRU of the fleet's total capacity).
    """

    policy: str
    workload: str
    workers: int
    gpu_blocks: int
    speedup: float
    seeds: tuple[int, ...]
    prefix_reuse: float
    ttft_mean_ms: float
    ttft_p99_ms: float
    throughput_tok_s: float
    tpot_mean_ms: float
    e2e_mean_ms: float
    load_spread: float
    preemptions: float
    requests: int
    completed: int
    wall_s: float
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def point(self) -> GridPoint:
        """The grid point of the row."""
        return GridPoint(self.workload, self.workers, self.gpu_blocks, self.speedup)

    def as_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (``seeds`` as a list)."""
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepRow:
        """The row :meth:`as_dict` gave (e.g. read back from a sweep's JSON).

        >>> r = SweepRow("k", "w", 1, 1, 1.0, (0,), 0.1, 5.0, 9.0, 1, 1, 1, 1, 0, 1, 1, 0.1)
        >>> SweepRow.from_dict(r.as_dict()) == r
        True

        :param d: the dict.
        :returns: the row.
        :raises TypeError: a missing or unknown field.
        """
        return cls(**{**d, "seeds": tuple(d["seeds"]), "bounds": dict(d.get("bounds", {}))})


def _takes_seed(name: str) -> bool:
    """Whether ``name`` is a Router policy that takes a ``seed`` (draws random numbers).

    :raises KeyError: no policy has that name.
    """
    return not name.startswith("sim:") and takes_seed(name)


def _row(
    policy: str, p: GridPoint, seeds: tuple[int, ...], r: ReplayResult, bounds: dict[str, float]
) -> SweepRow:
    s = r.summary
    return SweepRow(
        policy=policy,
        workload=p.workload,
        workers=p.workers,
        gpu_blocks=p.gpu_blocks,
        speedup=p.speedup,
        seeds=seeds,
        prefix_reuse=float(s["prefix_reuse"]),
        ttft_mean_ms=float(s["ttft_ms"]["mean"]),
        ttft_p99_ms=float(s["ttft_ms"]["p99"]),
        throughput_tok_s=float(s["throughput"]["output_tokens_per_s"]),
        tpot_mean_ms=float(s["tpot_ms"]["mean"]),
        e2e_mean_ms=float(s["e2e_ms"]["mean"]),
        load_spread=float(s["load_spread"]["requests"]["max_over_mean"]),
        preemptions=float(s["preemptions"]),
        requests=int(s["requests"]),
        completed=int(s["completed"]),
        wall_s=r.wall_s,
        bounds=dict(bounds),
    )


def run_sweep(
    points: Iterable[GridPoint],
    policies: Sequence[str],
    workloads: Mapping[str, WorkloadFn] | None = None,
    *,
    block_size: int = 512,
    seeds: Sequence[int] = (0,),
    engine: EngineConfig | None = None,
    router_kwargs: Mapping[str, Any] | None = None,
    on_replay: Callable[[GridPoint, str, int | None, ReplayResult], None] | None = None,
) -> list[SweepRow]:
    """Replay every policy at every point; one row per (point, policy, seed).

    A policy that takes a ``seed`` (its ties or sampling are random: ``kv_cost``,
    ``kvroute``) runs once per seed, through ``Router(policy_params={"seed":
    s})``; one that does not runs once. Workloads are built once per
    (workload, speed-up) and bounds once per (workload, speed-up, fleet
    capacity). Runtime complexity: ``len(points) x len(policies) x len(seeds)``
    replays at most.

    :param points: the grid.
    :param policies: Router policy names (or ``"sim:round_robin"``).
    :param workloads: name -> workload function (default :func:`default_workloads`).
    :param block_size: tokens per KV block, engines and router.
    :param seeds: policy seeds.
    :param engine: engine settings besides capacity and block size (default
        :class:`EngineConfig`).
    :param router_kwargs: further ``Router`` arguments (``kv_events=False``: approximate mode).
    :param on_replay: called as ``on_replay(point, policy, seed, result)`` after
        each replay (``seed`` None for an unseeded policy), e.g. to keep the
        per-request records of some points.
    :returns: rows, in point order, then policy order, then seed order.
    :raises KeyError: an unknown policy or workload name (before any replay).
    :raises ValueError: no seeds, or a replay's own ValueError.
    """
    pts = list(points)
    wls = default_workloads() if workloads is None else workloads
    if not seeds:
        raise ValueError("seeds must not be empty")
    for p in pts:
        if p.workload not in wls:
            raise KeyError(f"unknown workload {p.workload!r}; known: {', '.join(sorted(wls))}")
    seeded = {name: _takes_seed(name) for name in policies}
    base = engine or EngineConfig()
    kw = dict(router_kwargs or {})
    reqs: dict[tuple[str, float], list[SimRequest]] = {}
    unbounded: dict[tuple[str, float], float] = {}
    pooled: dict[tuple[str, float, int], float] = {}
    rows: list[SweepRow] = []
    for p in pts:
        key = (p.workload, p.speedup)
        if key not in reqs:
            reqs[key] = wls[p.workload](block_size, p.speedup)
            unbounded[key] = unbounded_reuse(reqs[key], block_size)["prefix_reuse"]
        cap = p.workers * p.gpu_blocks
        if (*key, cap) not in pooled:
            pooled[(*key, cap)] = pooled_lru_reuse(reqs[key], block_size, cap)["prefix_reuse"]
        bounds = {"unbounded": unbounded[key], "pooled_lru": pooled[(*key, cap)]}
        cfg = replace(base, num_gpu_blocks=p.gpu_blocks, block_size=block_size)
        for name in policies:
            for seed in seeds if seeded[name] else (None,):
                args = dict(kw)
                if seed is not None:
                    args["policy_params"] = {**kw.get("policy_params", {}), "seed": seed}
                disp = make_dispatcher(name, **args)
                r = replay(reqs[key], disp, num_workers=p.workers, config=cfg)
                rows.append(_row(name, p, () if seed is None else (seed,), r, bounds))
                if on_replay is not None:
                    on_replay(p, name, seed, r)
    return rows


_MEDIAN_FIELDS = (
    "prefix_reuse",
    "ttft_mean_ms",
    "ttft_p99_ms",
    "throughput_tok_s",
    "tpot_mean_ms",
    "e2e_mean_ms",
    "load_spread",
    "preemptions",
    "wall_s",
)


def median_rows(rows: Iterable[SweepRow]) -> list[SweepRow]:
    """Collapse the seeds of each (point, policy): every figure becomes its median over seeds.

    >>> p = GridPoint("w", 1, 1, 1.0)
    >>> a = SweepRow("k", "w", 1, 1, 1.0, (0,), 0.1, 5.0, 9.0, 1, 1, 1, 1, 0, 1, 1, 0.1)
    >>> b = replace(a, seeds=(1,), ttft_mean_ms=7.0); c = replace(a, seeds=(2,), ttft_mean_ms=6.0)
    >>> [(m.seeds, m.ttft_mean_ms) for m in median_rows([a, b, c])]
    [((0, 1, 2), 6.0)]

    :param rows: rows of :func:`run_sweep`.
    :returns: one row per (point, policy), in first-seen order; ``seeds`` lists
        the seeds merged.
    """
    groups: dict[tuple[GridPoint, str], list[SweepRow]] = {}
    for r in rows:
        groups.setdefault((r.point, r.policy), []).append(r)
    out: list[SweepRow] = []
    for g in groups.values():
        if len(g) == 1:
            out.append(g[0])
            continue
        med: dict[str, Any] = {
            f: float(statistics.median(getattr(r, f) for r in g)) for f in _MEDIAN_FIELDS
        }
        seeds = tuple(s for r in g for s in r.seeds)
        out.append(replace(g[0], seeds=seeds, **med))
    return out


# -- markdown ---------------------------------------------------------------------


def _by_point(rows: Iterable[SweepRow]) -> dict[GridPoint, dict[str, SweepRow]]:
    out: dict[GridPoint, dict[str, SweepRow]] = {}
    for r in rows:
        d = out.setdefault(r.point, {})
        if r.policy in d:
            raise ValueError(
                f"two rows for {r.policy!r} at {r.point}: collapse seeds with median_rows first"
            )
        d[r.policy] = r
    return out


def _best(values: Mapping[str, float], lowest: bool) -> tuple[list[str], float]:
    """The names whose value is the minimum (``lowest``) or maximum; NaNs never win."""
    ok = {k: v for k, v in values.items() if not math.isnan(v)}
    if not ok:
        return [], float("nan")
    best = min(ok.values()) if lowest else max(ok.values())
    tol = 1e-9 * max(abs(best), 1.0)
    return [k for k, v in ok.items() if abs(v - best) <= tol], best


def _num(v: float, digits: int) -> str:
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def _speed(v: float) -> str:
    return f"{v:g}x"


def _point_cells(p: GridPoint, center: tuple[int, int, float] | None) -> list[str]:
    cells = [p.workload, str(p.workers), str(p.gpu_blocks), _speed(p.speedup)]
    if center is not None:  # bold the value that leaves the centre
        vals = (p.workers, p.gpu_blocks, p.speedup)
        for i, (v, c) in enumerate(zip(vals, center, strict=True)):
            if v != c:
                cells[i + 1] = f"**{cells[i + 1]}**"
    return cells


def _md(head: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _ratio(a: SweepRow | None, b: SweepRow | None) -> str:
    if a is None or b is None:
        return "-"
    m = a.ttft_mean_ms / b.ttft_mean_ms if b.ttft_mean_ms else float("nan")
    q = a.ttft_p99_ms / b.ttft_p99_ms if b.ttft_p99_ms else float("nan")
    return f"{_num(m, 2)} / {_num(q, 2)}"


def win_table(
    rows: Iterable[SweepRow],
    *,
    policy: str = "kvroute",
    baselines: Sequence[str] = ("round_robin", "kv_cost"),
    center: tuple[int, int, float] | None = None,
) -> str:
    """A markdown table of where each policy wins: one line per grid point, then a tally.

    Columns: the point; the best policy (and its value) by mean TTFT, by p99
    TTFT (lowest) and by prefix reuse (highest), ties listed together; then
    ``policy``'s mean / p99 TTFT as ratios to each baseline's (below 1: ``policy``
    is faster). The last line counts each policy's wins over all points.

    >>> a = SweepRow("a", "w", 1, 1, 1.0, (), 0.2, 100.0, 400.0, 1, 1, 1, 1, 0, 1, 1, 0.1)
    >>> b = replace(a, policy="b", prefix_reuse=0.3, ttft_mean_ms=50.0)
    >>> t = win_table([a, b], policy="b", baselines=("a",)).splitlines()
    >>> print(t[2]); print(t[3])
    | w | 1 | 1 | 1x | b 50 | a, b 400 | b 0.300 | 0.50 / 1.00 |
    | wins (of 1) |  |  |  | b 1 | a 1, b 1 | b 1 |  |

    :param rows: rows with one per (point, policy): see :func:`median_rows`.
    :param policy: the policy compared with the baselines.
    :param baselines: policies to divide by.
    :param center: if given, bold the values that differ from it.
    :returns: the markdown table.
    :raises ValueError: two rows for one (point, policy).
    """
    pts = _by_point(rows)
    head = ["workload", "workers", "blocks", "speed", "best mean TTFT", "best p99 TTFT"]
    head += ["best reuse"] + [f"{policy} ÷ {b} mean / p99" for b in baselines]
    tally: list[Counter[str]] = [Counter(), Counter(), Counter()]
    body = []
    for p, d in pts.items():
        cells = _point_cells(p, center)
        for i, (attr, lowest, digits) in enumerate(
            (("ttft_mean_ms", True, 0), ("ttft_p99_ms", True, 0), ("prefix_reuse", False, 3))
        ):
            names, v = _best({k: getattr(r, attr) for k, r in d.items()}, lowest)
            tally[i].update(names)
            cells.append(f"{', '.join(names)} {_num(v, digits)}" if names else "-")
        cells += [_ratio(d.get(policy), d.get(b)) for b in baselines]
        body.append(cells)

    def fmt(c: Counter[str]) -> str:
        return ", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    body.append([f"wins (of {len(pts)})", "", "", "", *map(fmt, tally), *[""] * len(baselines)])
    return _md(head, body)


def metric_table(
    rows: Iterable[SweepRow],
    metric: str,
    *,
    digits: int = 1,
    bounds: bool = False,
    center: tuple[int, int, float] | None = None,
) -> str:
    """A markdown table of one figure: a line per grid point, a column per policy; best in bold.

    >>> a = SweepRow("a", "w", 1, 1, 1.0, (), 0.2, 100.0, 400.0, 1, 1, 1, 1, 0, 1, 1, 0.1,
    ...              {"unbounded": 0.5, "pooled_lru": 0.4})
    >>> print(metric_table([a, replace(a, policy="b", prefix_reuse=0.25)], "prefix_reuse",
    ...                    digits=2, bounds=True))
    | workload | workers | blocks | speed | a | b | unbounded | pooled_lru |
    |---|---|---|---|---|---|---|---|
    | w | 1 | 1 | 1x | 0.20 | **0.25** | 0.50 | 0.40 |

    :param rows: rows with one per (point, policy): see :func:`median_rows`.
    :param metric: a numeric :class:`SweepRow` field (``ttft_mean_ms``, ``prefix_reuse``, ...).
    :param digits: decimals.
    :param bounds: add the two reuse bounds as columns.
    :param center: if given, bold the point values that differ from it.
    :returns: the markdown table; the best value of a line is bold (highest
        for ``prefix_reuse`` and ``throughput_tok_s``, else lowest).
    :raises ValueError: two rows for one (point, policy), or an unknown metric.
    """
    if metric not in _MEDIAN_FIELDS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(_MEDIAN_FIELDS)}")
    pts = _by_point(rows)
    policies = list(dict.fromkeys(k for d in pts.values() for k in d))
    bnames = list(dict.fromkeys(k for d in pts.values() for r in d.values() for k in r.bounds))
    head = ["workload", "workers", "blocks", "speed", *policies, *(bnames if bounds else [])]
    lowest = metric not in ("prefix_reuse", "throughput_tok_s")
    body = []
    for p, d in pts.items():
        vals = {k: float(getattr(r, metric)) for k, r in d.items()}
        best, _ = _best(vals, lowest)
        cells = _point_cells(p, center)
        for k in policies:
            s = _num(vals[k], digits) if k in vals else "-"
            cells.append(f"**{s}**" if k in best and len(best) < len(vals) else s)
        if bounds:
            any_row = next(iter(d.values()))
            cells += [_num(any_row.bounds.get(b, float("nan")), digits) for b in bnames]
        body.append(cells)
    return _md(head, body)
