"""The ``kvroute replay`` command: a trace on a simulated fleet, one row per routing policy.

::

    python -m kvroute replay TRACE --policy round_robin,kv_cost --workers 8 \\
        --gpu-blocks 2048 --block-size 512 [--speedup X] [--json PATH] [--plot DIR]

The replay itself is :func:`kvroute.sim.replay.replay`; this module parses
the arguments, loads the trace, prints the table and writes ``--json`` and
``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .._cli import CommandError
from ..traces import TraceError
from .engine import EngineConfig
from .plots import plot_replay
from .replay import ReplayResult, make_dispatcher, pooled_lru_reuse, replay, unbounded_reuse
from .replicas import add_replica_args, replica_factory, replica_settings, spread_arrivals
from .workloads import AgenticConfig, agentic_sessions, load_mooncake

__all__ = ["DESCRIPTION", "EPILOG", "configure", "run"]

_DEFAULTS = EngineConfig()


#: ``kvroute replay --help`` text.
DESCRIPTION = """Replay a trace on a simulated fleet under each policy and print a table.

TRACE is a Mooncake jsonl(.gz) path, `default` (the bundled conversation
trace) or `agentic[:SESSIONS]` (the agentic-session generator). Each policy
runs kvroute's real Router on simulated time; the table ends with two bounds
on the same trace: one unbounded cache, and one pooled LRU of the fleet's
total capacity."""

#: ``kvroute replay --help`` epilog.
EPILOG = (
    "example: kvroute replay default --policy round_robin,kv_cost,kvroute --workers 8 "
    "--gpu-blocks 2048 --block-size 512"
)


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``replay`` command's arguments to ``p``."""
    p.add_argument("trace", metavar="TRACE", help="a trace path, 'default' or 'agentic[:N]'")
    p.add_argument("--policy", default="kvroute", help="comma-separated policy names")
    p.add_argument("--workers", type=int, default=8, help="simulated workers (default 8)")
    p.add_argument(
        "--gpu-blocks", type=int, default=_DEFAULTS.num_gpu_blocks, help="KV blocks per worker"
    )
    p.add_argument("--block-size", type=int, default=512, help="tokens per KV block")
    p.add_argument("--trace-block-size", type=int, default=512, help="tokens per trace hash id")
    p.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this")
    p.add_argument("--max-num-seqs", type=int, default=_DEFAULTS.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=_DEFAULTS.max_num_batched_tokens)
    p.add_argument("--event-lag", type=float, default=0.0, help="KV event delay, seconds")
    p.add_argument("--event-loss", type=float, default=0.0, help="KV event loss probability")
    p.add_argument("--approximate", action="store_true", help="Router without KV events")
    p.add_argument("--limit", type=int, default=None, help="first N requests only")
    p.add_argument("--seed", type=int, default=0, help="seed of losses and generators")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write figures")
    p.add_argument("--plot", default=None, metavar="DIR", help="directory for PNG plots")
    add_replica_args(p)


def run(a: argparse.Namespace) -> int:
    """Run the ``replay`` command with parsed arguments; returns the exit status.

    :raises CommandError: the trace cannot be read, or an argument is out of
        range (an unknown policy included); the caller prints it and exits 2.
    """
    try:
        return _replay(a)
    except KeyError as e:  # an unknown policy name: the message is the key
        raise CommandError(str(e.args[0])) from None
    except (OSError, TraceError, ValueError) as e:
        raise CommandError(str(e)) from None


def _replay(a: argparse.Namespace) -> int:
    cfg = EngineConfig(
        num_gpu_blocks=a.gpu_blocks,
        block_size=a.block_size,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
    )
    if a.trace.startswith("agentic"):
        _, _, k = a.trace.partition(":")
        acfg = AgenticConfig() if not k else replace(AgenticConfig(), sessions=int(k))
        reqs = agentic_sessions(acfg, block_size=a.block_size, seed=a.seed)
        if a.speedup != 1.0:
            reqs = [replace(r, arrival=r.arrival / a.speedup) for r in reqs]
    else:
        reqs = load_mooncake(
            None if a.trace == "default" else a.trace,
            block_size=a.block_size,
            trace_block_size=a.trace_block_size,
            speedup=a.speedup,
            limit=a.limit,
        )
    if a.limit is not None:
        reqs = reqs[: a.limit]
    reqs = spread_arrivals(reqs, a.arrival_jitter, a.seed)
    router_kwargs = {"kv_events": False} if a.approximate else {}
    runs: dict[str, ReplayResult] = {}
    for name in [x.strip() for x in a.policy.split(",") if x.strip()]:
        runs[name] = replay(
            reqs,
            replica_factory(a, name, **router_kwargs) or make_dispatcher(name, **router_kwargs),
            num_workers=a.workers,
            config=cfg,
            event_lag=a.event_lag,
            event_loss=a.event_loss,
            seed=a.seed,
            progress=_bar(name),
        )
        runs[name].summary["wall_s"] = runs[name].wall_s
    bounds = {
        "unbounded": unbounded_reuse(reqs, a.block_size),
        "pooled LRU": pooled_lru_reuse(reqs, a.block_size, a.workers * a.gpu_blocks),
    }
    print(_table({k: r.summary for k, r in runs.items()}, bounds))
    if a.json_path:
        doc = {
            "trace": a.trace,
            "fleet": {"workers": a.workers, "gpu_blocks": a.gpu_blocks, "block_size": a.block_size},
            "engine": {
                "max_num_seqs": cfg.max_num_seqs,
                "max_num_batched_tokens": cfg.max_num_batched_tokens,
            },
            "speedup": a.speedup,
            "event_lag_s": a.event_lag,
            "event_loss": a.event_loss,
            "policies": {k: r.summary for k, r in runs.items()},
            "bounds": bounds,
            **replica_settings(a),
        }
        with open(a.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    if a.plot:
        try:
            plot_replay(a.plot, runs, bounds)
        except ImportError:
            sys.stderr.write("--plot needs matplotlib (pip install matplotlib); skipped\n")
    return 0


# -- output ---------------------------------------------------------------------


def _bar(label: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        w = 30
        k = w * done // max(total, 1)
        sys.stderr.write(f"\r{label:>16} [{'#' * k}{'.' * (w - k)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _fmt(v: object, digits: int = 1) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _table(results: dict[str, dict[str, Any]], bounds: dict[str, dict[str, float]]) -> str:
    head = (
        f"{'policy':<18}{'reuse':>7}{'TTFT mean':>10}{'p50':>8}{'p95':>8}{'p99':>8}"
        f"{'TPOT':>7}{'E2E':>8}{'req/s':>7}{'spread':>7}{'regret':>7}{'wall s':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        t = s["ttft_ms"]
        lines.append(
            f"{name:<18}{_fmt(s['prefix_reuse'], 3):>7}{_fmt(t['mean']):>10}{_fmt(t['p50']):>8}"
            f"{_fmt(t['p95']):>8}{_fmt(t['p99']):>8}{_fmt(s['tpot_ms']['mean'], 2):>7}"
            f"{_fmt(s['e2e_ms']['mean'], 0):>8}{_fmt(s['throughput']['requests_per_s'], 2):>7}"
            f"{_fmt(s['load_spread']['requests']['max_over_mean'], 2):>7}"
            f"{_fmt(s['overlap_regret_blocks']['mean'], 2):>7}{_fmt(s['wall_s'], 1):>7}"
        )
    for name, b in bounds.items():
        lines.append(f"{'bound: ' + name:<18}{_fmt(b['prefix_reuse'], 3):>7}")
    return "\n".join(lines)
