"""The ``kvroute`` command line: ``kvroute SUBCOMMAND ...`` or ``python -m kvroute ...``.

Subcommands are registered in :data:`COMMANDS`: each has a name, a one-line
help, a function that adds its arguments to its parser and a function that
runs it and returns the exit status. Adding ``replay`` or ``proxy`` means
adding one entry; the entry point, error handling and exit codes are shared.

Exit status: 0 success; 1 the command ran but a check failed (for ``bench``:
kvroute and Dynamo disagreed on a query, or the index does not hold what the
engine models hold); 2 bad usage or input (unknown option, unreadable or
malformed trace, missing optional dependency); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from . import __version__
from .proxy import cli as proxy_cli
from .sim.replay import DESCRIPTION as REPLAY_DESCRIPTION
from .sim.replay import configure as configure_replay
from .sim.replay import run as run_replay
from .traces import TraceError

__all__ = ["COMMANDS", "Command", "CommandError", "main"]

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

#: Workloads of ``kvroute bench``, in report order.
WORKLOADS: Final = ("mooncake", "synthetic", "miss-heavy")


class CommandError(Exception):
    """A user-facing error: printed as ``kvroute CMD: error: MESSAGE``, exit status 2."""


@dataclass(frozen=True)
class Command:
    """One subcommand.

    :param name: what the user types.
    :param help: one line for ``kvroute --help``.
    :param description: the subcommand's ``--help`` text.
    :param configure: adds the subcommand's arguments to its parser.
    :param run: runs it with the parsed arguments; returns the exit status.
    :param epilog: text after the options in its ``--help`` (examples, exit status).
    """

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str | None = None


# -- argument types -------------------------------------------------------


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``; underscores allowed (10_000_000)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


# -- bench ----------------------------------------------------------------

_BENCH_DESCRIPTION = """\
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

_BENCH_EPILOG = """\
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


def _configure_bench(p: argparse.ArgumentParser) -> None:
    """Add ``bench``'s arguments."""
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
        type=_int_at_least(1),
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
        type=_int_at_least(0),
        metavar="N",
        help="fill an index to N (block, worker) residencies for the memory figures;"
        f" 0 skips them (default: {_COMPILED_RESIDENCIES:,}; {_TWIN_RESIDENCIES:,}"
        " with the pure-Python index)",
    )
    what.add_argument(
        "--churn-rounds",
        type=_int_at_least(0),
        default=5,
        metavar="N",
        help="store-and-remove rounds after the memory fill (default: 5)",
    )
    fleet = p.add_argument_group("fleet model")
    fleet.add_argument(
        "--workers",
        type=_int_at_least(1),
        metavar="N",
        help="mock engines (default: 16; 256 for 'synthetic')",
    )
    fleet.add_argument(
        "--capacity",
        type=_int_at_least(1),
        metavar="BLOCKS",
        help="prefix-cache blocks per engine (default: 16,384; 2,048 for 'synthetic')",
    )
    fleet.add_argument(
        "--blocks-per-hash",
        type=_int_at_least(1),
        default=16,
        metavar="N",
        help="blocks each trace hash_id expands to (default: 16)",
    )
    fleet.add_argument(
        "--seed",
        type=_int_at_least(0),
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
        type=_int_at_least(1),
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
        from ._index_py import BlockIndex as Py

        cls: type = Py
    elif choice == "compiled":
        try:
            from ._index import BlockIndex as C
        except ImportError as e:
            raise CommandError(
                f"the compiled index is not built ({e}); build it with"
                " `pip install --no-build-isolation -e .` or use --index python"
            ) from None
        cls = C
    else:
        from . import BlockIndex

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


def _run_bench(args: argparse.Namespace) -> int:
    """Run ``kvroute bench``; see its --help."""
    from . import bench, traces

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
        params: dict[str, Any] = {}
        log(f"building the {name} op stream...")
        if name == "mooncake":
            try:
                rows = traces.load_trace(args.trace, limit=n)
            except (OSError, traces.TraceError) as e:
                raise CommandError(f"cannot read the trace: {e}") from None
            if not rows:
                raise CommandError(f"the trace {args.trace or '(bundled)'} has no requests")
            requests: list[Sequence[int]] = [r.hash_ids for r in rows]
            params["trace"] = args.trace or f"<bundled {traces.DEFAULT_TRACE}>"
        elif name == "synthetic":
            requests = list(bench.synthetic_requests(n if n is not None else 10_000))
        else:
            requests = list(bench.miss_heavy_requests(n if n is not None else 10_000))
        stream = bench.build_stream(
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
        result = bench.bench_workload(
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
            mem = bench.measure_memory(
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
    report["maxrss_bytes"] = bench.maxrss_bytes()
    report["notes"] = notes
    report["checks_failed"] = failed
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(bench.dumps(report) + "\n")
        except OSError as e:
            raise CommandError(f"--json: cannot write {args.json}: {e}") from None
    if not args.quiet:
        print(bench.render_report(report), flush=True)
    for msg in failed:
        print(f"kvroute bench: check failed: {msg}", file=sys.stderr)
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _run_replay(args: argparse.Namespace) -> int:
    try:
        return run_replay(args)
    except KeyError as e:  # an unknown policy name: the message is the key
        raise CommandError(str(e.args[0])) from None
    except (OSError, TraceError, ValueError) as e:
        raise CommandError(str(e)) from None


def _run_proxy(args: argparse.Namespace) -> int:
    try:
        return proxy_cli.run(args)
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        raise CommandError(str(e)) from None


#: Every subcommand, in ``--help`` order.
COMMANDS: Final[tuple[Command, ...]] = (
    Command(
        "bench",
        "measure the block index: block ops/s on trace replays, bytes per residency",
        _BENCH_DESCRIPTION,
        _configure_bench,
        _run_bench,
        _BENCH_EPILOG,
    ),
    Command(
        "replay",
        "simulate a fleet on a trace: prefix reuse and latency per routing policy",
        REPLAY_DESCRIPTION,
        configure_replay,
        _run_replay,
        "example: kvroute replay default --policy round_robin,kv_cost,kvroute --workers 8 "
        "--gpu-blocks 2048 --block-size 512",
    ),
    Command(
        "proxy",
        "serve an OpenAI/Anthropic-compatible routing proxy in front of vLLM/SGLang workers",
        proxy_cli.DESCRIPTION,
        proxy_cli.configure,
        _run_proxy,
        proxy_cli.EPILOG,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``kvroute`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="kvroute",
        description="KV-cache-aware request routing for vLLM / SGLang fleets.",
    )
    parser.add_argument("--version", action="version", version=f"kvroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description,
            epilog=cmd.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.configure(p)
        p.set_defaults(_run=cmd.run, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvroute`` command line; returns the exit status.

    :param argv: the arguments after the program name (default: ``sys.argv[1:]``).
    :returns: 0 ok, 1 a check failed, 2 bad usage or input, 130 interrupted.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Bad arguments exit 2 with a usage message. Unknown options are reported
    # by the subcommand's parser, whose usage line is the helpful one.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    try:
        status: int = args._run(args)
    except CommandError as e:
        print(f"kvroute {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"kvroute {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (`| head`): nothing left to say, and say it quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return status


if __name__ == "__main__":
    sys.exit(main())
