"""vLLM's and SGLang's engine-exact block hashes: the hashes their KV events carry.

kvroute routes on its own key (:func:`kvroute.hashing.kvroute_block_hashes`),
computed from token ids alone. Engines name blocks in their events by their
own hashes; these functions reproduce them exactly, so an event's hashes can
be checked against its tokens (:class:`kvroute.events.EventApplier` does, and
:class:`kvroute.testing.MockWorker` publishes them):

- :func:`vllm_block_hashes`: vLLM 0.33's prefix-cache hashes (SHA-256 or
  XXH3-128 of pickled or canonical-CBOR tuples), as its KV events carry them;
- :func:`sglang_block_hashes`: SGLang 0.5.23's page hashes (chained SHA-256),
  as its KV events carry them, with the ``format=dynamo`` namespacing.

They live beside the events, not in the core: they need ``cbor2`` (part of
the ``serve`` extra), and routing never does. Until kvroute 0.2 the same names
also import from :mod:`kvroute.hashing`, with a ``DeprecationWarning``.

Token ids are anything :func:`kvroute._convert.as_u32_tokens` accepts; an id
outside [0, 2**32) raises ``OverflowError``, a non-integer ``TypeError`` and a
block size <= 0 ``ValueError``, in every function. See ``docs/hashing.md`` for
the formulas and the engine settings that produce each scheme.
"""

from __future__ import annotations

import hashlib
import operator
import pickle
from typing import Final, Literal, NamedTuple

import cbor2
import numpy as np
import numpy.typing as npt
import xxhash

from .._compat import hashing as _core
from .._convert import as_u32_tokens, optional_str
from ..hashing import TokensLike

__all__ = [
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
]

check_block_size = _core.check_block_size

# ---------------------------------------------------------------------------
# vLLM 0.33
# ---------------------------------------------------------------------------

#: vLLM's ``--prefix-caching-hash-algo`` values (``sha256`` is its default).
VllmHashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
VLLM_HASH_ALGOS: Final[tuple[VllmHashAlgo, ...]] = (
    "sha256",
    "sha256_cbor",
    "xxhash",
    "xxhash_cbor",
)

# NONE_HASH's input when PYTHONHASHSEED is unset, for the sha256 algorithms.
_VLLM_UNSET_SEED: Final = "vllm-none-hash"


class VllmLoRA(NamedTuple):
    """The parts of a vLLM ``LoRARequest`` that enter its block hashes.

    vLLM 0.33 adds ``("lora", name, path)`` to every block's extra keys; the
    adapter's integer id does not enter the hash. A plain ``(name, path)``
    tuple is accepted wherever a :class:`VllmLoRA` is.

    >>> VllmLoRA("my-lora", "/models/my-lora").name
    'my-lora'
    """

    name: str
    path: str


def _vllm_algo(algo: object) -> VllmHashAlgo:
    if not isinstance(algo, str):
        raise TypeError(f"algo must be a str, not {type(algo).__name__}")
    for name in VLLM_HASH_ALGOS:
        if name == algo:
            return name
    raise ValueError(f"unknown vLLM hash algo {algo!r}; expected one of {VLLM_HASH_ALGOS}")


def _vllm_digest(algo: str, obj: object) -> bytes:
    """vLLM's ``hash_fn(obj)`` for ``--prefix-caching-hash-algo=algo``."""
    if algo.endswith("_cbor"):
        data = cbor2.dumps(obj, canonical=True)
    else:
        data = pickle.dumps(obj, protocol=5)
    if algo.startswith("sha256"):
        return hashlib.sha256(data).digest()
    return bytes(xxhash.xxh3_128_digest(data))


def _runtime_str(s: str) -> str:
    """A new str object equal to ``s``, like the strings vLLM gets from a request.

    The pickle-based algorithms memoise objects by identity, so a string that
    *is* another string of the same key (``"lora"`` as a salt, a LoRA whose
    name is its path) is written as a back-reference. Strings that reach vLLM
    at run time are fresh objects (CPython shares only 0- and 1-character
    strings), so kvroute hashes fresh copies to get the bytes vLLM hashes.
    """
    return s if len(s) < 2 else (s + " ")[:-1]


def vllm_none_hash(algo: VllmHashAlgo = "sha256", seed: str | int | None = None) -> bytes:
    """Return vLLM's ``NONE_HASH``: the parent digest of a prompt's first block.

    ``NONE_HASH = hash_fn(seed)``, where ``seed`` is the engine's
    ``PYTHONHASHSEED`` string. With ``PYTHONHASHSEED`` unset, sha256 and
    sha256_cbor use the fixed string ``"vllm-none-hash"``, while xxhash and
    xxhash_cbor use ``os.urandom(32).hex()`` - random in every engine process,
    so those are refused rather than guessed.

    >>> vllm_none_hash("sha256").hex()[:12]
    '066b1e8987e0'
    >>> vllm_none_hash("xxhash_cbor", seed="0").hex()
    '1ebe36576dcb573f26b99533a20aaeca'

    :param algo: vLLM's ``--prefix-caching-hash-algo``.
    :param seed: the engine's ``PYTHONHASHSEED`` exactly as set (an int is
        written in decimal: ``"042"`` and ``42`` differ), or ``None`` if unset.
    :returns: the digest, 32 bytes for sha256 algorithms and 16 for xxhash ones.
    :raises ValueError: an unknown ``algo``, or ``seed=None`` with an xxhash algo.
    :raises TypeError: ``seed`` is not a ``str``, an ``int`` or ``None``.
    """
    name = _vllm_algo(algo)
    if seed is None:
        if name.startswith("xxhash"):
            raise ValueError(
                f"vLLM's {name} NONE_HASH is random per engine process when PYTHONHASHSEED "
                "is unset (os.urandom), so its block hashes cannot be reproduced; start the "
                "engine with PYTHONHASHSEED set and pass the same value as seed="
            )
        text = _VLLM_UNSET_SEED
    elif isinstance(seed, str):
        text = seed
    elif isinstance(seed, int) and not isinstance(seed, bool):
        text = str(seed)
    else:
        raise TypeError(f"seed must be a str, an int or None, not {type(seed).__name__}")
    return _vllm_digest(name, _runtime_str(text))


def _vllm_lora(lora: object) -> tuple[str, str, str] | None:
    if lora is None:
        return None
    if (
        not isinstance(lora, tuple)
        or len(lora) != 2
        or not all(isinstance(part, str) for part in lora)
    ):
        raise TypeError(f"lora must be a VllmLoRA or a (name, path) tuple of str, not {lora!r}")
    return ("lora", _runtime_str(lora[0]), _runtime_str(lora[1]))


def vllm_block_digests(
    tokens: TokensLike,
    block_size: int,
    *,
    algo: VllmHashAlgo = "sha256",
    seed: str | int | None = None,
    lora: VllmLoRA | tuple[str, str] | None = None,
    cache_salt: str | None = None,
    lookahead_tokens: int = 0,
    hash_block_size: int | None = None,
) -> list[bytes]:
    """Return vLLM 0.33's prefix-cache block hashes of ``tokens``, as raw digests.

    ``d_i = H((d_{i-1}, tuple(block_i tokens), extra_keys_i))`` with
    ``d_{-1} =`` :func:`vllm_none_hash`, for every full block, where ``H`` is
    SHA-256 or XXH3-128 of the pickle (protocol 5) or canonical CBOR of the
    tuple. ``extra_keys_i`` is ``None`` or a tuple of ``("lora", name, path)``
    (every block) then ``("cache_salt", salt)`` (first block only; an empty
    salt is no salt, as in vLLM). With ``lookahead_tokens=n``, it becomes
    ``(extra_keys_i, *the n tokens after the block)`` and a block is hashed
    only once those tokens exist. With ``hash_block_size``, the chain runs at
    that granularity and each ``block_size`` block takes the digest at its last
    fine boundary (vLLM's ``resolve_block_hashes`` for several KV cache groups).

    >>> [d.hex()[:8] for d in vllm_block_digests(list(range(40)), 16)]
    ['fe8fa5dd', '8be7aaa3']

    Multimodal and prompt-embedding extra keys are not supported.

    Runtime complexity: O(len(tokens)), in Python (hashlib, cbor2, pickle).

    :param tokens: token ids.
    :param block_size: tokens per KV block.
    :param algo: vLLM's ``--prefix-caching-hash-algo``.
    :param seed: the engine's ``PYTHONHASHSEED``, or ``None`` if unset.
    :param lora: the request's LoRA as ``VllmLoRA(name, path)``, or ``None``.
    :param cache_salt: the request's ``cache_salt``, or ``None``.
    :param lookahead_tokens: vLLM's lookahead (EAGLE) hashing token count.
    :param hash_block_size: the hashing granularity when it is finer than
        ``block_size`` (which must be a multiple of it), or ``None``.
    :returns: one digest per block: 32 bytes (sha256) or 16 bytes (xxhash).
    :raises ValueError: unknown ``algo``; ``seed=None`` with an xxhash algo;
        ``block_size`` <= 0, not a multiple of ``hash_block_size``; negative
        ``lookahead_tokens``.
    :raises TypeError: bad token, ``seed``, ``lora`` or ``cache_salt`` types.
    :raises OverflowError: a token id outside uint32.
    """
    size = check_block_size(block_size)
    fine = size if hash_block_size is None else check_block_size(hash_block_size, "hash_block_size")
    if size % fine:
        raise ValueError(f"block_size {size} must be a multiple of hash_block_size {fine}")
    try:
        lookahead = operator.index(lookahead_tokens)
    except TypeError:
        raise TypeError(
            f"lookahead_tokens must be an integer, not {type(lookahead_tokens).__name__}"
        ) from None
    if lookahead < 0:
        raise ValueError(f"lookahead_tokens must be >= 0, got {lookahead}")
    name = _vllm_algo(algo)
    lora_key = _vllm_lora(lora)
    salt = optional_str(cache_salt, "cache_salt")
    parent = vllm_none_hash(name, seed)
    toks: list[int] = as_u32_tokens(tokens).tolist()

    digests = []
    for start in range(0, len(toks) - fine - lookahead + 1, fine):
        end = start + fine
        keys: list[tuple[str, ...]] = []
        if lora_key is not None:
            keys.append(lora_key)
        if salt and start == 0:
            keys.append(("cache_salt", _runtime_str(salt)))
        extra: object = tuple(keys) if keys else None
        if lookahead:
            extra = (extra, *toks[end : end + lookahead])
        parent = _vllm_digest(name, (parent, tuple(toks[start:end]), extra))
        digests.append(parent)
    ratio = size // fine
    return digests[ratio - 1 :: ratio] if ratio > 1 else digests


def vllm_event_hash(digest: bytes) -> int:
    """Return the int vLLM puts in KV events for a block digest.

    ``int.from_bytes(digest, "big") & (2**64 - 1)``: the digest's last 8 bytes
    as a big-endian u64 (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the default).

    >>> vllm_event_hash(bytes(24) + bytes([0, 0, 0, 0, 0, 0, 1, 2]))
    258

    :param digest: a vLLM block digest.
    :returns: the event hash, in [0, 2**64).
    :raises TypeError: ``digest`` is not bytes-like.
    """
    return int.from_bytes(memoryview(digest).cast("B")[-8:], "big")


def vllm_block_hashes(
    tokens: TokensLike,
    block_size: int,
    *,
    algo: VllmHashAlgo = "sha256",
    seed: str | int | None = None,
    lora: VllmLoRA | tuple[str, str] | None = None,
    cache_salt: str | None = None,
    lookahead_tokens: int = 0,
    hash_block_size: int | None = None,
) -> npt.NDArray[np.uint64]:
    """Return vLLM 0.33's block hashes of ``tokens`` as its KV events carry them.

    :func:`vllm_event_hash` of each of :func:`vllm_block_digests` (same
    arguments, same rules): the block hashes of ``BlockStored`` and
    ``BlockRemoved`` events with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``.

    >>> vllm_block_hashes(list(range(40)), 16, algo="sha256_cbor").size
    2

    Runtime complexity: O(len(tokens)), in Python.

    :param tokens: token ids.
    :param block_size: tokens per KV block.
    :param algo: vLLM's ``--prefix-caching-hash-algo``.
    :param seed: the engine's ``PYTHONHASHSEED``, or ``None`` if unset.
    :param lora: the request's LoRA as ``VllmLoRA(name, path)``, or ``None``.
    :param cache_salt: the request's ``cache_salt``, or ``None``.
    :param lookahead_tokens: vLLM's lookahead (EAGLE) hashing token count.
    :param hash_block_size: the hashing granularity, or ``None``.
    :returns: one uint64 per block.
    :raises ValueError: as :func:`vllm_block_digests`.
    :raises TypeError: as :func:`vllm_block_digests`.
    :raises OverflowError: a token id outside uint32.
    """
    digests = vllm_block_digests(
        tokens,
        block_size,
        algo=algo,
        seed=seed,
        lora=lora,
        cache_salt=cache_salt,
        lookahead_tokens=lookahead_tokens,
        hash_block_size=hash_block_size,
    )
    return np.array([vllm_event_hash(d) for d in digests], dtype=np.uint64)


# ---------------------------------------------------------------------------
# SGLang 0.5.23
# ---------------------------------------------------------------------------

_SGLANG_SALT_PREFIX: Final = b"sglang-cache-salt-v1\0"
_SGLANG_EVENT_NAMESPACE: Final = b"sglang-kv-event-namespace-v1"
_SGLANG_STORAGE_NAMESPACE: Final = b"sglang-cache-namespace-v1"


def sglang_page_digests(
    tokens: TokensLike,
    page_size: int,
    *,
    cache_salt: str | None = None,
    partial: bool = False,
) -> list[bytes]:
    """Return SGLang 0.5.23's chained SHA-256 page digests of ``tokens``.

    ``d_i = SHA256(d_{i-1} || page_i tokens as u32 little-endian)``; the first
    page has no ``d_{i-1}``, unless ``cache_salt`` starts the chain at
    ``SHA256(b"sglang-cache-salt-v1\\0" + salt)``. SGLang's ``get_hash_str``
    also hashes a trailing partial page; its radix cache only ever inserts
    page-aligned keys, so the events never carry one, and it is returned here
    only with ``partial=True``.

    >>> len(sglang_page_digests(list(range(20)), 16)), len(
    ...     sglang_page_digests(list(range(20)), 16, partial=True))
    (1, 2)

    Runtime complexity: O(len(tokens)), in hashlib.

    :param tokens: token ids.
    :param page_size: tokens per page.
    :param cache_salt: the request's ``cache_salt`` (an empty salt is none:
        SGLang's API turns ``""`` into ``None``).
    :param partial: also hash a trailing partial page, as ``get_hash_str``.
    :returns: one 32-byte digest per page.
    :raises TypeError: bad token or ``cache_salt`` types.
    :raises OverflowError: a token id outside uint32.
    :raises ValueError: ``page_size`` <= 0.
    """
    size = check_block_size(page_size, "page_size")
    salt = optional_str(cache_salt, "cache_salt")
    data = as_u32_tokens(tokens).astype("<u4").tobytes()
    prior = hashlib.sha256(_SGLANG_SALT_PREFIX + salt.encode("utf-8")).digest() if salt else b""
    step = 4 * size
    end = len(data) if partial else len(data) - len(data) % step
    digests = []
    for start in range(0, end, step):
        prior = hashlib.sha256(prior + data[start : start + step]).digest()
        digests.append(prior)
    return digests


def sglang_event_hash(digest: bytes) -> int:
    """Return the int SGLang publishes for a page digest (``hash_str_to_int64``).

    The first 8 bytes of the digest as a *signed* big-endian int64.

    >>> sglang_event_hash(bytes([0xFF] * 8) + bytes(24))
    -1

    :param digest: a page digest.
    :returns: the event hash, in [-2**63, 2**63).
    :raises TypeError: ``digest`` is not bytes-like.
    """
    return int.from_bytes(memoryview(digest).cast("B")[:8], "big", signed=True)


def _sglang_part(value: str | None) -> bytes:
    if value is None:
        return b"\x00"
    encoded = value.encode("utf-8")
    return b"\x01" + len(encoded).to_bytes(8, "little") + encoded


def _sglang_seed(prefix: bytes, extra_key: object, cache_salt: object) -> bytes | None:
    extra = optional_str(extra_key, "extra_key")
    salt = optional_str(cache_salt, "cache_salt")
    if extra is None and salt is None:
        return None
    return hashlib.sha256(prefix + _sglang_part(extra) + _sglang_part(salt)).digest()


def sglang_kv_event_namespace_seed(extra_key: str | None, cache_salt: str | None) -> bytes | None:
    """Return SGLang's ``kv_event_namespace_seed``: the key of ``format=dynamo`` hashes.

    ``SHA256(b"sglang-kv-event-namespace-v1" + part(extra_key) + part(cache_salt))``
    with ``part(None) = 00`` and ``part(s) = 01 || len(s) as u64 little-endian || s``
    (UTF-8), or ``None`` when both are ``None``. ``""`` and ``None`` differ here.

    >>> sglang_kv_event_namespace_seed(None, "tenant-A").hex()[:16]
    '0761cf5e6a00ceef'

    :param extra_key: the request's radix ``extra_key`` (LoRA ids look like
        ``"adapter:<32 hex>"``), or ``None``.
    :param cache_salt: the request's ``cache_salt``, or ``None``.
    :returns: the 32-byte seed, or ``None``.
    :raises TypeError: an argument is not a ``str`` or ``None``.
    """
    return _sglang_seed(_SGLANG_EVENT_NAMESPACE, extra_key, cache_salt)


def sglang_storage_namespace_seed(extra_key: str | None, cache_salt: str | None) -> bytes | None:
    """Return SGLang's ``storage_namespace_seed``: the prior digest of storage chains.

    As :func:`sglang_kv_event_namespace_seed`, with the prefix
    ``b"sglang-cache-namespace-v1"``. SGLang returns it as a hex string.

    >>> sglang_storage_namespace_seed(None, "tenant-A").hex()[:16]
    'bac68bd04cadc3e5'

    :param extra_key: the request's radix ``extra_key``, or ``None``.
    :param cache_salt: the request's ``cache_salt``, or ``None``.
    :returns: the 32-byte seed, or ``None``.
    :raises TypeError: an argument is not a ``str`` or ``None``.
    """
    return _sglang_seed(_SGLANG_STORAGE_NAMESPACE, extra_key, cache_salt)


def sglang_namespaced_block_hash(block_hash: int, seed: bytes) -> int:
    """Return a ``format=dynamo`` block hash: an event hash keyed by a namespace seed.

    ``int64_be(SHA256(seed || block_hash as 8-byte signed big-endian)[:8])``.

    >>> seed = sglang_kv_event_namespace_seed(None, "tenant-A")
    >>> sglang_namespaced_block_hash(12345, seed)
    -6811254089506434276

    :param block_hash: an SGLang event hash (signed int64).
    :param seed: a :func:`sglang_kv_event_namespace_seed`.
    :returns: the namespaced hash, a signed int64.
    :raises TypeError: ``block_hash`` is not an int or ``seed`` is not bytes.
    :raises OverflowError: ``block_hash`` is outside the int64 range.
    """
    try:
        value = operator.index(block_hash)
    except TypeError:
        raise TypeError(f"block_hash must be an integer, not {type(block_hash).__name__}") from None
    if not isinstance(seed, (bytes, bytearray)):
        raise TypeError(f"seed must be bytes, not {type(seed).__name__}")
    raw = value.to_bytes(8, "big", signed=True)
    return sglang_event_hash(hashlib.sha256(bytes(seed) + raw).digest())


def sglang_block_hashes(
    tokens: TokensLike,
    page_size: int,
    *,
    cache_salt: str | None = None,
    extra_key: str | None = None,
    event_format: Literal["default", "dynamo"] = "default",
    partial: bool = False,
) -> npt.NDArray[np.int64]:
    """Return SGLang 0.5.23's page hashes of ``tokens`` as its KV events carry them.

    :func:`sglang_event_hash` of each of :func:`sglang_page_digests`. With the
    KV-event publisher's ``format=dynamo`` and a namespace (a ``cache_salt`` or
    an ``extra_key``), each hash is then keyed with
    :func:`sglang_namespaced_block_hash` under
    :func:`sglang_kv_event_namespace_seed`. In the default format
    ``extra_key`` does not change the hashes.

    >>> sglang_block_hashes(list(range(16)), 16).tolist()
    [6738917275443968386]

    Runtime complexity: O(len(tokens)), in hashlib.

    :param tokens: token ids.
    :param page_size: tokens per page (``--page-size``; 1 for many backends).
    :param cache_salt: the request's ``cache_salt``, or ``None`` (``""`` is none).
    :param extra_key: the request's radix ``extra_key`` (LoRA), or ``None``.
    :param event_format: the KV-event ``format``: ``"default"`` or ``"dynamo"``.
    :param partial: also hash a trailing partial page (see :func:`sglang_page_digests`).
    :returns: one signed int64 per page.
    :raises TypeError: bad token, ``cache_salt`` or ``extra_key`` types.
    :raises OverflowError: a token id outside uint32.
    :raises ValueError: ``page_size`` <= 0, or an unknown ``event_format``.
    """
    if event_format not in ("default", "dynamo"):
        raise ValueError(f"event_format must be 'default' or 'dynamo', not {event_format!r}")
    salt = optional_str(cache_salt, "cache_salt") or None
    extra = optional_str(extra_key, "extra_key")
    digests = sglang_page_digests(tokens, page_size, cache_salt=salt, partial=partial)
    hashes = [sglang_event_hash(d) for d in digests]
    if event_format == "dynamo":
        seed = sglang_kv_event_namespace_seed(extra, salt)
        if seed is not None:
            hashes = [sglang_namespaced_block_hash(h, seed) for h in hashes]
    return np.array(hashes, dtype=np.int64)
