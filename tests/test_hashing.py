"""Block hashing: the twins against each other and the ``xxhash`` package, and
every public scheme against the ground-truth vectors in ``tests/vectors``.

The twin tests run against the compiled :mod:`kvroute._hashing` and the
pure-Python :mod:`kvroute._hashing_py` (ids c / py). The public functions of
:mod:`kvroute.hashing` (kvroute's key, Dynamo's) use whichever twin is loaded,
those of :mod:`kvroute.events.engine_hashes` reproduce vLLM's and SGLang's;
the vectors pin them to what vLLM 0.33.0, SGLang 0.5.23 and Dynamo 1.6.1
really produce.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.machinery
import inspect
import json
import os
import pickle
import random
import threading
from array import array
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xxhash
from helpers import twin_ids, twins
from hypothesis import given
from hypothesis import strategies as st

import kvroute._convert
import kvroute._hashing_py
import kvroute.events.engine_hashes as E
import kvroute.hashing as H

VECTORS = Path(__file__).parent / "vectors"
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

#: Input lengths at every XXH3 path boundary: 0, 1-3, 4-8, 9-16, 17-128,
#: 129-240 and >240 bytes, around the 64-byte stripe and the 1024-byte block.
BOUNDARY_LENGTHS = sorted(
    {0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 96, 127, 128, 129}
    | {143, 144, 145, 239, 240, 241, 255, 256, 257, 319, 320, 321, 1000, 1001}
    | {64 * k + d for k in range(2, 20) for d in (-1, 0, 1)}
    | {1024 * k + d for k in range(1, 5) for d in (-1, 0, 1, 63, 64, 65)}
)
SEEDS = [0, 1, 1337, 2**32 - 1, 2**32, 2**63, U64_MAX - 1336, U64_MAX]


_HASHING_TWINS = twins("_hashing")


@pytest.fixture(scope="session", params=_HASHING_TWINS, ids=twin_ids(_HASHING_TWINS))
def hashing_module(request: pytest.FixtureRequest) -> ModuleType:
    """The compiled ``kvroute._hashing`` and the pure-Python ``kvroute._hashing_py``."""
    return request.param  # type: ignore[no-any-return]


def _load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


_SEQUENCES = _load("token_sequences.json")


def sequence(name: str) -> list[int]:
    """A token list of token_sequences.json by the name the vectors use."""
    if name == "small64":
        return list(_SEQUENCES["small64"])
    assert name.startswith("base[:") and name.endswith("]"), name
    return list(_SEQUENCES["base"][: int(name[len("base[:") : -1])])


def naive_block_hashes(tokens: list[int], size: int, seed: int, eagle: bool = False) -> list[int]:
    """A third implementation for the differential tests: ints, bytes and ``xxhash``."""
    window = size + 1 if eagle else size
    data = b"".join(t.to_bytes(4, "little") for t in tokens)
    return [
        xxhash.xxh3_64_intdigest(data[4 * s : 4 * (s + window)], seed)
        for s in range(0, len(tokens) - window + 1, size)
    ]


def naive_chain(hashes: list[int], parent: int | None = None) -> list[int]:
    out = []
    for b in hashes:
        if parent is not None:
            b = xxhash.xxh3_64_intdigest(
                parent.to_bytes(8, "little") + b.to_bytes(8, "little"), 1337
            )
        out.append(b)
        parent = b
    return out


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """What ``fn(*args)`` did, hashable and comparable across twins: its value or
    its exception's type and message."""
    try:
        value = fn(*args)
    except Exception as exc:
        return ("raised", (type(exc), str(exc)))
    if isinstance(value, np.ndarray):
        return ("value", (str(value.dtype), tuple(value.tolist())))
    return ("value", value)


def twin_outcomes(call: Callable[[ModuleType], Any]) -> set[tuple[str, Any]]:
    """The set of outcomes of ``call(twin)`` over the twins: one element if they agree."""
    return {outcome(call, m) for m in _HASHING_TWINS}


# ---------------------------------------------------------------------------
# the build and the twins' shape
# ---------------------------------------------------------------------------


def test_compiled_module_is_loaded() -> None:
    """A broken build must not quietly leave only the pure-Python twin under test."""
    if os.environ.get("KVROUTE_NO_EXTENSIONS"):
        assert H.block_hashes is kvroute._hashing_py.block_hashes
        return
    compiled = importlib.import_module("kvroute._hashing")
    assert compiled.__file__ is not None
    assert compiled.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert H.block_hashes is compiled.block_hashes
    assert H.chained_block_hashes is compiled.chained_block_hashes
    assert H.xxh3_64 is compiled.xxh3_64


def test_twins_have_the_same_api() -> None:
    py = kvroute._hashing_py
    for mod in _HASHING_TWINS:
        types = ("HashesLike", "TokensLike")  # type aliases live only in the twin
        assert sorted(n for n in mod.__all__ if n not in types) == sorted(
            n for n in py.__all__ if n not in types
        )
        assert mod.XXH3_SEED == 1337
        for name in mod.__all__:
            if callable(getattr(py, name)):
                params = inspect.signature(getattr(mod, name)).parameters
                expected = inspect.signature(getattr(py, name)).parameters
                assert [(p.name, p.default) for p in params.values()] == [
                    (p.name, p.default) for p in expected.values()
                ], name


@pytest.mark.parametrize("module", [H, E, kvroute._hashing_py, kvroute._convert])
def test_doctests(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


@pytest.mark.parametrize("module", [H, E], ids=lambda m: m.__name__)
def test_public_functions_are_documented(module: ModuleType) -> None:
    for name in module.__all__:
        obj = getattr(module, name)
        if not inspect.isfunction(obj) or obj.__module__ != module.__name__:
            continue
        doc = inspect.getdoc(obj) or ""
        assert doc.splitlines()[0].endswith("."), name
        assert ">>> " in doc, name
        assert ":returns:" in doc, name


def test_engine_hashes_keep_their_old_names_with_a_deprecation_warning() -> None:
    # They moved to kvroute.events.engine_hashes (cbor2 stays out of the core);
    # ``from kvroute.hashing import vllm_block_hashes`` still works until 0.2.
    assert not set(E.__all__) & set(H.__all__)
    for name in E.__all__:
        with pytest.warns(DeprecationWarning, match=f"kvroute.events.engine_hashes.{name}"):
            assert getattr(H, name) is getattr(E, name)
    with pytest.warns(DeprecationWarning, match="moved"):
        from kvroute.hashing import vllm_block_hashes
    assert vllm_block_hashes is E.vllm_block_hashes
    with pytest.raises(AttributeError, match="no_such_name"):
        H.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------
# XXH3-64
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_xxh3_64_matches_xxhash_at_path_boundaries(hashing_module: ModuleType, length: int) -> None:
    data = random.Random(length).randbytes(length)
    for seed in SEEDS:
        assert hashing_module.xxh3_64(data, seed) == xxhash.xxh3_64_intdigest(data, seed)


@given(data=st.binary(max_size=1200), seed=st.integers(0, U64_MAX))
def test_xxh3_64_matches_xxhash(hashing_module: ModuleType, data: bytes, seed: int) -> None:
    assert hashing_module.xxh3_64(data, seed) == xxhash.xxh3_64_intdigest(data, seed)


@given(
    length=st.sampled_from(BOUNDARY_LENGTHS) | st.integers(0, 5000),
    fill=st.randoms(use_true_random=False),
    seed=st.integers(0, U64_MAX) | st.sampled_from(SEEDS),
)
def test_xxh3_64_twins_agree(length: int, fill: random.Random, seed: int) -> None:
    data = fill.randbytes(length)
    expected = xxhash.xxh3_64_intdigest(data, seed)
    assert [m.xxh3_64(data, seed) for m in _HASHING_TWINS] == [expected] * len(_HASHING_TWINS)


def test_xxh3_64_reads_any_contiguous_buffer(hashing_module: ModuleType) -> None:
    raw = bytes(range(256)) * 3
    expected = xxhash.xxh3_64_intdigest(raw, 7)
    for buf in (
        raw,
        bytearray(raw),
        memoryview(raw),
        np.frombuffer(raw, np.uint32),
        array("B", raw),
    ):
        assert hashing_module.xxh3_64(buf, 7) == expected
    assert hashing_module.xxh3_64(raw) == xxhash.xxh3_64_intdigest(raw, 0)


@pytest.mark.parametrize(
    ("data", "seed", "error"),
    [
        ("text", 0, TypeError),
        (None, 0, TypeError),
        (12, 0, TypeError),
        (memoryview(b"abcdef")[::2], 0, TypeError),
        (b"x", -1, OverflowError),
        (b"x", 2**64, OverflowError),
        (b"x", 1.0, TypeError),
        (b"x", "1", TypeError),
    ],
)
def test_xxh3_64_errors(data: Any, seed: Any, error: type[Exception]) -> None:
    outcomes = twin_outcomes(lambda m: m.xxh3_64(data, seed))
    assert len(outcomes) == 1
    kind, (exc_type, _message) = outcomes.pop()
    assert kind == "raised" and exc_type is error


# ---------------------------------------------------------------------------
# block hashes and the chain
# ---------------------------------------------------------------------------

tokens_st = st.lists(st.integers(0, U32_MAX), max_size=300) | st.lists(
    st.sampled_from([0, 1, 255, 256, 65535, 65536, U32_MAX]), max_size=80
)


@given(
    tokens=tokens_st,
    size=st.integers(1, 40) | st.sampled_from([60, 61, 64, 256, 257]),
    seed=st.integers(0, U64_MAX),
    eagle=st.booleans(),
)
def test_block_hashes_match_a_naive_implementation(
    tokens: list[int], size: int, seed: int, eagle: bool
) -> None:
    expected = naive_block_hashes(tokens, size, seed, eagle)
    for mod in _HASHING_TWINS:
        got = mod.block_hashes(tokens, size, seed, eagle)
        assert got.dtype == np.uint64
        assert got.tolist() == expected


@given(
    tokens=tokens_st,
    size=st.integers(1, 40) | st.sampled_from([64, 257]),
    seed=st.integers(0, U64_MAX),
    parent=st.none() | st.integers(0, U64_MAX),
)
def test_chained_block_hashes_chain_the_block_hashes(
    tokens: list[int], size: int, seed: int, parent: int | None
) -> None:
    expected = naive_chain(naive_block_hashes(tokens, size, seed), parent)
    for mod in _HASHING_TWINS:
        assert mod.chained_block_hashes(tokens, size, seed, parent).tolist() == expected
        blocks = mod.block_hashes(tokens, size, seed)
        assert mod.sequence_hashes(blocks, parent).tolist() == expected


def test_sequence_hashes_first_key_is_the_block_hash(hashing_module: ModuleType) -> None:
    assert hashing_module.sequence_hashes([]).tolist() == []
    assert hashing_module.sequence_hashes([U64_MAX, 0]).tolist()[0] == U64_MAX
    assert hashing_module.sequence_hashes(np.array([5], np.uint64), parent=9).tolist() == [
        naive_chain([5], 9)[0]
    ]


def test_a_chain_continues_from_any_block(hashing_module: ModuleType) -> None:
    """The event layer hashes an event's tokens from its parent's key: same keys."""
    tokens = sequence("base[:1000]")
    keys = hashing_module.chained_block_hashes(tokens, 16).tolist()
    for k in (1, 7, 30, 61):
        rest = hashing_module.chained_block_hashes(tokens[16 * k :], 16, parent=keys[k - 1])
        assert rest.tolist() == keys[k:]


def test_large_inputs_hashed_without_the_gil_agree(hashing_module: ModuleType) -> None:
    rng = np.random.default_rng(7)
    # > 64 KiB of tokens, and > 64 KiB of hashes for sequence_hashes
    tokens = rng.integers(0, 2**32, size=140_000, dtype=np.uint32)
    expected = naive_block_hashes(tokens.tolist(), 16, 1337)
    assert hashing_module.block_hashes(tokens, 16).tolist() == expected
    assert hashing_module.chained_block_hashes(tokens, 16).tolist() == naive_chain(expected)
    hashes = np.array(expected, np.uint64)
    assert hashing_module.sequence_hashes(hashes).tolist() == naive_chain(expected)


def test_threads_hash_concurrently(hashing_module: ModuleType) -> None:
    rng = np.random.default_rng(8)
    inputs = [rng.integers(0, 2**32, size=40_000, dtype=np.uint32) for _ in range(4)]
    expected = [hashing_module.chained_block_hashes(t, 16).tolist() for t in inputs]
    results: list[list[int]] = [[] for _ in inputs]

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = hashing_module.chained_block_hashes(inputs[i], 16).tolist()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def _token_forms(tokens: list[int]) -> dict[str, Any]:
    arr = np.array(tokens, dtype=np.uint32)
    strided = np.zeros(2 * len(tokens), dtype=np.uint32)
    strided[::2] = arr
    readonly = arr.copy()
    readonly.flags.writeable = False
    return {
        "list": list(tokens),
        "tuple": tuple(tokens),
        "range_like_iter": iter(tokens),
        "uint32": arr,
        "uint32_strided": strided[::2],
        "uint32_readonly": readonly,
        "uint32_big_endian": arr.astype(">u4"),
        "int64": arr.astype(np.int64),
        "uint64": arr.astype(np.uint64),
        "uint16_if_fits": arr.astype(np.uint16) if max(tokens, default=0) < 2**16 else arr,
        "array_I": array("I", tokens),
        "array_L": array("L", tokens),
        "array_q": array("q", tokens),
        "memoryview_I": memoryview(array("I", tokens)),
        "numpy_scalars": [np.int64(t) for t in tokens],
        "bools_and_ints": [bool(t) if t in (0, 1) else t for t in tokens],
    }


@pytest.mark.parametrize("form", list(_token_forms([1])))
def test_every_token_form_gives_the_same_hashes(hashing_module: ModuleType, form: str) -> None:
    tokens = [*sequence("base[:64]"), 0, 1]
    expected = naive_block_hashes(tokens, 16, 1337)
    value = _token_forms(tokens)[form]
    assert hashing_module.block_hashes(value, 16).tolist() == expected
    value = _token_forms(tokens)[form]
    assert hashing_module.chained_block_hashes(value, 16).tolist() == naive_chain(expected)


def test_the_zero_copy_input_is_not_modified(hashing_module: ModuleType) -> None:
    arr = np.array(sequence("base[:64]"), dtype=np.uint32)
    before = arr.copy()
    hashing_module.chained_block_hashes(arr, 16)
    assert (arr == before).all()


def test_fewer_tokens_than_a_block_give_no_hashes(hashing_module: ModuleType) -> None:
    for tokens in ([], [1], list(range(15))):
        assert hashing_module.block_hashes(tokens, 16).tolist() == []
        assert hashing_module.chained_block_hashes(tokens, 16).tolist() == []
    assert hashing_module.block_hashes(list(range(16)), 16, eagle=True).tolist() == []
    assert hashing_module.block_hashes(list(range(17)), 16, eagle=True).size == 1
    assert hashing_module.block_hashes([7], 2**32 - 1).tolist() == []


BAD_TOKENS = [
    ([-1] * 16, OverflowError),
    ([2**32] * 16, OverflowError),
    ([0] * 15 + [2**64], OverflowError),
    ([0, 1, -(2**70)], OverflowError),
    (np.array([1, -5, 2**40]), OverflowError),
    (np.array([2**32], dtype=np.uint64), OverflowError),
    (array("q", [3, -3]), OverflowError),
    (array("Q", [2**40]), OverflowError),
    ("abcdefgh", TypeError),
    (b"abcdefgh", TypeError),
    (bytearray(b"ab"), TypeError),
    (1.5, TypeError),
    (None, TypeError),
    (16, TypeError),
    ([1.0] * 16, TypeError),
    ([1, 2, "3"], TypeError),
    ([[1, 2]], TypeError),
    ([1, None], TypeError),
    (np.array([1.0, 2.0]), TypeError),
    (np.array(["1"]), TypeError),
    (np.array([1], dtype=object), TypeError),
    (array("d", [1.0]), TypeError),
    (np.zeros((2, 16), dtype=np.uint32), ValueError),
]


@pytest.mark.parametrize(("tokens", "error"), BAD_TOKENS, ids=[repr(t)[:30] for t, _ in BAD_TOKENS])
def test_bad_tokens_raise_the_same_error_in_both_twins(tokens: Any, error: type[Exception]) -> None:
    for call in (
        lambda m: m.block_hashes(tokens, 16),
        lambda m: m.block_hashes(tokens, 16, eagle=True),
        lambda m: m.chained_block_hashes(tokens, 16),
    ):
        outcomes = twin_outcomes(call)
        assert len(outcomes) == 1, outcomes
        kind, (exc_type, message) = outcomes.pop()
        assert kind == "raised" and exc_type is error
        assert "tokens" in message


BAD_ARGUMENTS = [
    ({"block_size": 0}, ValueError, "block_size must be positive"),
    ({"block_size": -16}, ValueError, "block_size must be positive"),
    ({"block_size": 2**32}, OverflowError, "block_size"),
    ({"block_size": 16.0}, TypeError, "block_size must be an integer"),
    ({"block_size": "16"}, TypeError, "block_size must be an integer"),
    ({"block_size": None}, TypeError, "block_size must be an integer"),
    ({"seed": -1}, OverflowError, "seed"),
    ({"seed": 2**64}, OverflowError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
]


@pytest.mark.parametrize(("kwargs", "error", "text"), BAD_ARGUMENTS)
def test_bad_arguments_raise_the_same_error_in_both_twins(
    kwargs: dict[str, Any], error: type[Exception], text: str
) -> None:
    args = {"tokens": list(range(32)), "block_size": 16, "seed": 1337} | kwargs
    for name in ("block_hashes", "chained_block_hashes"):
        outcomes = twin_outcomes(lambda m, name=name: getattr(m, name)(**args))
        assert len(outcomes) == 1, outcomes
        kind, (exc_type, message) = outcomes.pop()
        assert kind == "raised" and exc_type is error and text in message


@pytest.mark.parametrize(
    ("hashes", "parent", "error"),
    [
        ([1, -1], None, OverflowError),
        ([2**64], None, OverflowError),
        ([1], -1, OverflowError),
        ([1], 2**64, OverflowError),
        ([1], 1.5, TypeError),
        (["1"], None, TypeError),
        ("12", None, TypeError),
        (np.array([1.0]), None, TypeError),
    ],
)
def test_bad_chain_input_raises_the_same_error_in_both_twins(
    hashes: Any, parent: Any, error: type[Exception]
) -> None:
    outcomes = twin_outcomes(lambda m: m.sequence_hashes(hashes, parent))
    assert len(outcomes) == 1, outcomes
    kind, (exc_type, _message) = outcomes.pop()
    assert kind == "raised" and exc_type is error
    if parent is not None:
        outcomes = twin_outcomes(lambda m: m.chained_block_hashes([1] * 16, 16, 1337, parent))
        assert len(outcomes) == 1
        assert outcomes.pop()[1][0] is error


@given(
    tokens=st.lists(
        st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=2), max_size=40
    ),
    size=st.integers(-3, 20),
    seed=st.integers(-5, 2**64 + 5),
    parent=st.none() | st.integers(-5, 2**64 + 5),
)
def test_twins_agree_on_arbitrary_input(
    tokens: list[Any], size: int, seed: int, parent: Any
) -> None:
    """Out-of-range and mistyped input included: same values or same exceptions."""
    for call in (
        lambda m: m.block_hashes(tokens, size, seed),
        lambda m: m.block_hashes(tokens, size, seed, True),
        lambda m: m.chained_block_hashes(tokens, size, seed, parent),
        lambda m: m.check_block_size(size),
    ):
        assert len(twin_outcomes(call)) == 1


# ---------------------------------------------------------------------------
# Dynamo 1.6.1 vectors, and kvroute's own key
# ---------------------------------------------------------------------------

_DYNAMO = _load("dynamo_vectors.json")["compute_block_hash_for_seq"]


@pytest.mark.parametrize(
    "case",
    _DYNAMO["cases"],
    ids=[f"{c['sequence']}-{c['kv_block_size']}-{c['kwargs']}" for c in _DYNAMO["cases"]],
)
def test_dynamo_vectors(case: dict[str, Any]) -> None:
    tokens = sequence(case["sequence"])
    got = H.dynamo_block_hashes(tokens, case["kv_block_size"], **case["kwargs"])
    assert got.dtype == np.uint64
    assert got.tolist() == case["hashes"]


@pytest.mark.parametrize(
    "case",
    [c for c in _DYNAMO["cases"] if "block_mm_infos" not in c["kwargs"]],
    ids=lambda c: f"{c['sequence']}-{c['kv_block_size']}-{c['kwargs']}",
)
def test_dynamo_vectors_in_both_twins(hashing_module: ModuleType, case: dict[str, Any]) -> None:
    kwargs = case["kwargs"]
    seed = H.dynamo_seed(kwargs.get("lora_name"), kwargs.get("cache_namespace"))
    tokens = np.array(sequence(case["sequence"]), dtype=np.uint32)
    got = hashing_module.block_hashes(
        tokens, case["kv_block_size"], seed, kwargs.get("is_eagle", False)
    )
    assert got.tolist() == case["hashes"]


@pytest.mark.parametrize("case", _DYNAMO["error_cases"], ids=lambda c: c["error"][:40])
def test_dynamo_error_vectors(case: dict[str, Any]) -> None:
    tokens = {"[-1]*16": [-1] * 16, "[4294967296]*16": [2**32] * 16}.get(case["tokens"])
    if tokens is None:
        tokens = sequence(case["tokens"])
    error = {"OverflowError": OverflowError, "ValueError": ValueError}[case["error"].split(":")[0]]
    with pytest.raises(error):
        H.dynamo_block_hashes(tokens, case.get("kv_block_size", 16))
    with pytest.raises(error):
        H.kvroute_block_hashes(tokens, case.get("kv_block_size", 16))


def test_dynamo_seed_arithmetic() -> None:
    lora = xxhash.xxh3_64_intdigest(b"my-lora", 0)
    namespace = xxhash.xxh3_64_intdigest(b"tenant-A", 1)
    assert H.dynamo_seed() == H.DYNAMO_SEED == 1337
    assert H.dynamo_seed("my-lora") == (1337 + lora) % 2**64
    assert H.dynamo_seed(cache_namespace="tenant-A") == (1337 + namespace) % 2**64
    assert H.dynamo_seed("my-lora", "tenant-A") == (1337 + lora + namespace) % 2**64
    assert H.dynamo_seed("", "") == 1337
    with pytest.raises(TypeError, match="lora_name"):
        H.dynamo_seed(b"my-lora")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache_namespace"):
        H.dynamo_block_hashes([1] * 16, 16, cache_namespace=7)  # type: ignore[arg-type]


def test_dynamo_mm_infos() -> None:
    tokens = sequence("base[:64]")
    plain = H.dynamo_block_hashes(tokens, 16)
    # blocks past the end of the list, None entries and empty object lists hash plainly
    assert H.dynamo_block_hashes(tokens, 16, block_mm_infos=[]).tolist() == plain.tolist()
    assert (
        H.dynamo_block_hashes(tokens, 16, block_mm_infos=[None, {"mm_objects": []}]).tolist()
        == plain.tolist()
    )
    # infos beyond the last block are ignored, as in Dynamo
    infos = [None] * 4 + [{"mm_objects": [{"mm_hash": 5}]}]
    assert H.dynamo_block_hashes(tokens, 16, block_mm_infos=infos).tolist() == plain.tolist()
    # the order of the objects does not matter: they are sorted
    a = H.dynamo_block_hashes(
        tokens, 16, block_mm_infos=[{"mm_objects": [{"mm_hash": 1}, {"mm_hash": 2}]}]
    )
    b = H.dynamo_block_hashes(
        tokens, 16, block_mm_infos=[{"mm_objects": [{"mm_hash": 2}, {"mm_hash": 1}]}]
    )
    assert a.tolist() == b.tolist() and a[0] != plain[0] and a[1:].tolist() == plain[1:].tolist()
    data = (
        np.array(tokens[:16], "<u4").tobytes()
        + (1).to_bytes(8, "little")
        + (2).to_bytes(8, "little")
    )
    assert int(a[0]) == xxhash.xxh3_64_intdigest(data, 1337)
    with pytest.raises(TypeError, match="block_mm_infos"):
        H.dynamo_block_hashes(tokens, 16, block_mm_infos=[7])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="block_mm_infos"):
        H.dynamo_block_hashes(tokens, 16, block_mm_infos={"mm_objects": []})  # type: ignore[arg-type]
    with pytest.raises(OverflowError, match="mm_hash"):
        H.dynamo_block_hashes(tokens, 16, block_mm_infos=[{"mm_objects": [{"mm_hash": -1}]}])


def test_dynamo_mm_infos_with_an_iterator_of_tokens() -> None:
    """Regression: the tokens were read twice, so an iterator hashed as empty."""
    tokens = sequence("base[:64]")
    infos = [{"mm_objects": [{"mm_hash": 3}]}]
    expected = H.dynamo_block_hashes(tokens, 16, block_mm_infos=infos).tolist()
    assert H.dynamo_block_hashes(iter(tokens), 16, block_mm_infos=infos).tolist() == expected


def test_dynamo_eagle_with_mm_infos_hashes_the_window() -> None:
    tokens = sequence("base[:65]")
    got = H.dynamo_block_hashes(
        tokens, 16, is_eagle=True, block_mm_infos=[None, {"mm_objects": [{"mm_hash": 9}]}]
    )
    data = np.array(tokens[16:33], "<u4").tobytes() + (9).to_bytes(8, "little")
    assert int(got[1]) == xxhash.xxh3_64_intdigest(data, 1337)


def test_kvroute_keys_are_dynamos_sequence_hashes() -> None:
    tokens = sequence("base[:1000]")
    for kwargs in ({}, {"lora_name": "my-lora"}, {"cache_namespace": "tenant-A"}):
        blocks = H.dynamo_block_hashes(tokens, 16, **kwargs)
        keys = H.kvroute_block_hashes(tokens, 16, **kwargs)
        assert keys.dtype == np.uint64
        assert (
            keys.tolist()
            == H.dynamo_sequence_hashes(blocks).tolist()
            == naive_chain(blocks.tolist())
        )
    assert (
        H.kvroute_block_hashes(tokens, 16, lora_name="a")[0]
        != H.kvroute_block_hashes(tokens, 16)[0]
    )


def test_kvroute_keys_from_an_event_equal_the_requests() -> None:
    """A request and the engine events that store its blocks give the same keys."""
    request = sequence("base[:48]")
    keys = H.kvroute_block_hashes(request, 16, cache_namespace="tenant-A").tolist()
    first = H.kvroute_block_hashes(request[:32], 16, cache_namespace="tenant-A").tolist()
    child = H.kvroute_block_hashes(request[32:48], 16, cache_namespace="tenant-A", parent=first[-1])
    assert first + child.tolist() == keys


def test_kvroute_keys_name_the_whole_prefix() -> None:
    a = sequence("base[:64]")
    b = a[:16] + [7] * 16 + a[32:]
    ka, kb = H.kvroute_block_hashes(a, 16), H.kvroute_block_hashes(b, 16)
    assert ka[0] == kb[0]
    assert all(x != y for x, y in zip(ka[1:].tolist(), kb[1:].tolist(), strict=True))
    # the unchained Dynamo hashes of the last two blocks are equal
    da, db = H.dynamo_block_hashes(a, 16), H.dynamo_block_hashes(b, 16)
    assert da[2:].tolist() == db[2:].tolist()


def test_dynamo_sequence_hashes_continue_from_parent() -> None:
    blocks = H.dynamo_block_hashes(sequence("base[:1000]"), 32)
    seq = H.dynamo_sequence_hashes(blocks)
    assert H.dynamo_sequence_hashes(blocks[5:], parent=int(seq[4])).tolist() == seq[5:].tolist()
    assert H.dynamo_sequence_hashes(array("Q", blocks.tolist())).tolist() == seq.tolist()


@pytest.mark.compare
@given(
    tokens=st.lists(st.integers(0, U32_MAX), max_size=200),
    size=st.integers(1, 40),
    lora=st.none() | st.text(max_size=8),
    namespace=st.none() | st.text(max_size=8),
    eagle=st.booleans(),
)
def test_dynamo_block_hashes_match_dynamo_core(
    tokens: list[int], size: int, lora: str | None, namespace: str | None, eagle: bool
) -> None:
    core = pytest.importorskip("dynamo._core")
    expected = core.compute_block_hash_for_seq(
        tokens, size, lora_name=lora, is_eagle=eagle, cache_namespace=namespace
    )
    got = H.dynamo_block_hashes(
        tokens, size, lora_name=lora, cache_namespace=namespace, is_eagle=eagle
    )
    assert got.tolist() == list(expected)


# ---------------------------------------------------------------------------
# vLLM 0.33.0 vectors
# ---------------------------------------------------------------------------

_VLLM = _load("vllm_block_hashes.json")
_VLLM_LORA = E.VllmLoRA("my-lora", "/models/my-lora")


def _vllm_id(case: dict[str, Any]) -> str:
    return (
        f"{case['hash_algo']}-seed{case['pythonhashseed']}-{case['variant'][:24]}"
        f"-{case['sequence']}-{case.get('block_size')}"
    )


@pytest.mark.parametrize("case", _VLLM["cases"], ids=[_vllm_id(c) for c in _VLLM["cases"]])
def test_vllm_vectors(case: dict[str, Any]) -> None:
    tokens = sequence(case["sequence"])
    variant = case["variant"]
    common: dict[str, Any] = {"algo": case["hash_algo"], "seed": case["pythonhashseed"]}
    if variant.startswith("resolve_block_hashes"):
        fine = E.vllm_block_digests(tokens, 16, **common)
        assert [d.hex() for d in fine] == case["hash_block_size_16_hashes_hex"]
        view = E.vllm_block_digests(tokens, 32, hash_block_size=16, **common)
        assert [d.hex() for d in view] == case["block_size_32_view_hex"]
        return
    if case.get("lora_request"):
        assert case["lora_request"]["lora_name"] == _VLLM_LORA.name
        assert case["lora_request"]["lora_path"] == _VLLM_LORA.path
        common["lora"] = _VLLM_LORA
    if case.get("cache_salt"):
        common["cache_salt"] = case["cache_salt"]
    if variant.startswith("num_hash_lookahead_tokens"):
        common["lookahead_tokens"] = int(variant.split("=")[1])
    digests = E.vllm_block_digests(tokens, case["block_size"], **common)
    assert [d.hex() for d in digests] == case["block_hashes_hex"]
    if "event_block_hashes_int" in case:
        ints = E.vllm_block_hashes(tokens, case["block_size"], **common)
        assert ints.dtype == np.uint64
        assert ints.tolist() == case["event_block_hashes_int"]


@pytest.mark.parametrize(
    ("setting", "algo"),
    [(s, a) for s, table in _VLLM["none_hash"].items() for a in table],
)
def test_vllm_none_hash_vectors(setting: str, algo: str) -> None:
    entry = _VLLM["none_hash"][setting][algo]
    seed = None if setting.endswith("unset") else setting.split("=")[1]
    assert E.vllm_none_hash(algo, seed).hex() == entry["none_hash_hex"]  # type: ignore[arg-type]


@pytest.mark.parametrize("algo", ["xxhash", "xxhash_cbor"])
def test_vllm_xxhash_without_pythonhashseed_is_refused(algo: str) -> None:
    # two engine processes really did disagree
    values = _VLLM["none_hash_random_when_unset"]["values"][algo]
    assert len(set(values)) == len(values) == 2
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        E.vllm_none_hash(algo)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        E.vllm_block_hashes([1] * 16, 16, algo=algo)  # type: ignore[arg-type]


def test_vllm_event_vectors() -> None:
    events = _load("vllm_kv_events.json")
    assert (events["hash_algo"], events["pythonhashseed"], events["block_size"]) == (
        "sha256",
        None,
        16,
    )
    a = E.vllm_block_digests(sequence("base[:48]"), 16)
    assert [d.hex() for d in a] == events["request_A_block_hashes_hex"]
    b = E.vllm_block_digests(
        sequence("base[:32]"), 16, lora=("my-lora", "/models/my-lora"), cache_salt="tenant-A"
    )
    assert [d.hex() for d in b] == events["request_B_block_hashes_hex"]
    stored = {
        batch["name"]: batch["decoded"]["events"][0]
        for batch in events["batches"]
        if batch["decoded"]["events"] and batch["decoded"]["events"][0]["type"] == "BlockStored"
    }
    first = E.vllm_block_hashes(sequence("base[:40]"), 16).tolist()
    assert stored["stored_first_blocks"]["block_hashes"] == first
    child = stored["stored_child_block"]
    assert child["parent_block_hash"] == first[-1]
    assert child["block_hashes"] == E.vllm_block_hashes(sequence("base[:48]"), 16).tolist()[2:]
    lora_salt = E.vllm_block_hashes(
        sequence("base[:32]"), 16, lora=_VLLM_LORA, cache_salt="tenant-A"
    )
    assert stored["stored_lora_salt"]["block_hashes"] == lora_salt.tolist()


def test_vllm_argument_forms() -> None:
    tokens = sequence("base[:64]")
    assert E.vllm_block_digests(tokens, 16, algo="xxhash", seed=42) == E.vllm_block_digests(
        tokens, 16, algo="xxhash", seed="42"
    )
    assert E.vllm_block_digests(
        tokens, 16, lora=("my-lora", "/models/my-lora")
    ) == E.vllm_block_digests(tokens, 16, lora=_VLLM_LORA)
    # an empty salt is no salt; a salt only changes the chain from its first block
    assert E.vllm_block_digests(tokens, 16, cache_salt="") == E.vllm_block_digests(tokens, 16)
    assert (
        E.vllm_block_digests(tokens, 16, cache_salt="s")[0] != E.vllm_block_digests(tokens, 16)[0]
    )
    assert E.vllm_block_digests(np.array(tokens, np.uint32), 16) == E.vllm_block_digests(tokens, 16)
    assert E.vllm_event_hash(bytes(range(32))) == int.from_bytes(bytes(range(24, 32)), "big")


def test_vllm_pickle_does_not_memoise_equal_strings() -> None:
    """Regression: a LoRA whose name is its path, or a salt spelled like a tag, was
    written as a pickle back-reference when the strings were one object."""
    tokens = list(range(16))
    name, path, salt = "".join(["ad", "apter"]), "".join(["adap", "ter"]), "".join(["lo", "ra"])
    assert name is not path
    parent = E.vllm_none_hash("sha256")
    expected = pickle.dumps(
        (parent, tuple(tokens), (("lora", name, path), ("cache_salt", salt))), protocol=5
    )
    import hashlib

    got = E.vllm_block_digests(tokens, 16, lora=("adapter", "adapter"), cache_salt="lora")
    assert got == [hashlib.sha256(expected).digest()]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"algo": "md5"}, ValueError, "algo"),
        ({"algo": 5}, TypeError, "algo"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"lora": "my-lora"}, TypeError, "lora"),
        ({"lora": ("a", "b", "c")}, TypeError, "lora"),
        ({"lora": ("a", 1)}, TypeError, "lora"),
        ({"cache_salt": 5}, TypeError, "cache_salt"),
        ({"lookahead_tokens": -1}, ValueError, "lookahead_tokens"),
        ({"lookahead_tokens": 1.0}, TypeError, "lookahead_tokens"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 24, "hash_block_size": 16}, ValueError, "multiple"),
        ({"hash_block_size": 0}, ValueError, "hash_block_size"),
        ({"tokens": [-1] * 16}, OverflowError, "tokens"),
        ({"tokens": "abc"}, TypeError, "tokens"),
    ],
)
def test_vllm_errors(kwargs: dict[str, Any], error: type[Exception], text: str) -> None:
    args: dict[str, Any] = {"tokens": list(range(32)), "block_size": 16} | kwargs
    for fn in (E.vllm_block_digests, E.vllm_block_hashes):
        with pytest.raises(error, match=text):
            fn(**args)


# ---------------------------------------------------------------------------
# SGLang 0.5.23 vectors
# ---------------------------------------------------------------------------

_SGLANG = _load("sglang_vectors.json")


@pytest.mark.parametrize(
    "case",
    _SGLANG["page_hash_cases"],
    ids=[f"{c['sequence']}-{c['page_size']}" for c in _SGLANG["page_hash_cases"]],
)
def test_sglang_page_hash_vectors(case: dict[str, Any]) -> None:
    tokens, size = sequence(case["sequence"]), case["page_size"]
    digests = E.sglang_page_digests(tokens, size, partial=True)
    assert [d.hex() for d in digests] == case["page_hashes_hex"]
    ints = E.sglang_block_hashes(tokens, size, partial=True)
    assert ints.dtype == np.int64
    assert ints.tolist() == case["event_block_hashes_int64"]
    # without partial=True, only whole pages: what the radix cache inserts
    full = len(tokens) // size
    assert E.sglang_block_hashes(tokens, size).tolist() == case["event_block_hashes_int64"][:full]


def test_sglang_namespace_helpers() -> None:
    helpers = _SGLANG["namespace_helpers"]
    storage = E.sglang_storage_namespace_seed(None, "tenant-A")
    assert storage is not None
    assert storage.hex() == helpers["storage_namespace_seed(None,'tenant-A')"]
    seed = E.sglang_kv_event_namespace_seed(None, "tenant-A")
    assert seed is not None
    assert seed.hex() == helpers["kv_event_namespace_seed(extra_key=None,cache_salt='tenant-A')"]
    lora = E.sglang_kv_event_namespace_seed("lora-x", None)
    assert lora is not None
    assert lora.hex() == helpers["kv_event_namespace_seed(extra_key='lora-x',cache_salt=None)"]
    assert (
        E.sglang_namespaced_block_hash(12345, seed)
        == helpers["namespaced_block_hash(12345, seed(None,'tenant-A'))"]
    )
    assert (
        E.sglang_namespaced_block_hash(-5, seed)
        == helpers["namespaced_block_hash(-5, seed(None,'tenant-A'))"]
    )
    assert E.sglang_kv_event_namespace_seed(None, None) is None
    assert E.sglang_storage_namespace_seed(None, None) is None
    assert E.sglang_kv_event_namespace_seed("", None) != E.sglang_kv_event_namespace_seed(None, "")


_SGLANG_EVENT_ARGS: dict[str, dict[str, Any]] = {
    "stored_chain": {"sequence": "base[:48]", "page_size": 16},
    "stored_cache_salt": {"sequence": "base[:32]", "page_size": 16, "cache_salt": "tenant-A"},
    "stored_lora": {
        "sequence": "base[:32]",
        "page_size": 16,
        "extra_key": "adapter:0123456789abcdef0123456789abcdef",
    },
    "page_size_1": {"sequence": "base[:4]", "page_size": 1},
}


@pytest.mark.parametrize(
    "batch",
    [b for b in _SGLANG["event_batches"] if b["name"].split(":")[-1] in _SGLANG_EVENT_ARGS],
    ids=lambda b: b["name"],
)
def test_sglang_event_vectors(batch: dict[str, Any]) -> None:
    fmt, name = batch["name"].split(":")
    args = dict(_SGLANG_EVENT_ARGS[name])
    tokens = sequence(args.pop("sequence"))
    size = args.pop("page_size")
    (event,) = batch["decoded"][1]
    assert event["token_ids"] == tokens
    got = E.sglang_block_hashes(tokens, size, event_format=fmt, **args)
    assert got.tolist() == event["block_hashes"]


def test_sglang_argument_forms() -> None:
    tokens = sequence("base[:64]")
    assert (
        E.sglang_block_hashes(tokens, 16, cache_salt="").tolist()
        == E.sglang_block_hashes(tokens, 16).tolist()
    )
    assert (
        E.sglang_block_hashes(tokens, 16, extra_key="x").tolist()
        == E.sglang_block_hashes(tokens, 16).tolist()
    )
    assert (
        E.sglang_block_hashes(tokens, 16, event_format="dynamo").tolist()
        == E.sglang_block_hashes(tokens, 16).tolist()
    )
    assert E.sglang_event_hash(bytes([0x80]) + bytes(31)) == -(2**63)
    with pytest.raises(ValueError, match="event_format"):
        E.sglang_block_hashes(tokens, 16, event_format="json")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="page_size"):
        E.sglang_block_hashes(tokens, 0)
    with pytest.raises(TypeError, match="page_size"):
        E.sglang_page_digests(tokens, 1.5)  # type: ignore[arg-type]
    with pytest.raises(OverflowError, match="tokens"):
        E.sglang_block_hashes([2**32], 1)
    with pytest.raises(TypeError, match="cache_salt"):
        E.sglang_block_hashes(tokens, 16, cache_salt=b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="block_hash"):
        E.sglang_namespaced_block_hash(1.5, b"s")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        E.sglang_namespaced_block_hash(2**63, b"s")
    with pytest.raises(TypeError, match="seed"):
        E.sglang_namespaced_block_hash(1, "s")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# errors of the public functions
# ---------------------------------------------------------------------------

PUBLIC_TOKEN_FUNCTIONS: list[Callable[..., Any]] = [
    H.dynamo_block_hashes,
    H.kvroute_block_hashes,
    E.vllm_block_hashes,
    E.vllm_block_digests,
    E.sglang_block_hashes,
    E.sglang_page_digests,
]


@pytest.mark.parametrize("fn", PUBLIC_TOKEN_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("tokens", "size", "error"),
    [
        ([-1] * 16, 16, OverflowError),
        ([2**32] * 16, 16, OverflowError),
        ("abcdefghijklmnop", 16, TypeError),
        ([1.5] * 16, 16, TypeError),
        (list(range(16)), 0, ValueError),
        (list(range(16)), -2, ValueError),
        (list(range(16)), 16.0, TypeError),
        (list(range(16)), "16", TypeError),
    ],
)
def test_public_functions_reject_bad_input(
    fn: Callable[..., Any], tokens: Any, size: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        fn(tokens, size)
