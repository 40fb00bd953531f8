"""What every ``kvroute`` subcommand shares: exit codes, the user-facing error, argument checks.

Exit status: 0 success; 1 the command ran but a check failed (for ``bench``:
kvroute and Dynamo disagreed on a query, or the index does not hold what the
engine models hold); 2 bad usage or input (unknown option, unreadable or
malformed trace, missing optional dependency); 130 interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Final

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "int_at_least",
]

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


class CommandError(Exception):
    """A user-facing error: printed as ``kvroute CMD: error: MESSAGE``, exit status 2."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``; underscores allowed (10_000_000).

    >>> int_at_least(1)("10_000")
    10000
    >>> int_at_least(1)("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be >= 1, got 0

    :param low: the smallest value accepted.
    :returns: the parser of one argument.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse
