"""Block hashes: kvroute's own routing key, and Dynamo's.

kvroute keys its index on :func:`kvroute_block_hashes`: Dynamo's
sequence-hash chain over Dynamo's XXH3-64 block hashes. It is computed from
token ids alone, identically for a request's prompt and for the ``token_ids``
of a stored-block event, so routing does not depend on the engines' hash seeds,
algorithms or versions. Dynamo's own hashes share its XXH3 core:

- :func:`dynamo_block_hashes`: Dynamo 1.6.1's ``compute_block_hash_for_seq``;
- :func:`dynamo_sequence_hashes`: Dynamo's chain over them.

vLLM's and SGLang's engine-exact hashes (SHA-256, CBOR, pickle), which only
the event layer needs, live in :mod:`kvroute.events.engine_hashes`; their old
names here still work, with a ``DeprecationWarning``, until kvroute 0.2.

The XXH3 work runs in the compiled :mod:`kvroute._hashing` unless
``KVROUTE_NO_EXTENSIONS`` is set or it failed to import (see
:mod:`kvroute._compat`), in which case its pure-Python twin (same API, same
results, same errors) is used. See ``docs/hashing.md`` for the formulas, the
engine settings that produce each scheme, and measured speed.

Token ids are anything :func:`kvroute._convert.as_u32_tokens` accepts: a list
or tuple of ints, a numpy integer array (zero-copy when it is contiguous
``uint32``), an ``array('I')``... Every scheme hashes ids as u32, so an id
outside [0, 2**32) raises ``OverflowError``, a non-integer raises ``TypeError``
and a block size <= 0 raises ``ValueError``, in every function.

:func:`token_ids_array` reads token ids written as a JSON array (a render
endpoint's ``token_ids``) straight into a ``uint32`` array, or gives None.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ._compat import hashing as _core
from ._convert import as_u32_tokens, check_u64, optional_str
from ._hashing_py import HashesLike, TokensLike

# The implementation kvroute._compat chose: compiled, or the pure-Python twin.
XXH3_SEED: Final = _core.XXH3_SEED
block_hashes = _core.block_hashes
chained_block_hashes = _core.chained_block_hashes
check_block_size = _core.check_block_size
sequence_hashes = _core.sequence_hashes
token_ids_array = _core.token_ids_array
xxh3_64 = _core.xxh3_64

__all__ = [
    "DYNAMO_SEED",
    "HashesLike",
    "TokensLike",
    "dynamo_block_hashes",
    "dynamo_seed",
    "dynamo_sequence_hashes",
    "kvroute_block_hashes",
    "token_ids_array",
    "xxh3_64",
]

#: Dynamo's XXH3 seed: block hashes without LoRA or namespace, and the chain.
DYNAMO_SEED: Final = XXH3_SEED

# ---------------------------------------------------------------------------
# Dynamo, and kvroute's own key
# ---------------------------------------------------------------------------


def dynamo_seed(lora_name: str | None = None, cache_namespace: str | None = None) -> int:
    """Return the XXH3 seed Dynamo 1.6.1 hashes a request's blocks with.

    ``1337 + XXH3_64(lora_name, seed=0) + XXH3_64(cache_namespace, seed=1)``
    modulo 2**64, where an absent or empty name adds nothing.

    >>> dynamo_seed()
    1337
    >>> dynamo_seed(lora_name="") == dynamo_seed()
    True
    >>> dynamo_seed(cache_namespace="tenant-A") != dynamo_seed()
    True

    :param lora_name: the LoRA adapter's name, hashed as UTF-8.
    :param cache_namespace: a cache namespace (tenant), hashed as UTF-8.
    :returns: the seed, in [0, 2**64).
    :raises TypeError: a name is not a ``str`` or ``None``.
    """
    seed = XXH3_SEED
    lora = optional_str(lora_name, "lora_name")
    namespace = optional_str(cache_namespace, "cache_namespace")
    if lora:
        seed += xxh3_64(lora.encode("utf-8"), 0)
    if namespace:
        seed += xxh3_64(namespace.encode("utf-8"), 1)
    return seed & 0xFFFF_FFFF_FFFF_FFFF


def _mm_hashes(info: object, index: int) -> list[int]:
    """The sorted ``mm_hash``es of one entry of Dynamo's ``block_mm_infos``."""
    if info is None:
        return []
    if not isinstance(info, Mapping) or "mm_objects" not in info:
        raise TypeError(
            f"block_mm_infos[{index}] must be None or a mapping with 'mm_objects', "
            f"not {type(info).__name__}"
        )
    objects = info["mm_objects"]
    if not isinstance(objects, Iterable) or isinstance(objects, (str, bytes, Mapping)):
        raise TypeError(f"block_mm_infos[{index}]['mm_objects'] must be a list of mappings")
    out = []
    for obj in objects:
        if not isinstance(obj, Mapping) or "mm_hash" not in obj:
            raise TypeError(f"block_mm_infos[{index}] objects must be mappings with 'mm_hash'")
        out.append(check_u64(obj["mm_hash"], "mm_hash"))
    return sorted(out)


def dynamo_block_hashes(
    tokens: TokensLike,
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_namespace: str | None = None,
    is_eagle: bool = False,
    block_mm_infos: Sequence[Mapping[str, object] | None] | None = None,
) -> npt.NDArray[np.uint64]:
    """Return Dynamo 1.6.1's ``compute_block_hash_for_seq`` of ``tokens``.

    One unchained ``XXH3_64(block tokens as u32 little-endian, seed)`` per full
    block, with the seed of :func:`dynamo_seed`. A trailing partial block is
    not hashed. With ``is_eagle``, each hash covers ``block_size + 1`` tokens
    and windows start every ``block_size`` tokens. A block whose entry in
    ``block_mm_infos`` lists multimodal objects also hashes their ``mm_hash``
    values, sorted, as u64 little-endian after its tokens (``offsets`` are
    ignored, as in Dynamo).

    >>> dynamo_block_hashes(list(range(40)), 16).size
    2

    Runtime complexity: O(len(tokens)).

    :param tokens: token ids.
    :param block_size: tokens per KV block (Dynamo's ``kv_block_size``).
    :param lora_name: the LoRA adapter's name, or ``None``.
    :param cache_namespace: a cache namespace, or ``None``.
    :param is_eagle: hash Eagle windows of ``block_size + 1`` tokens.
    :param block_mm_infos: per block, ``None`` or ``{"mm_objects": [{"mm_hash":
        int, ...}, ...]}``, as Dynamo takes it; blocks past its end have none.
    :returns: one uint64 per block (or per Eagle window).
    :raises TypeError: bad token, name or ``block_mm_infos`` types.
    :raises OverflowError: a token id outside uint32 or an ``mm_hash`` outside uint64.
    :raises ValueError: ``block_size`` <= 0.
    """
    seed = dynamo_seed(lora_name, cache_namespace)
    if block_mm_infos is None:
        return block_hashes(tokens, block_size, seed, bool(is_eagle))
    if isinstance(block_mm_infos, (str, bytes, Mapping)) or not isinstance(
        block_mm_infos, Sequence
    ):
        raise TypeError(f"block_mm_infos must be a list, not {type(block_mm_infos).__name__}")
    # converted once: ``tokens`` may be an iterator
    toks = as_u32_tokens(tokens)
    hashes = block_hashes(toks, block_size, seed, bool(is_eagle))
    size = check_block_size(block_size)
    window = size + 1 if is_eagle else size
    le = toks.astype("<u4")
    for index, info in enumerate(block_mm_infos):
        mm = _mm_hashes(info, index)
        if mm and index < hashes.size:
            start = index * size
            data = le[start : start + window].tobytes() + np.array(mm, "<u8").tobytes()
            hashes[index] = xxh3_64(data, seed)
    return hashes


def dynamo_sequence_hashes(
    block_hashes: HashesLike, *, parent: int | None = None
) -> npt.NDArray[np.uint64]:
    """Chain block hashes into Dynamo's sequence hashes (``compute_seq_hash_for_block``).

    ``s_0 = b_0`` and ``s_i = XXH3_64(le64(s_{i-1}) || le64(b_i), seed=1337)``,
    as in Dynamo's kv-router protocols. With ``parent``, the chain continues
    from that sequence hash: ``s_0 = XXH3_64(le64(parent) || le64(b_0), 1337)``.

    >>> b = dynamo_block_hashes(list(range(64)), 16)
    >>> s = dynamo_sequence_hashes(b)
    >>> bool(s[0] == b[0]), bool((dynamo_sequence_hashes(b[2:], parent=s[1]) == s[2:]).all())
    (True, True)

    Runtime complexity: O(len(block_hashes)).

    :param block_hashes: Dynamo block hashes (uint64).
    :param parent: the sequence hash of the block before ``block_hashes[0]``,
        or ``None`` when ``block_hashes[0]`` starts the sequence.
    :returns: one uint64 sequence hash per block hash.
    :raises TypeError: the hashes or ``parent`` are not integers.
    :raises OverflowError: a hash or ``parent`` is outside [0, 2**64).
    """
    return sequence_hashes(block_hashes, parent)


def kvroute_block_hashes(
    tokens: TokensLike,
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_namespace: str | None = None,
    parent: int | None = None,
) -> npt.NDArray[np.uint64]:
    """Return kvroute's routing keys: one chained 64-bit key per full block.

    Equal to ``dynamo_sequence_hashes(dynamo_block_hashes(tokens, block_size,
    lora_name=..., cache_namespace=...), parent=parent)``, computed in one pass.
    A key names the block *and its whole prefix*, so "does a worker hold the
    first k blocks" is k independent look-ups. The event layer hashes a stored
    event's ``token_ids`` continuing from the kvroute key of the event's parent
    block, and gets the same keys a request with those tokens gets.

    >>> toks = list(range(64))
    >>> keys = kvroute_block_hashes(toks, 16)
    >>> bool((kvroute_block_hashes(toks[32:], 16, parent=int(keys[1])) == keys[2:]).all())
    True

    Runtime complexity: O(len(tokens)); releases the GIL for large prompts.

    :param tokens: token ids.
    :param block_size: tokens per KV block.
    :param lora_name: the LoRA adapter's name, or ``None``.
    :param cache_namespace: a cache namespace (tenant, cache salt), or ``None``.
    :param parent: the kvroute key of the block before ``tokens``, or ``None``
        when ``tokens`` starts at the beginning of the prompt.
    :returns: one uint64 per full block.
    :raises TypeError: bad token or name types.
    :raises OverflowError: a token id outside uint32, or ``parent`` outside uint64.
    :raises ValueError: ``block_size`` <= 0.
    """
    seed = dynamo_seed(lora_name, cache_namespace)
    return chained_block_hashes(tokens, block_size, seed, parent)


# ---------------------------------------------------------------------------
# The engine-exact hashes' old home
# ---------------------------------------------------------------------------

#: Names that moved to :mod:`kvroute.events.engine_hashes` (they need cbor2,
#: the core does not); ``from kvroute.hashing import vllm_block_hashes`` still
#: works, importing them on first use, with a ``DeprecationWarning``.
_MOVED: Final = frozenset(
    {
        "VLLM_HASH_ALGOS",
        "VllmHashAlgo",
        "VllmLoRA",
        "sglang_block_hashes",
        "sglang_event_hash",
        "sglang_kv_event_namespace_seed",
        "sglang_namespaced_block_hash",
        "sglang_page_digests",
        "sglang_storage_namespace_seed",
        "vllm_block_digests",
        "vllm_block_hashes",
        "vllm_event_hash",
        "vllm_none_hash",
    }
)


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"kvroute.hashing.{name} moved to kvroute.events.engine_hashes.{name}; "
        "the old name goes in kvroute 0.2",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module("kvroute.events.engine_hashes"), name)
