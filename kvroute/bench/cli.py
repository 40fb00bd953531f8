"""The ``kvroute bench`` command: trace replays through the index, side by side with Dynamo.

See :mod:`kvroute.bench` for the method and ``kvroute bench --help`` for the
options; docs/benchmarks.md has the figures and how they were measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from .. import __version__, traces
from .._cli import EXIT_CHECK_FAILED, EXIT_OK, CommandError, int_at_least
from . import memory, streams, timing
from .report import dumps, render_report

__all__ = ["DESCRIPTION", "EPILOG", "WORKLOADS", "configure", "run"]

#: Workloads of ``kvroute bench``, in report order.
WORKLOADS: Final = ("mooncake", "synthetic", "miss-heavy")

DESCRIPTION = """\
Replay request traces through kvroute's BlockIndex the way Dynamo's
mooncake_bench does, single-threaded through the public Python API, and
report block ops/s and memory.

Each trace hash_id becomes --blocks-per-hash blocks; requests go to
--workers mock engines (uniformly at random, fixed seed), each with an LRU
prefix cache of --capacity blocks that frees a finished request's blocks
tail first, as vLLM does. Every request yields one match over all its
blocks, then the engine's removed and stored events. The op stream is built
before timing starts.

block ops/s is Dynamo's definition: (query blocks + stored blocks) per
second; '+removed' also counts removed blocks. Workloads: 'mooncake' (the
bundled Mooncake FAST'25 conversation trace, or --trace), 'synthetic'
(random prefix trees over 256 workers) and 'miss-heavy' (mostly unique
prompts). The memory section fills an index with --residencies (block,
worker) pairs and reports bytes per residency and sizeof() under churn.
"""

EPILOG = """\
examples:
  python -m kvroute bench                      # every workload + memory
  python -m kvroute bench --compare            # side by side with Dynamo's RadixTree
  python -m kvroute bench --workload mooncake --trace my.jsonl.gz --json out.json
  python -m kvroute bench --residencies 10_000_000 --workload mooncake

exit status: 0 ok, 1 a check failed (Dynamo disagreed, index state wrong),
2 bad usage or input, 130 interrupted.
"""

# Per-workload defaults: (workers, requests or None for the whole trace,
# blocks per engine). The synthetic fleet is many small engines, so that its
# stream evicts too.
_WORKLOAD_DEFAULTS: Final = {
    "mooncake": (16, None, 16_384),
    "synthetic": (256, 10_000, 2_048),
    "miss-heavy": (16, 10_000, 16_384),
}
_TWIN_RESIDENCIES: Final = 200_000
_TWIN_REQUESTS: Final = 1_000
_COMPILED_RESIDENCIES: Final = 10_000_000


def configure(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` command's arguments to ``p``."""
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--workload",
        action="append",
        choices=WORKLOADS,
        metavar="NAME",
        help="run only this workload: mooncake, synthetic or miss-heavy"
        " (repeatable; default: all three)",
    )
    what.add_argument(
        "--trace",
        metavar="PATH",
        help="Mooncake-format .jsonl or .jsonl.gz for the 'mooncake' workload"
        " (default: the bundled conversation trace)",
    )
    what.add_argument(
        "--requests",
        type=int_at_least(1),
        metavar="N",
        help="use only the first N requests of each workload (default: the whole trace;"
        f" 10,000 for the generated ones; {_TWIN_REQUESTS:,} with the pure-Python index)",
    )
    what.add_argument(
        "--compare",
        action="store_true",
        help="replay the same op stream through Dynamo's RadixTree too, side by side,"
        " and check every query's scores against kvroute's (needs the 'compare' extra)",
    )
    what.add_argument(
        "--residencies",
        type=int_at_least(0),
        metavar="N",
        help="fill an index to N (block, worker) residencies for the memory figures;"
        f" 0 skips them (default: {_COMPILED_RESIDENCIES:,}; {_TWIN_RESIDENCIES:,}"
        " with the pure-Python index)",
    )
    what.add_argument(
        "--churn-rounds",
        type=int_at_least(0),
        default=5,
        metavar="N",
        help="store-and-remove rounds after the memory fill (default: 5)",
    )
    fleet = p.add_argument_group("fleet model")
    fleet.add_argument(
        "--workers",
        type=int_at_least(1),
        metavar="N",
        help="mock engines (default: 16; 256 for 'synthetic')",
    )
    fleet.add_argument(
        "--capacity",
        type=int_at_least(1),
        metavar="BLOCKS",
        help="prefix-cache blocks per engine (default: 16,384; 2,048 for 'synthetic')",
    )
    fleet.add_argument(
        "--blocks-per-hash",
        type=int_at_least(1),
        default=16,
        metavar="N",
        help="blocks each trace hash_id expands to (default: 16)",
    )
    fleet.add_argument(
        "--seed",
        type=int_at_least(0),
        default=42,
        metavar="N",
        help="seed of the worker assignment and the memory fill (default: 42)",
    )
    fleet.add_argument(
        "--engine-hashes",
        action="store_true",
        help="store with distinct engine hashes and remove by them (engine=True),"
        " as an index fed by real engine events does",
    )
    how = p.add_argument_group("measurement and output")
    how.add_argument(
        "--index",
        choices=("auto", "compiled", "python"),
        default="auto",
        help="which BlockIndex: the public one (compiled if built), or force one (default: auto)",
    )
    how.add_argument(
        "--repeat",
        type=int_at_least(1),
        metavar="N",
        help="timed rounds per workload, medians reported (default: 3; 1 with the"
        " pure-Python index)",
    )
    how.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    how.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing but errors (use with --json)",
    )


def _index_factory(choice: str) -> tuple[type, str, str]:
    """The BlockIndex class for ``--index``, its implementation name and module."""
    if choice == "python":
        from .._index_py import BlockIndex as Py

        cls: type = Py
    elif choice == "compiled":
        try:
            from .._index import BlockIndex as C
        except ImportError as e:
            raise CommandError(
                f"the compiled index is not built ({e}); build it with"
                " `pip install --no-build-isolation -e .` or use --index python"
            ) from None
        cls = C
    else:
        from .. import BlockIndex

        cls = BlockIndex
    module = cls.__module__
    return cls, ("python" if module.endswith("_py") else "compiled"), module


def _dynamo_tree() -> tuple[Callable[[], Any], str]:
    """Dynamo's RadixTree class and its version, or a CommandError naming the extra."""
    try:
        from dynamo._core import RadixTree
    except ImportError as e:
        raise CommandError(
            f"--compare needs Dynamo's RadixTree, which is not importable ({e});"
            " install the 'compare' extra: pip install -e '.[compare]'"
        ) from None
    from importlib import metadata

    try:
        version = metadata.version("ai-dynamo-runtime")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return RadixTree, version


def _requests(
    name: str, n: int | None, trace: str | None
) -> tuple[list[Sequence[int]], dict[str, Any]]:
    """The hash_ids of workload ``name``'s first ``n`` requests, and parameters to report.

    :raises CommandError: the trace cannot be read, or has no requests.
    """
    if name == "mooncake":
        try:
            rows = traces.load_trace(trace, limit=n)
        except (OSError, traces.TraceError) as e:
            raise CommandError(f"cannot read the trace: {e}") from None
        if not rows:
            raise CommandError(f"the trace {trace or '(bundled)'} has no requests")
        return [r.hash_ids for r in rows], {"trace": trace or f"<bundled {traces.DEFAULT_TRACE}>"}
    make = streams.synthetic_requests if name == "synthetic" else streams.miss_heavy_requests
    return list(make(n if n is not None else 10_000)), {}


def run(args: argparse.Namespace) -> int:
    """Run ``kvroute bench`` with parsed arguments; returns the exit status.

    :raises CommandError: bad input (unreadable trace, unwritable ``--json``,
        a missing extra); the caller prints it and exits 2.
    """

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    cls, implementation, module = _index_factory(args.index)
    tree_factory, dynamo_version = _dynamo_tree() if args.compare else (None, None)
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise CommandError(f"--json: directory {parent} does not exist")
    twin = implementation == "python"
    notes: list[str] = []
    repeat = args.repeat if args.repeat is not None else (1 if twin else 3)
    residencies = args.residencies
    if residencies is None:
        residencies = _TWIN_RESIDENCIES if twin else _COMPILED_RESIDENCIES
    twin_requests = None
    if twin and args.requests is None:
        # The reference twin is ~30x slower, and its match is O(workers) per
        # block in Python: the synthetic workload alone would take minutes.
        twin_requests = _TWIN_REQUESTS
    if twin and (args.residencies is None or args.requests is None or args.repeat is None):
        notes.append(
            "the pure-Python index is in use: unless given, --requests defaults to"
            f" {_TWIN_REQUESTS:,}, --residencies to {_TWIN_RESIDENCIES:,} and --repeat to 1"
        )
    workloads = list(dict.fromkeys(args.workload or WORKLOADS))

    report: dict[str, Any] = {
        "kvroute_version": __version__,
        "index": {"implementation": implementation, "module": module},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "command": ["kvroute", *args.argv],
    }
    if dynamo_version is not None:
        report["dynamo_version"] = dynamo_version
    report["workloads"] = {}
    failed: list[str] = []
    for name in workloads:
        default_workers, default_requests, default_capacity = _WORKLOAD_DEFAULTS[name]
        workers = args.workers or default_workers
        capacity = args.capacity or default_capacity
        if capacity < args.blocks_per_hash:
            raise CommandError(
                f"--capacity ({capacity}) must be at least --blocks-per-hash"
                f" ({args.blocks_per_hash}): an engine must hold one hash_id"
            )
        n = args.requests if args.requests is not None else twin_requests or default_requests
        log(f"building the {name} op stream...")
        requests, params = _requests(name, n, args.trace)
        stream = streams.build_stream(
            requests,
            name=name,
            workers=workers,
            capacity=capacity,
            blocks_per_hash=args.blocks_per_hash,
            seed=args.seed,
            engine_hashes=args.engine_hashes,
            params=params,
        )
        del requests
        log(
            f"  {stream.match_ops:,} matches, {stream.store_ops:,} stores,"
            f" {stream.remove_ops:,} removes in {stream.build_seconds:.1f} s"
        )
        result = timing.bench_workload(
            stream, cls, repeat=repeat, tree_factory=tree_factory, log=log
        )
        report["workloads"][name] = result
        if not result["state_ok"]:
            failed.append(f"{name}: the index does not hold what the engine models hold")
        if "compare" in result and result["compare"]["mismatches"]:
            c = result["compare"]
            failed.append(
                f"{name}: kvroute and Dynamo disagree on {c['mismatches']} of"
                f" {c['queries_checked']} queries: " + "; ".join(c["mismatch_examples"])
            )
        del stream
    if workloads:
        head = workloads[0]
        report["headline_workload"] = head
        report["block_ops_per_s"] = report["workloads"][head]["block_ops_per_s"]
    if residencies:
        report["memory"] = {}
        modes = [False, True]
        if twin and not args.engine_hashes:
            # The twin resolves a removal by kvroute key by scanning the worker's
            # handles, so engine-hash churn is quadratic there.
            modes = [False]
            notes.append("memory with engine hashes skipped for the pure-Python index")
        for engine in modes:
            label = "engine hashes" if engine else "kvroute keys"
            log(f"memory: filling {residencies:,} residencies ({label})...")
            mem = memory.measure_memory(
                cls,
                residencies,
                seed=args.seed,
                engine_hashes=engine,
                churn_rounds=args.churn_rounds,
            )
            report["memory"][label] = mem.as_dict()
            if not mem.churn_state_ok:
                failed.append(f"memory ({label}): churn did not restore the index's contents")
        report["bytes_per_residency"] = report["memory"]["kvroute keys"]["bytes_per_residency"]
    report["maxrss_bytes"] = memory.maxrss_bytes()
    report["notes"] = notes
    report["checks_failed"] = failed
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(dumps(report) + "\n")
        except OSError as e:
            raise CommandError(f"--json: cannot write {args.json}: {e}") from None
    if not args.quiet:
        print(render_report(report), flush=True)
    for msg in failed:
        print(f"kvroute bench: check failed: {msg}", file=sys.stderr)
    return EXIT_CHECK_FAILED if failed else EXIT_OK
