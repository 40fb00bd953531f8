"""Block hashing speed: the twins side by side with Dynamo's own hasher.

Each benchmark hashes one prompt of ``n`` token ids (block size 16) per call:

* ``dynamo``: ``dynamo._core.compute_block_hash_for_seq`` (ai-dynamo-runtime
  1.6.1, Rust behind pyo3) on a ``list`` - the reference of the issue's 3x goal;
* ``c`` / ``py``: kvroute's compiled hasher and its pure-Python twin, given the
  same ``list``, or a contiguous ``numpy.uint32`` array (the zero-copy path);
  ``dynamo`` is the block hashes only, ``kvroute`` adds the sequence chain.

``n`` runs over powers of ten plus 32 768, the prompt of the issue's goal.
pytest-benchmark groups them by input so the ratios read off directly. Also
timed: one XXH3-64 call against the ``xxhash`` package, and the engine-exact
vLLM and SGLang schemes (pure Python over hashlib, pickle and cbor2), and
the proxy's path from a worker's render answer to routing keys (its
``token_ids`` read as a ``list`` or, as the proxy now does, as ``uint32``).

Not measured: tokenisation, converting other containers (``array('I')``,
numpy ``int64``) into uint32, multi-threaded throughput (the compiled loops
release the GIL above 64 KiB of tokens), and cold caches - the same prompt is
hashed again and again, so it sits in L2.

Run with ``pytest benchmarks/bench_hashing.py --benchmark-enable``; the normal
test run collects these with ``--benchmark-disable``, so each runs once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xxhash

from kvroute import _compat, hashing
from kvroute.events import engine_hashes

BLOCK = 16
SIZES = [1_000, 10_000, 32_768, 100_000]
SEED = 20240607


def _twins() -> list[ModuleType]:
    # a compiled core that failed to import is reported by tests/test_build.py
    return list(_compat.implementations("hashing"))


TWINS = _twins()
TWIN_IDS = ["py" if m.__name__.endswith("_py") else "c" for m in TWINS]


def prompt(n: int) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """``n`` token ids below a 151 936-token vocabulary, the same for every run."""
    return np.random.default_rng(SEED).integers(0, 151_936, size=n, dtype=np.uint32)


def _dynamo() -> Callable[..., list[int]]:
    core = pytest.importorskip("dynamo._core", reason="needs the `compare` extra")
    return core.compute_block_hash_for_seq  # type: ignore[no-any-return]


@pytest.mark.compare
@pytest.mark.parametrize("n", SIZES)
def bench_dynamo_compute_block_hash_for_seq(benchmark: Any, n: int) -> None:
    compute = _dynamo()
    tokens = prompt(n).tolist()
    benchmark.group = f"{n} tokens, list"
    result = benchmark(compute, tokens, BLOCK)
    assert result == hashing.dynamo_block_hashes(tokens, BLOCK).tolist()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("form", ["list", "uint32"])
@pytest.mark.parametrize("scheme", ["dynamo", "kvroute"])
@pytest.mark.parametrize("twin", TWINS, ids=TWIN_IDS)
def bench_twin(benchmark: Any, twin: ModuleType, scheme: str, form: str, n: int) -> None:
    array = prompt(n)
    tokens = array.tolist() if form == "list" else array
    fn = twin.block_hashes if scheme == "dynamo" else twin.chained_block_hashes
    benchmark.group = f"{n} tokens, {form}"
    result = benchmark(fn, tokens, BLOCK)
    assert result.size == n // BLOCK


@pytest.mark.parametrize("size", [64, 4096])
@pytest.mark.parametrize("impl", [*TWIN_IDS, "xxhash"])
def bench_xxh3_64(benchmark: Any, impl: str, size: int) -> None:
    data = np.random.default_rng(SEED).bytes(size)
    fn = xxhash.xxh3_64_intdigest if impl == "xxhash" else TWINS[TWIN_IDS.index(impl)].xxh3_64
    benchmark.group = f"xxh3_64 of {size} bytes"
    assert benchmark(fn, data, 1337) == xxhash.xxh3_64_intdigest(data, 1337)


@pytest.mark.parametrize(
    "scheme",
    ["vllm_sha256", "vllm_sha256_cbor", "vllm_xxhash", "vllm_xxhash_cbor", "sglang"],
)
def bench_engine_scheme(benchmark: Any, scheme: str) -> None:
    tokens = prompt(32_768)
    benchmark.group = "engine schemes, 32768 tokens, uint32"
    if scheme == "sglang":
        result = benchmark(engine_hashes.sglang_block_hashes, tokens, BLOCK)
    else:
        algo = scheme.removeprefix("vllm_")
        result = benchmark(engine_hashes.vllm_block_hashes, tokens, BLOCK, algo=algo, seed="0")
    assert result.size == 32_768 // BLOCK


def _render_answer(n: int) -> bytes:
    """A vLLM render answer holding ``n`` token ids, as a worker sends it."""
    answer = {"request_id": "chatcmpl-1", "token_ids": prompt(n).tolist(), "sampling_params": {}}
    return json.dumps(answer).encode()


@pytest.mark.parametrize("n", [4_000, 50_000])
@pytest.mark.parametrize("read", ["list", "raw", "uint32"])
def bench_render_answer_to_keys(benchmark: Any, read: str, n: int) -> None:
    """The proxy's tokenize-by-worker hot path: a render answer's ids to routing keys.

    ``list``: msgspec decodes ``token_ids`` as ``list[int]`` (the proxy before
    issue 13); ``raw``: msgspec keeps them as raw JSON text (``msgspec.Raw``)
    and ``token_ids_array`` parses it into uint32; ``uint32``:
    :func:`~kvroute.proxy.tokenize.answer_token_ids`, which finds the array in
    an answer headed as vLLM writes it without decoding the answer at all.
    """
    tokenize = pytest.importorskip("kvroute.proxy.tokenize", reason="needs the `serve` extra")
    import msgspec

    class Rendered(msgspec.Struct):  # the answer as the proxy decoded it before
        token_ids: list[int]

    raw_struct = msgspec.defstruct("RenderedRaw", [("token_ids", msgspec.Raw)])

    as_list = msgspec.json.Decoder(Rendered)
    as_raw = msgspec.json.Decoder(raw_struct)
    text = _render_answer(n)

    def keys() -> Any:
        if read == "list":
            ids: Any = as_list.decode(text).token_ids
        elif read == "raw":
            ids = hashing.token_ids_array(as_raw.decode(text).token_ids)
        else:
            ids = tokenize.answer_token_ids("chat", True, text)
        return hashing.kvroute_block_hashes(ids, BLOCK)

    benchmark.group = f"render answer of {n} ids to keys"
    assert np.array_equal(benchmark(keys), hashing.kvroute_block_hashes(prompt(n), BLOCK))
