"""Reference twin of the compiled block hasher: the ``xxhash`` package and loops.

This module is the specification. ``kvroute/_hashing.pyx`` must behave exactly
like it: same names, same ``inspect.signature`` parameter names, same results
and the same exceptions for the same input. It is written naively on purpose
(the ``xxhash`` package's XXH3 and a Python loop, where the compiled module has
its own XXH3 written from the xxHash specification) so that the two share as
few bugs as possible; the test-suite runs every hashing test against both.

Model
-----
A *block hash* is ``XXH3_64(tokens of one block as u32 little-endian, seed)``:
Dynamo's ``LocalBlockHash``, which does not depend on the blocks before it.

A *sequence hash* chains block hashes so that a key names its whole prefix:
``s_0 = b_0`` and ``s_i = XXH3_64(le64(s_{i-1}) || le64(b_i), seed=1337)``, as
``compute_seq_hash_for_block`` in Dynamo's kv-router protocols. Continuing from
a known ``parent`` key ``p`` gives ``s_0 = XXH3_64(le64(p) || le64(b_0), 1337)``.
The chain seed is always :data:`XXH3_SEED`, whatever seed the blocks used.
"""

from __future__ import annotations

import json
import operator
import re
from array import array
from collections.abc import Iterable
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import xxhash

from ._convert import U32_MAX, as_u32_tokens, as_u64_array, check_u64

__all__ = [
    "XXH3_SEED",
    "HashesLike",
    "TokensLike",
    "block_hashes",
    "chained_block_hashes",
    "check_block_size",
    "sequence_hashes",
    "token_ids_array",
    "xxh3_64",
]

#: Dynamo's XXH3 seed (``XXH3_SEED`` in its kv-router): the block-hash seed when
#: no LoRA or namespace salts it, and always the seed of the sequence-hash chain.
XXH3_SEED: Final = 1337

#: Anything that can be read as a sequence of uint32 token ids.
TokensLike: TypeAlias = "npt.NDArray[np.integer[Any]] | array[int] | Iterable[int]"

#: Anything that can be read as a sequence of uint64 hashes.
HashesLike: TypeAlias = "npt.NDArray[np.uint64] | array[int] | Iterable[int]"


def check_block_size(block_size: object, what: str = "block_size") -> int:
    """Return ``block_size`` as an int in [1, 2**32), or raise naming the problem.

    >>> check_block_size(16)
    16
    >>> check_block_size(0)
    Traceback (most recent call last):
    ...
    ValueError: block_size must be positive, got 0

    :param block_size: tokens per block (or per page).
    :param what: the name used in error messages.
    :returns: ``block_size`` as a Python int.
    :raises TypeError: ``block_size`` is not an integer (a float or a str, say).
    :raises ValueError: ``block_size`` is zero or negative.
    :raises OverflowError: ``block_size`` does not fit in 32 bits, like Dynamo's
        ``u32`` block size.
    """
    try:
        size = operator.index(block_size)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(block_size).__name__}") from None
    if size <= 0:
        raise ValueError(f"{what} must be positive, got {size}")
    if size > U32_MAX:
        raise OverflowError(f"{what} {size} is outside the uint32 range [1, 2**32)")
    return size


def xxh3_64(data: object, seed: int = 0) -> int:
    """Return XXH3-64 of a bytes-like object with a 64-bit seed.

    >>> xxh3_64(b"")
    3244421341483603138
    >>> xxh3_64(b"abc", seed=1337) == xxh3_64(b"abc", 1337)
    True

    Runtime complexity: O(len(data)).

    :param data: any C-contiguous buffer (``bytes``, ``bytearray``, a numpy
        array...); its raw bytes are hashed.
    :param seed: the XXH3 seed, in [0, 2**64).
    :returns: the 64-bit hash as a Python int.
    :raises TypeError: ``data`` is not a buffer (a ``str``, say), or ``seed`` is
        not an integer.
    :raises OverflowError: ``seed`` is outside [0, 2**64).
    """
    view = memoryview(data).cast("B")  # type: ignore[arg-type]
    s = check_u64(seed, "seed")
    return int(xxhash.xxh3_64_intdigest(view, s))


def _le_bytes(tokens: npt.NDArray[np.uint32]) -> bytes:
    """Token ids as the byte string Dynamo hashes: each id as u32 little-endian."""
    return tokens.astype("<u4").tobytes()


def block_hashes(
    tokens: TokensLike, block_size: int, seed: int = XXH3_SEED, eagle: bool = False
) -> npt.NDArray[np.uint64]:
    """Return XXH3-64 of every full block of ``tokens`` (Dynamo's block hashes).

    Each hash covers one block's token ids as u32 little-endian. A trailing
    partial block is not hashed. With ``eagle``, each hash instead covers a
    window of ``block_size + 1`` tokens and windows start every ``block_size``
    tokens (Dynamo's ``is_eagle``), so a block is hashed only once the token
    after it is known.

    >>> block_hashes([1, 2, 3, 4, 5], 2).size
    2

    Runtime complexity: O(len(tokens)).

    :param tokens: token ids (see :func:`kvroute._convert.as_u32_tokens`).
    :param block_size: tokens per block.
    :param seed: the XXH3 seed of every block, in [0, 2**64).
    :param eagle: hash overlapping windows of ``block_size + 1`` tokens.
    :returns: one uint64 per block.
    :raises TypeError: bad token or argument types.
    :raises OverflowError: a token id outside uint32, a seed outside uint64, or
        a block size of 2**32 or more.
    :raises ValueError: ``block_size`` <= 0, or ``tokens`` is a multi-dimensional array.
    """
    size = check_block_size(block_size)
    s = check_u64(seed, "seed")
    toks = as_u32_tokens(tokens)
    window = size + 1 if eagle else size
    data = _le_bytes(toks)
    out = []
    start = 0
    while start + window <= len(toks):
        out.append(xxhash.xxh3_64_intdigest(data[4 * start : 4 * (start + window)], s))
        start += size
    return np.array(out, dtype=np.uint64)


def _chain_step(parent: int, block: int) -> int:
    """One link of Dynamo's sequence-hash chain."""
    data = parent.to_bytes(8, "little") + block.to_bytes(8, "little")
    return int(xxhash.xxh3_64_intdigest(data, XXH3_SEED))


def sequence_hashes(hashes: HashesLike, parent: int | None = None) -> npt.NDArray[np.uint64]:
    """Chain block hashes into sequence hashes (Dynamo's ``compute_seq_hash_for_block``).

    ``s_0 = hashes[0]`` (or ``XXH3_64(le64(parent) || le64(hashes[0]), 1337)``
    when ``parent`` is given) and ``s_i = XXH3_64(le64(s_{i-1}) || le64(hashes[i]), 1337)``.

    >>> sequence_hashes([5, 6]).tolist()[0]
    5

    Runtime complexity: O(len(hashes)).

    :param hashes: block hashes, as uint64.
    :param parent: the sequence hash of the block before ``hashes[0]``, or
        ``None`` when ``hashes[0]`` is the first block of the sequence.
    :returns: one uint64 sequence hash per block hash.
    :raises TypeError: ``hashes`` is not a sequence of integers, or ``parent``
        is not an integer.
    :raises OverflowError: a hash or ``parent`` is outside [0, 2**64).
    :raises ValueError: ``hashes`` is a multi-dimensional array.
    """
    prev = None if parent is None else check_u64(parent, "parent")
    values = as_u64_array(hashes)
    out = []
    for b in values.tolist():
        prev = b if prev is None else _chain_step(prev, b)
        out.append(prev)
    return np.array(out, dtype=np.uint64)


def chained_block_hashes(
    tokens: TokensLike, block_size: int, seed: int = XXH3_SEED, parent: int | None = None
) -> npt.NDArray[np.uint64]:
    """Return the sequence hashes of every full block of ``tokens`` in one pass.

    Equal to ``sequence_hashes(block_hashes(tokens, block_size, seed), parent)``.

    >>> toks = list(range(64))
    >>> bool((chained_block_hashes(toks, 16)
    ...       == sequence_hashes(block_hashes(toks, 16))).all())
    True

    Runtime complexity: O(len(tokens)).

    :param tokens: token ids.
    :param block_size: tokens per block.
    :param seed: the XXH3 seed of every block hash.
    :param parent: the sequence hash of the block before ``tokens``, or ``None``.
    :returns: one uint64 per full block.
    :raises TypeError: bad token or argument types.
    :raises OverflowError: a token id outside uint32, a seed or parent outside
        uint64, or a block size of 2**32 or more.
    :raises ValueError: ``block_size`` <= 0, or ``tokens`` is a multi-dimensional array.
    """
    size = check_block_size(block_size)
    s = check_u64(seed, "seed")
    prev = None if parent is None else check_u64(parent, "parent")
    toks = as_u32_tokens(tokens)
    data = _le_bytes(toks)
    out = []
    for start in range(0, len(toks) - size + 1, size):
        b = int(xxhash.xxh3_64_intdigest(data[4 * start : 4 * (start + size)], s))
        prev = b if prev is None else _chain_step(prev, b)
        out.append(prev)
    return np.array(out, dtype=np.uint64)


# A JSON array of non-negative decimal integers without sign, fraction, exponent
# or leading zero, with JSON whitespace around every token.
_WS: Final = rb"[ \t\n\r]*"
_INT: Final = rb"(?:0|[1-9][0-9]*)"
_ID_ARRAY: Final = re.compile(
    _WS + rb"\[" + _WS + rb"(?:" + _INT + rb"(?:" + _WS + rb"," + _WS + _INT + rb")*)?"
    + _WS + rb"\]" + _WS
)  # fmt: skip


def token_ids_array(data: object) -> npt.NDArray[np.uint32] | None:
    """Return a JSON array of token ids, given as text, as a uint32 array; None if it is not one.

    ``data`` must be exactly ``[`` id (``,`` id)* ``]`` (or ``[]``) with JSON
    whitespace (space, tab, newline, carriage return) anywhere between
    tokens and around the array, each id a decimal integer in [0, 2**32)
    written without sign, fraction, exponent or leading zero. Anything else
    (another JSON value, a negative, larger or non-integer id, malformed
    text, an empty buffer) gives None, for the caller to read it another way.
    Reads the ``token_ids`` of a worker's render answer (a ``msgspec.Raw``)
    straight into what the hashing takes, without a Python int per id.

    >>> token_ids_array(b"[1, 2,3]")
    array([1, 2, 3], dtype=uint32)
    >>> token_ids_array(b"[]").size, token_ids_array(b"[-1]"), token_ids_array(b"[01]")
    (0, None, None)

    Runtime complexity: O(len(data)); the compiled twin releases the GIL for
    large inputs.

    :param data: any C-contiguous buffer (``bytes``, ``msgspec.Raw``,
        ``memoryview``...) holding the JSON text, UTF-8 or ASCII.
    :returns: the ids, or None if ``data`` is not such an array.
    :raises TypeError: ``data`` is not a buffer (a ``str``, say).
    """
    text = memoryview(data).cast("B").tobytes()  # type: ignore[arg-type]
    if _ID_ARRAY.fullmatch(text) is None:
        return None
    try:
        ids = json.loads(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None
    if any(t > U32_MAX for t in ids):
        return None
    return np.array(ids, dtype=np.uint32)
