"""Per-request records of a replay and the figures computed from them.

Times are seconds in the records and milliseconds in the summaries.
Percentiles use linear interpolation between order statistics (numpy's
default), so ``p50`` of ``[1, 2, 3, 4]`` is ``2.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Records", "percentiles", "summarize"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def percentiles(values: Sequence[float] | F64, qs: Sequence[float] = (50, 95, 99)) -> list[float]:
    """Linear-interpolated percentiles; NaNs are ignored, empty input gives NaNs.

    >>> percentiles([1, 2, 3, 4], (50, 100))
    [2.5, 4.0]

    :param values: samples.
    :param qs: percentiles in [0, 100].
    :returns: one value per ``q``.
    :raises ValueError: a ``q`` outside [0, 100].
    """
    if any(not 0 <= q <= 100 for q in qs):
        raise ValueError(f"percentiles must be in [0, 100], got {list(qs)!r}")
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(a, list(qs))]


@dataclass(slots=True)
class Records:
    """Per-request outcomes of one replay, as parallel arrays (index = request order).

    :param arrival: arrival time (s).
    :param first_token: first token time (s); NaN if never.
    :param finish: completion time (s); NaN if never.
    :param prompt_tokens: prompt length.
    :param cached_tokens: prompt tokens found in the worker's cache at admission.
    :param output_tokens: tokens generated.
    :param worker: chosen worker (-1: not routed).
    :param chosen_overlap: blocks of the prompt cached on the chosen worker at routing time.
    :param best_overlap: most blocks of the prompt cached on any worker at routing time.
    """

    arrival: F64
    first_token: F64
    finish: F64
    prompt_tokens: I64
    cached_tokens: I64
    output_tokens: I64
    worker: I64
    chosen_overlap: I64
    best_overlap: I64

    @classmethod
    def empty(cls, n: int) -> Records:
        """Records for ``n`` requests, nothing happened yet.

        :param n: number of requests.
        :returns: NaN times, zero counts, worker -1.
        """
        nan = np.full(n, np.nan)
        return cls(
            nan.copy(),
            nan.copy(),
            nan.copy(),
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            np.full(n, -1, np.int64),
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
        )


def _stats_ms(x: F64) -> dict[str, float]:
    x = x[~np.isnan(x)] * 1000.0
    p50, p95, p99 = percentiles(x)
    return {
        "mean": float(x.mean()) if x.size else float("nan"),
        "p50": p50,
        "p95": p95,
        "p99": p99,
    }


def summarize(rec: Records, num_workers: int) -> dict[str, object]:
    """The figures of one replay.

    >>> r = Records.empty(2)
    >>> r.arrival[:] = 0; r.first_token[:] = [0.1, 0.3]; r.finish[:] = [1.1, 0.3]
    >>> r.prompt_tokens[:] = 100; r.cached_tokens[:] = [50, 0]; r.output_tokens[:] = [11, 1]
    >>> r.worker[:] = [0, 1]
    >>> s = summarize(r, 2)
    >>> s["prefix_reuse"], s["ttft_ms"]["mean"], s["tpot_ms"]["mean"]
    (0.25, 200.0, 100.0)

    :param rec: the records.
    :param num_workers: fleet size (for the load spread).
    :returns: a JSON-ready dict, each figure once: ``requests``, ``completed``,
        ``prefix_reuse`` (cached prompt tokens / prompt tokens, over admitted
        requests), ``ttft_ms``, ``tpot_ms`` (over requests with > 1 output token),
        ``e2e_ms`` (each with mean/p50/p95/p99), ``duration_s``,
        ``throughput`` (requests/s, output tokens/s, prompt tokens/s),
        ``load_spread`` (requests and prompt tokens per worker: max/mean and
        coefficient of variation) and ``overlap_regret_blocks`` (mean and
        share of requests with regret > 0).
    """
    done = ~np.isnan(rec.finish)
    admitted = rec.worker >= 0
    prompt = rec.prompt_tokens[admitted].sum()
    reuse = float(rec.cached_tokens[admitted].sum() / prompt) if prompt else float("nan")
    ttft = rec.first_token - rec.arrival
    e2e = rec.finish - rec.arrival
    multi = done & (rec.output_tokens > 1)
    tpot = np.full(len(rec.arrival), np.nan)
    tpot[multi] = (rec.finish[multi] - rec.first_token[multi]) / (rec.output_tokens[multi] - 1)
    duration = float(np.nanmax(rec.finish) - np.nanmin(rec.arrival)) if done.any() else 0.0
    per_w = np.asarray(
        np.bincount(rec.worker[admitted], minlength=num_workers)[:num_workers], np.float64
    )
    tok_w = np.bincount(
        rec.worker[admitted], weights=rec.prompt_tokens[admitted], minlength=num_workers
    )[:num_workers]

    def spread(v: F64) -> dict[str, float]:
        m = float(v.mean()) if v.size else 0.0
        if m == 0:
            return {"max_over_mean": float("nan"), "cv": float("nan")}
        return {"max_over_mean": float(v.max() / m), "cv": float(v.std() / m)}

    regret = (rec.best_overlap - rec.chosen_overlap)[admitted]
    ttft_ms = _stats_ms(ttft)
    out_tok_s = float(rec.output_tokens[done].sum() / duration) if duration else float("nan")
    return {
        "requests": len(rec.arrival),
        "completed": int(done.sum()),
        "prefix_reuse": reuse,
        "ttft_ms": ttft_ms,
        "tpot_ms": _stats_ms(tpot),
        "e2e_ms": _stats_ms(e2e),
        "duration_s": duration,
        "throughput": {
            "requests_per_s": float(done.sum() / duration) if duration else float("nan"),
            "output_tokens_per_s": out_tok_s,
            "prompt_tokens_per_s": (
                float(rec.prompt_tokens[done].sum() / duration) if duration else float("nan")
            ),
        },
        "load_spread": {
            "requests": spread(per_w),
            "prompt_tokens": spread(np.asarray(tok_w, np.float64)),
        },
        "overlap_regret_blocks": {
            "mean": float(regret.mean()) if regret.size else float("nan"),
            "share_positive": float((regret > 0).mean()) if regret.size else float("nan"),
        },
    }
