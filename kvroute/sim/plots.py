"""PNG plots of replays and sweeps (matplotlib, the optional ``plot`` extra, imported on first use).

:func:`plot_replay` draws ``kvroute replay --plot``'s two figures,
:func:`plot_point` the same for one point of a sweep, and :func:`plot_sweep`
each policy's ratio to a baseline along the sweep's axes.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .replay import ReplayResult
from .sweep import AXES, CENTER, SweepRow, _by_point

__all__ = ["plot_point", "plot_replay", "plot_sweep"]


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use."""
    try:
        mpl = importlib.import_module("matplotlib")
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'kvroute[plot]'") from None
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot_replay(
    directory: str | os.PathLike[str],
    runs: Mapping[str, ReplayResult],
    bounds: Mapping[str, Mapping[str, float]],
    *,
    prefix: str = "",
) -> list[str]:
    """``kvroute replay --plot``'s two figures: reuse per policy beside the bounds, and TTFT CDF.

    :param directory: where to write (created if missing).
    :param runs: policy -> its replay.
    :param bounds: bound label -> ``{"prefix_reuse": value}``; the first two are drawn.
    :param prefix: file name prefix.
    :returns: the paths written: ``<prefix>ttft_cdf.png`` and ``<prefix>reuse.png``.
    :raises ImportError: matplotlib is missing.
    """
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    reuse = os.path.join(os.fspath(directory), prefix + "reuse.png")
    cdf = os.path.join(os.fspath(directory), prefix + "ttft_cdf.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(runs)
    ax.bar(names, [runs[k].summary["prefix_reuse"] for k in names])
    for (label, b), style in zip(bounds.items(), ("--", ":"), strict=False):
        ax.axhline(b["prefix_reuse"], linestyle=style, color="k", label=f"bound: {label}")
    ax.set_ylabel("prefix reuse")
    ax.legend()
    fig.tight_layout()
    fig.savefig(reuse, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, r in runs.items():
        x = np.sort((r.records.first_token - r.records.arrival) * 1000.0)
        x = x[~np.isnan(x)]
        ax.plot(x, np.arange(1, len(x) + 1) / max(len(x), 1), label=k)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("CDF")
    ax.legend()
    fig.tight_layout()
    fig.savefig(cdf, dpi=120)
    plt.close(fig)
    return [cdf, reuse]


_LABELS = {
    "workers": "workers",
    "gpu_blocks": "KV blocks per worker",
    "speedup": "arrival speed-up",
}

#: y ticks of the ratio plots: for a narrow range, and for a wide one (> 4x).
_RATIO_TICKS = (
    (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0),
    (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
_METRICS = {"ttft_mean_ms": "mean TTFT", "ttft_p99_ms": "p99 TTFT", "prefix_reuse": "reuse"}


def plot_sweep(
    rows: Iterable[SweepRow],
    path: str | os.PathLike[str],
    *,
    metric: str = "ttft_mean_ms",
    baseline: str = "round_robin",
    axes: Sequence[str] = AXES,
    center: tuple[int, int, float] = CENTER,
    dpi: int = 100,
) -> None:
    """Plot each policy's ``metric`` as a ratio to ``baseline``'s along each grid axis.

    One panel per (workload, axis): along the axis the other two settings
    stay at ``center``; a line per policy; 1.0 (the baseline) dashed; below
    it the policy beats the baseline.

    :param rows: rows with one per (point, policy): see :func:`median_rows`.
    :param path: the PNG to write.
    :param metric: a numeric :class:`SweepRow` field.
    :param baseline: the policy to divide by.
    :param axes: :class:`GridPoint` fields to sweep along, one panel column each.
    :param center: the fixed (workers, gpu_blocks, speedup).
    :param dpi: resolution.
    :raises ImportError: matplotlib is missing.
    :raises ValueError: an unknown axis, or two rows for one (point, policy).
    """
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise ValueError(f"unknown axes {bad!r}; choose from {AXES}")
    pts = _by_point(rows)
    workloads = list(dict.fromkeys(p.workload for p in pts))
    policies = [k for k in dict.fromkeys(k for d in pts.values() for k in d) if k != baseline]
    plt = _pyplot()
    nr, nc = max(len(workloads), 1), max(len(axes), 1)
    fig, grid = plt.subplots(nr, nc, figsize=(3.3 * nc, 2.6 * nr + 0.6), squeeze=False)
    fixed = dict(zip(AXES, center, strict=True))
    for i, wl in enumerate(workloads):
        for j, axis in enumerate(axes):
            ax = grid[i][j]
            on = sorted(
                (p for p in pts if p.workload == wl and all(
                    getattr(p, a) == fixed[a] for a in AXES if a != axis)),
                key=lambda p: float(getattr(p, axis)),
            )  # fmt: skip
            xs = [float(getattr(p, axis)) for p in on]
            seen = [1.0]
            for k in policies:
                ys = [
                    getattr(pts[p][k], metric) / getattr(pts[p][baseline], metric)
                    if k in pts[p] and baseline in pts[p]
                    else float("nan")
                    for p in on
                ]
                seen += [y for y in ys if y > 0 and math.isfinite(y)]
                ax.plot(xs, ys, marker="o", markersize=3, label=k)
            ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
            if xs:
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs)
                ax.set_xticklabels([f"{x:g}" for x in xs])
            # a log scale: a ratio of 0.5 is as far below 1 as 2 is above, and a
            # baseline that collapses (x20 slower) does not flatten the others
            ax.set_yscale("log")
            lo, hi = min(seen) / 1.15, max(seen) * 1.15
            ticks = [t for t in _RATIO_TICKS[1 if hi / lo > 4 else 0] if lo <= t <= hi]
            ax.set_yticks(ticks)
            ax.set_yticklabels([f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_title(f"{wl}: {_LABELS[axis]}", fontsize=9)
            ax.tick_params(labelsize=8)
            if j == 0:
                ax.set_ylabel(f"{_METRICS.get(metric, metric)} ÷ {baseline}", fontsize=8)
    cw, cb, cs = center
    fig.suptitle(
        f"{_METRICS.get(metric, metric)} as a ratio to {baseline} (log scale; below 1: faster). "
        f"Other settings: {cw} workers, {cb} blocks, {cs:g}x",
        fontsize=9,
    )
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(labels), 1), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(os.fspath(path), dpi=dpi)
    plt.close(fig)


def plot_point(
    directory: str | os.PathLike[str],
    runs: Mapping[str, ReplayResult],
    bounds: Mapping[str, float],
    *,
    prefix: str = "",
) -> list[str]:
    """The replay command's two plots for one grid point: TTFT CDF per policy, reuse vs bounds.

    Drawn by the same code as ``kvroute replay --plot`` (so the figures look
    alike), then renamed ``<prefix>ttft_cdf.png`` and ``<prefix>reuse.png``.

    :param directory: where to write (created if missing).
    :param runs: policy -> its replay at this point.
    :param bounds: ``SweepRow.bounds`` of the point.
    :param prefix: file name prefix.
    :returns: the two paths written.
    :raises ImportError: matplotlib is missing.
    """
    labels = {"unbounded": "unbounded", "pooled_lru": "pooled LRU"}
    b = {labels.get(k, k): {"prefix_reuse": v} for k, v in bounds.items()}
    return plot_replay(directory, runs, b, prefix=prefix)
