"""The ``kvroute`` command line: ``kvroute SUBCOMMAND ...`` or ``python -m kvroute ...``.

This module only dispatches. Subcommands are registered in :data:`COMMANDS`:
each has a name, a one-line help, a function that adds its arguments to its
parser and a function that runs it and returns the exit status; each lives
beside what it runs (:mod:`kvroute.bench.cli`, :mod:`kvroute.sim.cli`,
:mod:`kvroute.proxy.cli`, :mod:`kvroute.testing.cli`). Adding a command means
adding one entry; the entry point, error handling and exit codes (:mod:`kvroute._cli`) are shared.

Exit status: 0 success; 1 the command ran but a check failed (for ``bench``:
kvroute and Dynamo disagreed on a query, or the index does not hold what the
engine models hold); 2 bad usage or input (unknown option, unreadable or
malformed trace, missing optional dependency); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from . import __version__
from ._cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CommandError
from .bench import cli as bench_cli
from .proxy import cli as proxy_cli
from .sim import cli as sim_cli
from .testing import cli as testing_cli

__all__ = ["COMMANDS", "Command", "CommandError", "main"]


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


def _run_proxy(args: argparse.Namespace) -> int:
    """Run ``kvroute proxy``: its startup errors (a bad value, a port in use) are the user's."""
    try:
        return proxy_cli.run(args)
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        raise CommandError(str(e)) from None


def _run_mock_worker(args: argparse.Namespace) -> int:
    """Run ``kvroute mock-worker``: a port in use or a missing extra is the user's to fix."""
    try:
        return testing_cli.run(args)
    except (ImportError, OSError, ValueError) as e:
        raise CommandError(str(e)) from None


#: Every subcommand, in ``--help`` order.
COMMANDS: Final[tuple[Command, ...]] = (
    Command(
        "bench",
        "measure the block index: block ops/s on trace replays, bytes per residency",
        bench_cli.DESCRIPTION,
        bench_cli.configure,
        bench_cli.run,
        bench_cli.EPILOG,
    ),
    Command(
        "replay",
        "simulate a fleet on a trace: prefix reuse and latency per routing policy",
        sim_cli.DESCRIPTION,
        sim_cli.configure,
        sim_cli.run,
        sim_cli.EPILOG,
    ),
    Command(
        "proxy",
        "serve an OpenAI/Anthropic-compatible routing proxy in front of vLLM/SGLang workers",
        proxy_cli.DESCRIPTION,
        proxy_cli.configure,
        _run_proxy,
        proxy_cli.EPILOG,
    ),
    Command(
        "mock-worker",
        "serve a GPU-free vLLM stand-in (HTTP + KV events) on this machine, for trying kvroute",
        testing_cli.DESCRIPTION,
        testing_cli.configure,
        _run_mock_worker,
        testing_cli.EPILOG,
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
