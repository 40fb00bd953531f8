"""Sweep the replay over fleet size, KV capacity and arrival speed; report where each policy wins.

Runs :func:`kvroute.sim.sweep.run_sweep` on a star grid (one factor at a time
around 8 workers x 2,048 blocks x 512 tokens at the trace's own speed) for
the bundled Mooncake conversation trace and the agentic-session generator,
every policy at every point; policies that draw random numbers (``kv_cost``,
``kvroute``) run once per seed and the tables show medians. Prints the
"where each policy wins" table and per-metric tables; with ``--out DIR``
also writes ``rows.json`` (every run and the medians), ``sweep.md`` (the
tables, the command and the machine) and the PNGs (into ``--img DIR``,
default ``DIR``; plots need matplotlib)::

    PYTHONPATH=. nice -n 10 python benchmarks/sweep_replay.py --out /tmp/sweep --img docs/img
    PYTHONPATH=. python benchmarks/sweep_replay.py --quick --out /tmp/sweep-quick
    PYTHONPATH=. python benchmarks/sweep_replay.py --replot /tmp/sweep/rows.json --img docs/img

``--replot`` redoes the tables and the ratio plots from a ``rows.json``
without replaying (the CDF and reuse plots need the replays themselves).

The replay runs on simulated time, so its figures do not depend on the
machine; only the wall and CPU seconds do. Not measured: anything outside
the simulator's model (see docs/simulator.md, "What the model leaves out").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from kvroute.sim import AgenticConfig, ReplayResult
from kvroute.sim.plots import plot_point, plot_sweep
from kvroute.sim.sweep import (
    GridPoint,
    SweepRow,
    WorkloadFn,
    agentic_workload,
    median_rows,
    metric_table,
    mooncake_workload,
    run_sweep,
    star_grid,
    win_table,
)

POLICIES = "round_robin,least_loaded,cache_aware,kv_cost,kvroute"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The script's arguments (``--quick`` swaps in a tiny grid on small workloads)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid and workloads (seconds)")
    p.add_argument("--out", default=None, metavar="DIR", help="write rows.json, sweep.md, PNGs")
    p.add_argument("--img", default=None, metavar="DIR", help="PNG directory (default: --out)")
    p.add_argument("--policies", default=POLICIES, help=f"comma-separated (default {POLICIES})")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the seeded policies (default 0,1,2)")
    p.add_argument("--workloads", default="mooncake,agentic", help="mooncake and/or agentic")
    p.add_argument("--workers", default="4,8,16,32", help="fleet sizes")
    p.add_argument("--gpu-blocks", default="1024,2048,4096", help="KV blocks per worker")
    p.add_argument("--speedups", default="0.5,1,2,4", help="arrival speed-ups")
    p.add_argument("--center", default="8,2048,1", help="workers,gpu_blocks,speedup")
    p.add_argument("--block-size", type=int, default=512, help="tokens per KV block")
    p.add_argument(
        "--replot",
        default=None,
        metavar="JSON",
        help="no replays: redo tables and sweep plots from a rows.json "
        "(the TTFT CDF and reuse plots need the replays)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.policies, a.seeds = "round_robin,kvroute", "0"
        a.workers, a.gpu_blocks, a.speedups, a.center = "2,4", "512,1024", "1,2", "4,1024,1"
    return a


def _workloads(quick: bool) -> dict[str, WorkloadFn]:
    if quick:
        return {
            "mooncake": mooncake_workload(limit=1500),
            "agentic": agentic_workload(replace(AgenticConfig(), sessions=6)),
        }
    return {"mooncake": mooncake_workload(), "agentic": agentic_workload()}


def _seed_spread(raw: Sequence[SweepRow]) -> str:
    """The largest relative max-min spread over seeds of mean and p99 TTFT, per policy."""
    groups: dict[tuple[GridPoint, str], list[SweepRow]] = {}
    for r in raw:
        if r.seeds:
            groups.setdefault((r.point, r.policy), []).append(r)
    worst: dict[str, list[float]] = {}
    for (_, policy), g in groups.items():
        if len(g) < 2:
            continue
        w = worst.setdefault(policy, [0.0, 0.0, 0.0])
        for i, f in enumerate(("ttft_mean_ms", "ttft_p99_ms")):
            v = [getattr(r, f) for r in g]
            w[i] = max(w[i], (max(v) - min(v)) / min(v))
        v = [r.prefix_reuse for r in g]
        w[2] = max(w[2], max(v) - min(v))
    return "; ".join(
        f"{k}: mean TTFT {100 * m:.1f} %, p99 TTFT {100 * q:.1f} %, reuse {u:.3f}"
        for k, (m, q, u) in worst.items()
    )


def _run(a: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """Replay the grid; returns the JSON document and, under ``"kept"``, the centre's replays."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    load = os.getloadavg()
    cw, cb, cs = a.center.split(",")
    center = (int(cw), int(cb), float(cs))
    points = star_grid(
        [w for w in a.workloads.split(",") if w],
        workers=_ints(a.workers),
        gpu_blocks=_ints(a.gpu_blocks),
        speedups=_floats(a.speedups),
        center=center,
    )
    seeds = _ints(a.seeds)
    kept: dict[str, dict[str, ReplayResult]] = {}
    done = [0]

    def on_replay(p: GridPoint, policy: str, seed: int | None, r: ReplayResult) -> None:
        done[0] += 1
        s = "" if seed is None else f" seed {seed}"
        print(
            f"[{done[0]:>3}] {p.workload} {p.workers}x{p.gpu_blocks} {p.speedup:g}x "
            f"{policy}{s}: {r.wall_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        if (p.workers, p.gpu_blocks, p.speedup) == center and seed in (None, seeds[0]):
            kept.setdefault(p.workload, {})[policy] = r

    policies = [x for x in a.policies.split(",") if x]
    raw = run_sweep(points, policies, _workloads(a.quick), block_size=a.block_size,
                    seeds=seeds, on_replay=on_replay)  # fmt: skip
    argv = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": "python benchmarks/sweep_replay.py " + shlex.join(argv),
        "machine": (
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, load average {load[0]:.1f} at start"
        ),
        "wall_s": time.perf_counter() - t_wall,
        "cpu_s": time.process_time() - t_cpu,
        "center": list(center),
        "block_size": a.block_size,
        "seeds": seeds,
        "median": [r.as_dict() for r in median_rows(raw)],
        "runs": [r.as_dict() for r in raw],
        "kept": kept,
    }


def render(doc: Mapping[str, Any]) -> str:
    """The markdown report of a sweep document (as ``rows.json`` holds it)."""
    raw = [SweepRow.from_dict(d) for d in doc["runs"]]
    rows = median_rows(raw)
    center = tuple(doc["center"])
    policies = list(dict.fromkeys(r.policy for r in rows))
    base = "round_robin" if "round_robin" in policies else policies[0]
    baselines = [b for b in (base, "kv_cost") if b in policies]
    text = [
        "## Where each policy wins\n",
        f"Bold: the setting that differs from the centre {center}. Ratios below 1: kvroute "
        "is faster. TTFT in ms; medians over seeds "
        f"{', '.join(map(str, doc['seeds']))} for seeded policies.\n",
        win_table(rows, baselines=baselines, center=center),
    ]
    tables = (
        ("mean TTFT (ms)", "ttft_mean_ms", 0, False),
        ("p99 TTFT (ms)", "ttft_p99_ms", 0, False),
        ("prefix reuse", "prefix_reuse", 3, True),
        ("mean TPOT (ms)", "tpot_mean_ms", 1, False),
        ("load spread (max/mean requests)", "load_spread", 2, False),
    )
    for title, metric, digits, bounds in tables:
        t = metric_table(rows, metric, digits=digits, bounds=bounds, center=center)
        text += [f"\n## {title}\n", t]
    text += [
        f"\nLargest spread over seeds (max-min, relative): {_seed_spread(raw) or 'n/a'}",
        f"\n{len(raw)} replays, {doc['wall_s']:.0f} s wall, {doc['cpu_s']:.0f} s CPU. "
        f"Command: `{doc['command']}`.",
        f"Machine: {doc['machine']}.",
    ]
    return "\n".join(text) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep (or reload one); print the tables; write ``--out`` and ``--img``. Returns 0."""
    a = parse_args(argv)
    if a.replot:
        with open(a.replot, encoding="utf-8") as f:
            doc: dict[str, Any] = json.load(f)
        kept: dict[str, dict[str, ReplayResult]] = {}
    else:
        doc = _run(a, argv)
        kept = doc.pop("kept")
    md = render(doc)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        if not a.replot:
            with open(os.path.join(a.out, "rows.json"), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
        with open(os.path.join(a.out, "sweep.md"), "w", encoding="utf-8") as f:
            f.write(md)
    img = a.img or a.out
    if not img:
        return 0
    os.makedirs(img, exist_ok=True)
    rows = median_rows(SweepRow.from_dict(d) for d in doc["runs"])
    center = (int(doc["center"][0]), int(doc["center"][1]), float(doc["center"][2]))
    base = "round_robin" if any(r.policy == "round_robin" for r in rows) else rows[0].policy
    try:
        for wl, runs in kept.items():  # per-request TTFTs: only from a fresh run
            b = next(r.bounds for r in rows if r.point == GridPoint(wl, *center))
            note = (
                f"{wl}: {center[0]} workers x {center[1]:,} blocks x {doc['block_size']} tokens, "
                f"{center[2]:g}x arrival speed; seeded policies: policy seed {doc['seeds'][0]}"
            )
            plot_point(img, runs, b, prefix=f"sim_{wl}_", note=note)
        for metric in ("ttft_mean_ms", "ttft_p99_ms"):
            path = os.path.join(img, f"sim_sweep_{metric}.png")
            plot_sweep(rows, path, metric=metric, baseline=base, center=center)
    except ImportError as e:
        print(f"sweep_replay: {e}; PNGs skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
