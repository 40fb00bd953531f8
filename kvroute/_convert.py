"""Input validation shared by the compiled cores and their twins.

Both implementations of each core call these for everything but their
zero-copy fast path (a contiguous numpy array of the right dtype), so the two
raise the same exception with the same message for the same bad input. The
rules follow C's typed arguments: a value that is not an integer raises
``TypeError``; an integer outside the type's range raises ``OverflowError``.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Iterable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "TIERS",
    "U32_MAX",
    "U64_MAX",
    "as_u32_tokens",
    "as_u64_array",
    "check_u64",
    "tier_index",
]

#: Tiers a block can live in, fastest first. A block held in several tiers
#: counts, when matching, as held in the fastest of them.
TIERS: Final = ("device", "host", "disk")

U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1


def check_u64(value: object, what: str) -> int:
    """Return ``value`` as a Python int in [0, 2**64), or raise like a C ``uint64_t``.

    >>> check_u64(7, "worker")
    7
    >>> check_u64(-1, "worker")
    Traceback (most recent call last):
    ...
    OverflowError: worker -1 is outside the uint64 range [0, 2**64)

    :raises TypeError: ``value`` is not an integer (floats and strings included).
    :raises OverflowError: ``value`` is negative or >= 2**64.
    """
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None
    if v < 0 or v > U64_MAX:
        raise OverflowError(f"{what} {v} is outside the uint64 range [0, 2**64)")
    return v


def optional_str(value: object, what: str) -> str | None:
    """Return ``value`` if it is a ``str`` or ``None``, or raise naming ``what``.

    >>> optional_str(None, "lora_name") is None
    True

    :raises TypeError: ``value`` is neither.
    """
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{what} must be a str or None, not {type(value).__name__}")


def tier_index(tier: object) -> int:
    """Return the position of ``tier`` in :data:`TIERS`.

    :raises ValueError: ``tier`` is not one of ``"device"``, ``"host"``, ``"disk"``.
    """
    if isinstance(tier, str):
        try:
            return TIERS.index(tier)
        except ValueError:
            pass
    raise ValueError(f"unknown tier {tier!r}; expected one of 'device', 'host', 'disk'")


def as_u64_array(values: object, what: str = "hashes") -> npt.NDArray[np.uint64]:
    """Return ``values`` as a contiguous one-dimensional numpy uint64 array.

    Accepts a numpy array of any integer dtype, any buffer of unsigned 64-bit
    items (``array('Q')``, a memoryview of one), or an iterable of ints.

    Runtime complexity: O(n); zero-copy for a contiguous uint64 array or buffer.

    :raises TypeError: ``values`` is not a sequence of integers (a ``str``,
        ``bytes``, a float array, or an item that is not an int).
    :raises OverflowError: a value is negative or does not fit in 64 bits.
    :raises ValueError: an array is not one-dimensional.
    """
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional, got shape {values.shape}")
        if values.dtype == np.uint64:
            return np.ascontiguousarray(values)
        if values.dtype.kind == "u" or values.dtype == np.bool_:
            return values.astype(np.uint64)
        if values.dtype.kind == "i":
            if values.size and int(values.min()) < 0:
                raise OverflowError(
                    f"{what} item {int(values.min())} is outside the uint64 range [0, 2**64)"
                )
            return values.astype(np.uint64)
        raise TypeError(f"{what} must hold integers, not {values.dtype}")
    view = memoryview(values) if isinstance(values, (array, memoryview)) else None
    if view is not None and view.format in ("Q", "L") and view.itemsize == 8 and view.ndim == 1:
        return np.ascontiguousarray(view, dtype=np.uint64)  # no copy when contiguous
    if isinstance(values, (str, bytes, bytearray, memoryview)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a sequence of integers, not {type(values).__name__}")
    items = [check_u64(v, f"{what} item") for v in values]
    return np.array(items, dtype=np.uint64)


def _u32_from_ndarray(values: npt.NDArray[Any], what: str) -> npt.NDArray[np.uint32]:
    """Convert a one-dimensional integer ndarray to native uint32, checking the range."""
    if values.dtype == np.uint32:
        return np.ascontiguousarray(values)
    kind = values.dtype.kind
    if kind not in "uib":
        raise TypeError(f"{what} must hold integers, not {values.dtype}")
    # bool and unsigned dtypes of up to 32 bits always fit
    checked = kind != "b" and not (kind == "u" and values.dtype.itemsize <= 4)
    if checked and values.size and (int(values.min()) < 0 or int(values.max()) > U32_MAX):
        index = int(np.argmax((values < 0) | (values > U32_MAX)))
        raise OverflowError(
            f"{what} item {int(values[index])} at index {index} "
            "is outside the uint32 range [0, 2**32)"
        )
    return values.astype(np.uint32)


def as_u32_tokens(tokens: object, what: str = "tokens") -> npt.NDArray[np.uint32]:
    """Return token ids as a contiguous one-dimensional numpy uint32 array.

    Accepts a numpy array of any integer dtype, a buffer of integers
    (``array('I')``, ``array('L')``, a memoryview of one...), or an iterable of
    ints (a list, a tuple, a ``range``...). The first bad item is the one
    reported, whichever of these paths the input takes.

    >>> as_u32_tokens([1, 2, 3])
    array([1, 2, 3], dtype=uint32)
    >>> as_u32_tokens([7, -1])
    Traceback (most recent call last):
    ...
    OverflowError: tokens item -1 at index 1 is outside the uint32 range [0, 2**32)

    Runtime complexity: O(n); zero-copy for a contiguous native uint32 array
    or an ``array('I')``.

    :param tokens: the token ids.
    :param what: the name used in error messages.
    :returns: a contiguous array of dtype ``uint32`` (native byte order).
    :raises TypeError: ``tokens`` is not a sequence of integers (a ``str``,
        ``bytes``, a float array, or an item that is not an int).
    :raises OverflowError: a token id is negative or does not fit in 32 bits.
    :raises ValueError: an array is not one-dimensional.
    """
    if isinstance(tokens, (array, memoryview)):
        # numpy reads every buffer format (array typecodes, '<I', '>q'...); a
        # non-integer one is refused below by its dtype
        tokens = np.asarray(tokens)
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional, got shape {tokens.shape}")
        return _u32_from_ndarray(tokens, what)
    if isinstance(tokens, (str, bytes, bytearray, memoryview)) or not isinstance(tokens, Iterable):
        raise TypeError(f"{what} must be a sequence of integers, not {type(tokens).__name__}")
    items = tokens if isinstance(tokens, (list, tuple)) else list(tokens)
    if not items:
        return np.empty(0, dtype=np.uint32)
    try:
        # One C-level pass for the common case of plain ints; anything odd
        # (floats, huge ints, nested lists) falls through to the item check.
        arr = np.array(items)
    except (TypeError, ValueError, OverflowError):
        arr = None
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "iu":
        return _u32_from_ndarray(arr, what)
    out = np.empty(len(items), dtype=np.uint32)
    for i, item in enumerate(items):
        try:
            v = operator.index(item)
        except TypeError:
            raise TypeError(
                f"{what} item at index {i} must be an integer, not {type(item).__name__}"
            ) from None
        if v < 0 or v > U32_MAX:
            raise OverflowError(
                f"{what} item {v} at index {i} is outside the uint32 range [0, 2**32)"
            )
        out[i] = v
    return out
