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
import numpy.typing as npt

from .replay import ReplayResult
from .sweep import AXES, CENTER, SweepRow, _by_point

__all__ = [
    "BOUND_LABELS",
    "plot_point",
    "plot_replay",
    "plot_reuse",
    "plot_sweep",
    "plot_ttft_cdf",
    "policy_styles",
]


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use."""
    try:
        mpl = importlib.import_module("matplotlib")
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'kvroute[plot]'") from None
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


# One look per policy in every figure, so a reader matches lines across them.
# Okabe-Ito's colour-blind-safe palette (its yellow, too pale on white, swapped
# for grey); the line style tells apart what a grey-scale print merges.
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#000000", "#56B4E9", "#E69F00", "#CC79A7", "#999999")
_KNOWN = {  # name -> (palette index, line style, marker)
    "kvroute": (0, "-", "o"),
    "kv_cost": (1, "-", "s"),
    "cache_aware": (2, "-", "^"),
    "round_robin": (3, "--", "v"),
    "sim:round_robin": (3, "--", "v"),
    "least_loaded": (4, "--", "D"),
    "power_of_two": (5, "-.", "P"),
    "session_affinity": (6, "-.", "X"),
    "random": (7, ":", "*"),
}
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def policy_styles(names: Sequence[str]) -> dict[str, dict[str, str]]:
    """A colour, line style and marker per policy: fixed for the built-in names, distinct for all.

    Built-in policies keep their look in every figure; other names take the
    unused colours in order, then each colour again with another line style,
    so no two of up to 32 names look alike.

    >>> s = policy_styles(["kvroute", "mine"])
    >>> s["kvroute"]["color"] != s["mine"]["color"]
    True

    :param names: the policies, in legend order.
    :returns: name -> ``{"color", "linestyle", "marker"}`` (matplotlib keyword arguments).
    """
    out: dict[str, dict[str, str]] = {}
    taken: set[tuple[int, str]] = set()
    for k in names:
        if k in _KNOWN and k not in out:
            c, ls, m = _KNOWN[k]
            out[k] = {"color": _PALETTE[c], "linestyle": ls, "marker": m}
            taken.add((c, ls))
    free = [
        (c, ls)
        for ls in _STYLES
        for c in range(len(_PALETTE))
        if (c, ls) not in taken and all(c != tc for tc, _ in taken)
    ] + [(c, ls) for ls in _STYLES for c in range(len(_PALETTE)) if (c, ls) not in taken]
    j = 0
    for k in names:
        if k in out:
            continue
        while free[j % len(free)] in taken:
            j += 1
        c, ls = free[j % len(free)]
        taken.add((c, ls))
        out[k] = {"color": _PALETTE[c], "linestyle": ls, "marker": _MARKERS[j % len(_MARKERS)]}
    return out


#: Bound names (as in ``SweepRow.bounds`` and the replay report) -> label.
BOUND_LABELS = {"unbounded": "unbounded cache", "pooled_lru": "pooled LRU"}


def _title(fig: Any, title: str, note: str | None) -> None:
    fig.suptitle(title if not note else f"{title}\n", x=0.01, ha="left", fontweight="bold")
    if note:
        fig.text(0.01, 0.995, f"\n\n{note}", ha="left", va="top", fontsize=8, color="0.3")


def _ttfts_ms(r: ReplayResult) -> npt.NDArray[np.float64]:
    x = (r.records.first_token - r.records.arrival) * 1000.0
    return np.sort(x[~np.isnan(x)])


def plot_reuse(
    path: str | os.PathLike[str],
    reuse: Mapping[str, float],
    bounds: Mapping[str, float],
    *,
    note: str | None = None,
    dpi: int = 150,
) -> None:
    """Prefix reuse per policy as horizontal bars, the bounds as two more bars and as lines.

    One bar per policy (any number: each has its own row, so labels never
    collide), its value printed at its end; below them, set apart and
    hatched, one bar per bound, so both stay visible when they are equal.
    A dotted vertical line marks each bound across the policies' bars (one
    line when they coincide: the hatched bars still name both).

    :param path: the PNG to write.
    :param reuse: policy -> prefix reuse, in display order (top to bottom).
    :param bounds: bound name (``unbounded``, ``pooled_lru`` or any) -> prefix reuse.
    :param note: a line under the title (trace, fleet, seed).
    :param dpi: resolution.
    :raises ImportError: matplotlib is missing.
    """
    plt = _pyplot()
    names = list(reuse)
    blabels = [f"bound: {BOUND_LABELS.get(k, k)}" for k in bounds]
    rows = len(names) + len(bounds)
    fig, ax = plt.subplots(figsize=(6.4, 1.5 + 0.3 * (rows + 1)), layout="constrained")
    styles = policy_styles(names)
    ys = list(range(len(names)))
    vals = [float(reuse[k]) for k in names]
    ax.barh(ys, vals, height=0.7, color=[styles[k]["color"] for k in names])
    by = [len(names) + 0.5 + i for i in range(len(bounds))]
    bvals = [float(v) for v in bounds.values()]
    ax.barh(by, bvals, height=0.7, color="0.92", edgecolor="0.35", hatch="///", linewidth=0.8)
    top = max([v for v in vals + bvals if math.isfinite(v)] or [1.0])
    for y, v in zip(ys + by, vals + bvals, strict=True):
        ax.text(
            v if math.isfinite(v) else 0.0, y, f" {_num(v, 3)}", va="center", fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3},
        )  # fmt: skip
    for v in sorted({v for v in bvals if math.isfinite(v)}):  # equal bounds: one line
        ax.axvline(v, color="0.35", linestyle=":", linewidth=1.0, zorder=0)
    ax.set_yticks(ys + by, names + blabels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.16)
    ax.set_xlabel("prefix reuse (cached prompt tokens / prompt tokens)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    _title(fig, "Prefix reuse per policy, against two bounds", note)
    fig.savefig(os.fspath(path), dpi=dpi)
    plt.close(fig)


def plot_ttft_cdf(
    path: str | os.PathLike[str],
    runs: Mapping[str, ReplayResult],
    *,
    note: str | None = None,
    dpi: int = 150,
) -> None:
    """TTFT per policy: its whole distribution, and its tail on a log scale.

    Left, the CDF on a log time axis (the body: medians, the bulk). Right,
    the share of requests slower than each time, on a log-log scale, from
    20 % down to the slowest request: the tail where policies differ, which
    a CDF squashes into its last pixels; p99 and p99.9 are marked. The
    legend, under both panels, gives each policy's p50 and p99 and never
    covers a line.

    :param path: the PNG to write.
    :param runs: policy -> its replay, in legend order.
    :param note: a line under the title (trace, fleet, seed).
    :param dpi: resolution.
    :raises ImportError: matplotlib is missing.
    """
    plt = _pyplot()
    names = list(runs)
    styles = policy_styles(names)
    fig, (body, tail) = plt.subplots(1, 2, figsize=(9.0, 4.2), layout="constrained")
    lo, hi, tail_lo = math.inf, 0.0, math.inf
    handles, labels = [], []
    for k in names:
        x = _ttfts_ms(runs[k])
        n = len(x)
        st = {kk: v for kk, v in styles[k].items() if kk != "marker"}
        if n == 0:
            (h,) = body.plot([], [], **st)
            handles.append(h)
            labels.append(f"{k}: no request got a first token")
            continue
        lo, hi = min(lo, float(x[0])), max(hi, float(x[-1]))
        (h,) = body.plot(x, np.arange(1, n + 1) / n, linewidth=1.4, **st)
        slower = (n - np.arange(n)) / n  # share of requests with TTFT >= x[i]
        tail.plot(x, slower, linewidth=1.4, **st)
        tail_lo = min(tail_lo, float(np.percentile(x, 80)))
        p50, p99 = np.percentile(x, [50, 99])
        handles.append(h)
        labels.append(f"{k}  (p50 {p50:,.0f} ms, p99 {p99:,.0f} ms)")
    for ax in (body, tail):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.grid(True, which="major", color="0.9", linewidth=0.6)
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlabel("time to first token (ms, log scale)", fontsize=9)
    body.set_ylim(0, 1.0)
    body.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0], ["0", "20 %", "40 %", "60 %", "80 %", "100 %"])
    body.set_ylabel("share of requests with TTFT ≤ x", fontsize=9)
    body.set_title("distribution (CDF)", fontsize=9, loc="left")
    tail.set_yscale("log")
    tail.set_ylabel("share of requests with TTFT ≥ x (log)", fontsize=9)
    tail.set_title("tail: the slowest 20 %", fontsize=9, loc="left")
    if math.isfinite(tail_lo):
        tail.set_xlim(tail_lo, hi * 1.15)
        _ms_ticks(tail, tail_lo, hi * 1.15)
        floor = 1.0 / max(max(len(_ttfts_ms(r)) for r in runs.values()), 1)
        bottom = min(floor, 1e-3) * 0.7
        tail.set_ylim(bottom, 0.2)
        shares = [t for t in _SHARE_TICKS if bottom <= t <= 0.2]
        tail.set_yticks(shares, [f"{100 * t:g} %" for t in shares])
        for q, label in ((0.01, "p99"), (0.001, "p99.9")):
            if q >= floor:
                tail.axhline(q, color="0.4", linestyle=":", linewidth=0.8)
                # at the left edge: the curves are near the top there, the labels stay clear
                tail.annotate(
                    label, (0.0, q), xycoords=("axes fraction", "data"), xytext=(3, 2),
                    textcoords="offset points", ha="left", va="bottom", fontsize=7, color="0.3",
                )  # fmt: skip
    if math.isfinite(lo):
        body.set_xlim(lo / 1.15, hi * 1.15)
        _ms_ticks(body, lo / 1.15, hi * 1.15)
    fig.legend(
        handles, labels, loc="outside lower center", ncol=2 if len(names) > 1 else 1, fontsize=8,
        frameon=False,
    )  # fmt: skip
    _title(fig, "Time to first token per policy", note)
    fig.savefig(os.fspath(path), dpi=dpi)
    plt.close(fig)


def plot_replay(
    directory: str | os.PathLike[str],
    runs: Mapping[str, ReplayResult],
    bounds: Mapping[str, float],
    *,
    prefix: str = "",
    note: str | None = None,
) -> list[str]:
    """``kvroute replay --plot``'s two figures: the TTFT distribution and reuse against the bounds.

    :param directory: where to write (created if missing).
    :param runs: policy -> its replay.
    :param bounds: bound name (``unbounded``, ``pooled_lru``) -> prefix reuse.
    :param prefix: file name prefix.
    :param note: a line under each title: what was replayed (trace, fleet, seed).
    :returns: the paths written: ``<prefix>ttft_cdf.png`` and ``<prefix>reuse.png``.
    :raises ImportError: matplotlib is missing.
    """
    _pyplot()
    os.makedirs(directory, exist_ok=True)
    cdf = os.path.join(os.fspath(directory), prefix + "ttft_cdf.png")
    reuse = os.path.join(os.fspath(directory), prefix + "reuse.png")
    plot_ttft_cdf(cdf, runs, note=note)
    plot_reuse(reuse, {k: float(r.summary["prefix_reuse"]) for k, r in runs.items()}, bounds,
               note=note)  # fmt: skip
    return [cdf, reuse]


_SHARE_TICKS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001)


def _ms_ticks(ax: Any, lo: float, hi: float) -> None:
    """Ticks at 1, 2, 5 x 10^k ms on a log axis, written as plain numbers (no 10^k)."""
    ticks = [
        m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        for m in (1, 2, 5) if lo <= m * 10.0**e <= hi
    ]  # fmt: skip
    if len(ticks) > 8:  # a wide range: decades only
        ticks = [t for t in ticks if f"{t:g}".startswith("1")] or ticks
    ax.set_xticks(ticks, [f"{t:,.0f}" if t >= 1 else f"{t:g}" for t in ticks])


def _num(v: float, digits: int) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


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
    styles = policy_styles([baseline, *policies])
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
                st = styles[k]
                ys = [
                    getattr(pts[p][k], metric) / getattr(pts[p][baseline], metric)
                    if k in pts[p] and baseline in pts[p]
                    else float("nan")
                    for p in on
                ]
                seen += [y for y in ys if y > 0 and math.isfinite(y)]
                ax.plot(xs, ys, markersize=3.5, linewidth=1.3, label=k, **st)
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
    seeds = sorted({s for d in pts.values() for r in d.values() for s in r.seeds})
    seeded = ""
    if len(seeds) == 1:
        seeded = f"; seeded policies: policy seed {seeds[0]}"
    elif seeds:
        seeded = f"; seeded policies: median over policy seeds {', '.join(map(str, seeds))}"
    fig.suptitle(
        f"{_METRICS.get(metric, metric)} as a ratio to {baseline} (log scale; below 1: faster)\n"
        f"other settings at {cw} workers x {cb} blocks per worker, {cs:g}x arrival speed{seeded}",
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
    note: str | None = None,
) -> list[str]:
    """The replay command's two plots for one grid point: TTFT per policy, reuse vs bounds.

    Drawn by :func:`plot_replay` (so the figures look alike), as
    ``<prefix>ttft_cdf.png`` and ``<prefix>reuse.png``.

    :param directory: where to write (created if missing).
    :param runs: policy -> its replay at this point.
    :param bounds: ``SweepRow.bounds`` of the point.
    :param prefix: file name prefix.
    :param note: a line under each title (the point, the seeds).
    :returns: the two paths written.
    :raises ImportError: matplotlib is missing.
    """
    return plot_replay(directory, runs, bounds, prefix=prefix, note=note)
