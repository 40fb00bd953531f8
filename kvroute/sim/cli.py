"""The ``kvroute replay`` command: a trace on a simulated fleet, one row per routing policy.

::

    python -m kvroute replay TRACE --policy round_robin,kv_cost --workers 8 \\
        --gpu-blocks 2048 --block-size 512 [--seed 0] [--json PATH] [--plot DIR]

The replay itself is :func:`kvroute.sim.replay.replay`; this module checks
the arguments and the output paths (before any work), loads the trace,
runs each policy with a progress bar, prints the table
(:func:`kvroute.sim.report.format_table`) and writes ``--json`` (the
report of :mod:`kvroute.sim.report`) and ``--plot``
(:func:`kvroute.sim.plots.plot_replay`).

One ``--seed`` fixes the run: the workload generator takes it, each
policy that draws random numbers and the KV event loss get seeds derived
from it (:mod:`kvroute.sim.seeding`), so two runs of one command print
the same table and write the same report but for its ``run`` block.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from .. import __version__
from .._cli import CommandError, int_at_least
from .._compat import USE_EXTENSIONS
from ..config import RouterConfig
from ..policies.params import parse_assignment
from ..traces import DEFAULT_TRACE, TraceError
from . import disagg
from .engine import EngineConfig
from .replay import ReplayResult, make_dispatcher, pooled_lru_reuse, replay, unbounded_reuse
from .replicas import add_replica_args, replica_factory, replica_settings, spread_arrivals
from .report import (
    REPORT_FORMAT,
    REPORT_VERSION,
    RUN_FACTS,
    TABLE_LEGEND,
    dumps_report,
    file_sha256,
    format_table,
    rejected_notes,
    requests_sha256,
)
from .seeding import derive_seed, policy_parameters
from .workloads import AgenticConfig, SimRequest, agentic_sessions, load_mooncake

__all__ = ["DESCRIPTION", "EPILOG", "configure", "run"]

_DEFAULTS = EngineConfig()

#: ``kvroute replay --help`` text.
DESCRIPTION = """Replay a trace on a simulated fleet under each policy and print a table.

TRACE is a Mooncake jsonl(.gz) path, `default` (the bundled conversation
trace) or `agentic[:SESSIONS]` (the agentic-session generator). Each policy
runs kvroute's real Router on simulated time; the table ends with two bounds
on the same trace: one unbounded cache, and one pooled LRU of the fleet's
total capacity. --seed fixes everything random (the agentic generator, the
policies' tie-breaks and sampling, KV event loss): the same command prints
the same table and writes the same report."""

#: ``kvroute replay --help`` epilog.
EPILOG = """example: kvroute replay default --policy round_robin,kv_cost,kvroute --workers 8 \
--gpu-blocks 2048 --block-size 512

exit status: 0 done; 2 bad usage or input (a missing or empty trace, an
unknown policy, an output path that cannot be written, a fleet on which no
request fits, matplotlib missing for --plot); 130 interrupted."""

#: Options that do not change the results, left out of the report's ``command``.
_OUTPUT_DESTS = frozenset({"json_path", "plot", "quiet"})

#: Bound key -> label in the table and the plots.
_BOUND_LABELS = {"unbounded": "unbounded", "pooled_lru": "pooled LRU"}


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``replay`` command's arguments to ``p``."""
    pos = int_at_least(1)
    p.add_argument("trace", metavar="TRACE", help="a trace path, 'default' or 'agentic[:N]'")
    p.add_argument("--policy", default="kvroute", help="comma-separated policy names")
    p.add_argument(
        "--policy-param",
        dest="policy_params",
        action="append",
        default=[],
        type=_assignment,
        metavar="[POLICY.]NAME=VALUE",
        help="a policy constructor parameter, e.g. router_temperature=0.5 (repeatable;"
        " POLICY.NAME sets it for that policy only, a plain NAME for every policy run)",
    )
    p.add_argument("--workers", type=pos, default=8, help="simulated workers (default 8)")
    p.add_argument(
        "--gpu-blocks",
        type=pos,
        default=_DEFAULTS.num_gpu_blocks,
        help=f"KV blocks per worker (default {_DEFAULTS.num_gpu_blocks})",
    )
    p.add_argument("--block-size", type=pos, default=512, help="tokens per KV block (default 512)")
    p.add_argument("--trace-block-size", type=pos, default=512, help="tokens per trace hash id")
    p.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this")
    p.add_argument("--max-num-seqs", type=pos, default=_DEFAULTS.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=pos, default=_DEFAULTS.max_num_batched_tokens)
    p.add_argument("--event-lag", type=float, default=0.0, help="KV event delay, seconds")
    p.add_argument("--event-loss", type=float, default=0.0, help="KV event loss probability")
    p.add_argument("--approximate", action="store_true", help="Router without KV events")
    p.add_argument("--limit", type=pos, default=None, help="first N requests only")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the run's seed: workload generator, policies, event loss (default 0)",
    )
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write a report")
    p.add_argument("--plot", default=None, metavar="DIR", help="directory for PNG plots")
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar or timings on stderr"
    )
    disagg.add_disagg_args(p)
    add_replica_args(p)


def _assignment(text: str) -> tuple[str, str]:
    try:
        return parse_assignment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _policy_params(names: list[str], assignments: list[tuple[str, str]]) -> dict[str, Any]:
    """Each policy's parameters (checked before anything runs)."""
    from ..policies import available_policies, params_by_policy

    registered = [n for n in names if n in available_policies()]
    for key, _ in assignments:  # the simulator's own dispatchers (sim:...) take none
        scope = key.rpartition(".")[0]
        if scope in names and scope not in registered:
            raise ValueError(f"{key}: {scope!r} takes no parameters")
    params: dict[str, Any] = params_by_policy(registered, assignments)
    return {name: params.get(name, {}) for name in names}


def run(a: argparse.Namespace) -> int:
    """Run the ``replay`` command with parsed arguments; returns the exit status.

    :raises CommandError: the trace cannot be read or has no requests, an
        argument is out of range (an unknown policy included), an output
        path cannot be written, or no request fits a worker; the caller
        prints it and exits 2.
    """
    try:
        return _replay(a)
    except KeyError as e:  # an unknown policy name: the message is the key
        raise CommandError(str(e.args[0])) from None
    except BrokenPipeError:  # stdout closed early: the entry point ends quietly
        raise
    except (OSError, TraceError, TypeError, ValueError) as e:
        raise CommandError(str(e)) from None


# -- before any work: arguments and outputs ---------------------------------------------


def _check_file_target(path: str, flag: str) -> None:
    """``path`` can be written as a file: its folder exists and is writable."""
    if os.path.isdir(path):
        raise CommandError(f"{flag} {path}: is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"{flag} {path}: directory {folder} does not exist")
    target = path if os.path.exists(path) else folder
    if not os.access(target, os.W_OK):
        raise CommandError(f"{flag} {path}: no permission to write {target}")


def _check_dir_target(path: str, flag: str) -> None:
    """``path`` is a writable directory, or can be made one in an existing folder."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CommandError(f"{flag} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK):
            raise CommandError(f"{flag} {path}: no permission to write in it")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CommandError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CommandError(f"{flag} {path}: no permission to create it in {parent}")


def _check_outputs(a: argparse.Namespace) -> None:
    if a.json_path:
        _check_file_target(a.json_path, "--json")
    if a.plot:
        _check_dir_target(a.plot, "--plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise CommandError("--plot needs matplotlib: pip install 'kvroute[plot]'")


def _policy_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise CommandError("--policy names no policy")
    twice = sorted({k for k in names if names.count(k) > 1})
    if twice:
        raise CommandError(f"--policy names {', '.join(twice)} more than once")
    return names


def _command(a: argparse.Namespace) -> str:
    """The command with every option that changes the results, defaults included."""
    p = argparse.ArgumentParser(add_help=False)
    configure(p)
    words = ["kvroute", "replay", str(a.trace)]
    for act in p._actions:
        if not act.option_strings or act.dest in _OUTPUT_DESTS:
            continue
        flag, value = act.option_strings[-1], getattr(a, act.dest, None)
        if act.nargs == 0:  # a switch (store_true, or --no-sync's store_false): given or not
            if value == act.const and value != act.default:
                words.append(flag)
            continue
        if value is None:
            continue
        elif isinstance(value, (list, tuple)):
            for v in value:
                words += [flag, str(v)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


# -- the workload ---------------------------------------------------------------------


def _load(a: argparse.Namespace) -> tuple[list[SimRequest], dict[str, Any], dict[str, Any]]:
    """The requests, the workload's parameters and the trace's identity."""
    if not (a.speedup > 0 and a.speedup < float("inf")):
        raise CommandError(f"--speedup must be a finite number > 0, got {a.speedup}")
    if a.trace.startswith("agentic"):
        _, _, k = a.trace.partition(":")
        try:
            acfg = AgenticConfig(sessions=int(k)) if k else AgenticConfig()
        except ValueError:
            raise CommandError(f"TRACE {a.trace}: expected agentic or agentic:SESSIONS") from None
        reqs = agentic_sessions(acfg, block_size=a.block_size, seed=a.seed)
        if a.speedup != 1.0:
            reqs = [dataclasses.replace(r, arrival=r.arrival / a.speedup) for r in reqs]
        if a.limit is not None:
            reqs = reqs[: a.limit]
        workload = {
            "trace": a.trace,
            "generator": "agentic_sessions",
            "agentic": dataclasses.asdict(acfg),
            "seed": a.seed,
            "speedup": a.speedup,
            "limit": a.limit,
        }
        trace = {"name": a.trace, "path": None, "sha256": None}
    else:
        path = None if a.trace == "default" else a.trace
        reqs = load_mooncake(
            path,
            block_size=a.block_size,
            trace_block_size=a.trace_block_size,
            speedup=a.speedup,
            limit=a.limit,
        )
        workload = {
            "trace": a.trace,
            "generator": None,
            "trace_block_size": a.trace_block_size,
            "speedup": a.speedup,
            "limit": a.limit,
        }
        if path is None:
            shown = f"kvroute/data/{DEFAULT_TRACE}"
            with resources.as_file(resources.files("kvroute") / "data" / DEFAULT_TRACE) as f:
                digest = file_sha256(f)
        else:
            shown, digest = path, file_sha256(path)
        trace = {"name": a.trace, "path": shown, "sha256": digest}
    # replicas behind a balancer see a bucket's arrivals one by one, not at one instant
    reqs = spread_arrivals(reqs, a.arrival_jitter, a.seed)
    workload["arrival_jitter_s"] = a.arrival_jitter
    trace["requests"] = len(reqs)
    trace["requests_sha256"] = requests_sha256(reqs)
    return reqs, workload, trace


def _check_fits(reqs: list[SimRequest], cfg: EngineConfig) -> int:
    """How many requests a worker can ever hold; none is an error, said before replaying."""
    need = [cfg.blocks_needed(r.prompt_len, r.output_len) for r in reqs]
    fits = sum(n <= cfg.num_gpu_blocks for n in need)
    if fits == 0:
        raise CommandError(
            f"no request fits one worker's KV cache: the smallest needs {min(need):,} blocks of "
            f"{cfg.block_size} tokens (prompt and output), --gpu-blocks is {cfg.num_gpu_blocks:,}"
        )
    return fits


# -- progress -------------------------------------------------------------------------


@contextmanager
def _progress(label: str, total: int, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr (tqdm: elapsed time, rate, ETA) while the block runs.

    Off (None) when ``enabled`` is false or tqdm is not installed (the
    ``replay`` extra brings it).
    """
    if not enabled:
        yield None
        return
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        yield None
        return
    bar = tqdm(
        total=total, desc=label, unit="req", file=sys.stderr, leave=True, dynamic_ncols=True,
        mininterval=0.25,
    )  # fmt: skip

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


# -- the run --------------------------------------------------------------------------


def _title(a: argparse.Namespace, trace: Mapping[str, Any], cfg: EngineConfig) -> str:
    mode = ", approximate (no KV events)" if a.approximate else ""
    if a.trace == "default":
        name = "Mooncake conversation trace (bundled)"
    elif a.trace.startswith("agentic"):
        name = "agentic sessions"
    else:
        name = os.path.basename(a.trace)
    return (
        f"{name}: {trace['requests']:,} requests on {a.workers} workers x "
        f"{cfg.num_gpu_blocks:,} blocks x {cfg.block_size} tokens, seed {a.seed}{mode}"
    )


def _replay(a: argparse.Namespace) -> int:
    started = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    _check_outputs(a)
    names = _policy_names(a.policy)
    cfg = EngineConfig(
        num_gpu_blocks=a.gpu_blocks,
        block_size=a.block_size,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
    )
    router = RouterConfig(block_size=a.block_size, kv_events=not a.approximate)
    # Parameters set explicitly per policy (--policy-param, checked before the trace
    # loads); an explicit seed wins over --seed's.
    try:
        explicit: dict[str, dict[str, Any]] = _policy_params(names, a.policy_params)
    except ValueError as e:
        raise CommandError(f"--policy-param {e}") from None
    params = {
        k: ({} if k.startswith("sim:") else policy_parameters(k, explicit.get(k), seed=a.seed))
        for k in names
    }  # builds each policy once: an unknown name or a bad parameter fails here
    if a.replicas > 1 and getattr(a, "sync", True) and "kvroute" in params:
        # what synced replicas run with (kvroute.sim.replicas), so the report says it
        params["kvroute"]["tie_break"] = "rendezvous"
    for k in names:
        if k.startswith("sim:") and k != "sim:round_robin":
            raise CommandError(f"unknown simulator dispatcher {k!r}; known: sim:round_robin")
    if not (a.event_lag >= 0 and a.event_lag < float("inf")):
        raise CommandError(f"--event-lag must be a finite number >= 0, got {a.event_lag}")
    if not 0 <= a.event_loss <= 1:
        raise CommandError(f"--event-loss must be in [0, 1], got {a.event_loss}")
    if a.replicas < 1:
        raise CommandError(f"--replicas must be >= 1, got {a.replicas}")
    if not (a.sync_lag >= 0 and a.sync_lag < float("inf")):
        raise CommandError(f"--sync-lag must be a finite number >= 0, got {a.sync_lag}")
    if not (a.arrival_jitter >= 0 and a.arrival_jitter < float("inf")):
        raise CommandError(
            f"--arrival-jitter must be a finite number >= 0, got {a.arrival_jitter}"
        )

    t0 = time.perf_counter()
    reqs, workload, trace = _load(a)
    t_load = time.perf_counter() - t0
    if not reqs:
        raise CommandError(f"trace {a.trace}: no requests to replay")
    fits = _check_fits(reqs, cfg)
    if fits < len(reqs):
        sys.stderr.write(
            f"kvroute replay: warning: {len(reqs) - fits:,} of {len(reqs):,} requests need more "
            f"KV blocks than a worker has (--gpu-blocks {cfg.num_gpu_blocks:,}); every policy "
            "will reject them\n"
        )

    show = not a.quiet and sys.stderr.isatty()
    if a.prefill_workers is not None or a.decode_workers is not None:
        return disagg.main(
            a, reqs, cfg, lambda label, total: _progress(label, total, show), params
        )
    runs: dict[str, ReplayResult] = {}
    for i, name in enumerate(names):
        kw: dict[str, Any] = {"policy_params": params[name]}
        if not router.kv_events:
            kw["kv_events"] = False
        factory = replica_factory(a, name, **kw) or make_dispatcher(name, **kw)
        with _progress(f"{name} ({i + 1}/{len(names)})", len(reqs), show) as bar:
            runs[name] = replay(
                reqs,
                factory,
                num_workers=a.workers,
                config=cfg,
                event_lag=a.event_lag,
                event_loss=a.event_loss,
                seed=a.seed,
                progress=bar,
            )
        if runs[name].summary["completed"] == 0:
            raise CommandError(f"no request completed under policy {name}")
    t0 = time.perf_counter()
    bounds = {
        "unbounded": unbounded_reuse(reqs, a.block_size)["prefix_reuse"],
        "pooled_lru": pooled_lru_reuse(reqs, a.block_size, a.workers * a.gpu_blocks)[
            "prefix_reuse"
        ],
    }
    t_bounds = time.perf_counter() - t0

    results = {k: r.summary for k, r in runs.items()}
    title = _title(a, trace, cfg)
    # the files first: a reader that stops reading the table (`| head`) must not cost them
    if a.plot:
        plot_replay = importlib.import_module("kvroute.sim.plots").plot_replay
        plot_replay(a.plot, runs, bounds, note=title)
    if a.json_path:
        walls = {"total": time.perf_counter() - t_start, "load": t_load, "bounds": t_bounds}
        doc = _report(a, cfg, router, params, workload, trace, runs, bounds, started, walls)
        with open(a.json_path, "w", encoding="utf-8") as f:
            f.write(dumps_report(doc))
    print(format_table(results, bounds, title=title, bound_labels=_BOUND_LABELS))
    for line in rejected_notes(results):
        print(f"note: {line}")
    print()
    print(TABLE_LEGEND)
    sys.stdout.flush()
    if not a.quiet:
        each = ", ".join(f"{k} {r.wall_s:.1f} s" for k, r in runs.items())
        sys.stderr.write(
            f"kvroute replay: {time.perf_counter() - t_start:.1f} s wall (trace {t_load:.1f} s, "
            f"{each}, bounds {t_bounds:.1f} s)\n"
        )
    return 0


def _report(
    a: argparse.Namespace,
    cfg: EngineConfig,
    router: RouterConfig,
    params: Mapping[str, Mapping[str, Any]],
    workload: Mapping[str, Any],
    trace: Mapping[str, Any],
    runs: Mapping[str, ReplayResult],
    bounds: Mapping[str, float],
    started: datetime,
    walls: Mapping[str, float],
) -> dict[str, Any]:
    """The JSON report, in its schema's order (:mod:`kvroute.sim.report`)."""
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "kvroute_version": __version__,
        "command": _command(a),
        "seed": a.seed,
        "parameters": {
            "workload": dict(workload),
            "fleet": {"workers": a.workers, **replica_settings(a)},
            "engine": dataclasses.asdict(cfg),
            "router": dataclasses.asdict(router),
            "events": {
                "lag_s": a.event_lag,
                "loss": a.event_loss,
                "loss_seed": derive_seed(a.seed, "event_loss"),
            },
            "policies": {k: dict(v) for k, v in params.items()},
        },
        "trace": dict(trace),
        "results": {"policies": {k: r.summary for k, r in runs.items()}, "bounds": dict(bounds)},
        RUN_FACTS: {
            "started_utc": started.isoformat(timespec="seconds"),
            "argv": ["kvroute", *(getattr(a, "argv", None) or sys.argv[1:])],
            "wall_s": {**walls, "policies": {k: r.wall_s for k, r in runs.items()}},
            "python": platform.python_version(),
            "platform": platform.platform(),
            "compiled_cores": USE_EXTENSIONS,
        },
    }
