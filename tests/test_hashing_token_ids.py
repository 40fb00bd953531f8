"""``token_ids_array``: a JSON array of token ids read straight into uint32.

Both twins (ids c / py) against ``json.loads``: the same ids for every array
of the strict form, None for anything else, never an exception but
``TypeError`` for a non-buffer.
"""

from __future__ import annotations

import json
from array import array
from types import ModuleType

import msgspec
import numpy as np
import pytest
from helpers import twin_ids, twins
from hypothesis import given
from hypothesis import strategies as st

import kvroute.hashing as H

U32_MAX = 2**32 - 1
_HASHING_TWINS = twins("_hashing")


@pytest.fixture(scope="module", params=_HASHING_TWINS, ids=twin_ids(_HASHING_TWINS))
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


def _all(text: bytes) -> list[object]:
    """What every twin answers for ``text`` (as lists, for comparing)."""
    out: list[object] = []
    for m in _HASHING_TWINS:
        got = m.token_ids_array(text)
        if got is not None:
            assert got.dtype == np.uint32 and got.ndim == 1
            got = got.tolist()
        out.append(got)
    return out


_WS = st.sampled_from(["", " ", "\t", "\n", "\r", "  ", "\r\n  "])


@st.composite
def _id_arrays(draw: st.DrawFn) -> tuple[list[int], bytes]:
    """Valid arrays of u32 ids, written with JSON whitespace anywhere it may go."""
    # ids of up to 7 digits with 8 bytes after their start are read a word at a time
    small = st.integers(0, 9_999_999) | st.sampled_from([0, 1, 9, 10, 99, 100, 9_999_999])
    big = st.integers(10_000_000, U32_MAX) | st.sampled_from([10_000_000, U32_MAX])
    ids = draw(st.lists(small | big))
    parts = [draw(_WS), "[", draw(_WS)]
    for k, t in enumerate(ids):
        if k:
            parts += [draw(_WS), ",", draw(_WS)]
        parts.append(str(t))
    parts += [draw(_WS), "]", draw(_WS)]
    return ids, "".join(parts).encode()


@given(_id_arrays())
def test_valid_arrays_read_as_json_does(case: tuple[list[int], bytes]) -> None:
    ids, text = case
    assert json.loads(text) == ids
    assert _all(text) == [ids] * len(_HASHING_TWINS)


# texts made of the characters that matter, valid or not
_NEAR_JSON = st.text(alphabet="[]0123456789,-+.eE \t\n\r\x0b\x0cxn", max_size=40).map(str.encode)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid array with one character inserted, replaced or dropped."""
    _, text = draw(_id_arrays())
    at = draw(st.integers(0, len(text)))
    char = draw(st.sampled_from(list(b"[]0123456789,-+.eE \t\x0bn"))).to_bytes(1, "big")
    how = draw(st.sampled_from(["insert", "replace", "drop"]))
    if how == "insert":
        return text[:at] + char + text[at:]
    return text[:at] + (char if how == "replace" else b"") + text[at + 1 :]


@given(_NEAR_JSON | st.binary(max_size=40) | _mutated())
def test_the_twins_agree_and_read_only_what_json_reads(text: bytes) -> None:
    answers = _all(text)
    assert all(a == answers[0] for a in answers), (text, answers)
    got = answers[0]
    try:  # as UTF-8: json.loads would also guess UTF-16 and UTF-32 from bytes
        expected = json.loads(text.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        expected = None
    if got is not None:
        assert got == expected
    elif b"-" not in text:  # json.loads also reads "-0" as 0; the strict form does not
        # json.loads read a list of u32 ints: then the parser must have too
        assert not (
            isinstance(expected, list)
            and all(type(t) is int and 0 <= t <= U32_MAX for t in expected)
        ), text


@pytest.mark.parametrize(
    "text",
    [
        b"", b" ", b"[", b"]", b"[,]", b"[1,]", b"[,1]", b"[1,,2]", b"[1 2]", b"[1]]", b"[[1]]",
        b"[1][2]", b"[-1]", b"[-0]", b"[+1]", b"[01]", b"[00]", b"[1.0]", b"[1e3]", b"[1E3]",
        b"[0x10]", b"[4294967296]", b"[99999999999999999999]", b"[" + b"9" * 5000 + b"]",
        b"[null]", b"[true]", b'["1"]', b"null", b"1", b"{}", b'{"a": 1}', b"[1]x",
        b"[\x0b1]", b"[\x0c1]", b"[\xc2\xa01]", b"\xef\xbb\xbf[1]", b"[\xd9\xa1]", b"[1\x00]",
        "[1]".encode("utf-16"),
    ],
)  # fmt: skip
def test_anything_else_is_none(mod: ModuleType, text: bytes) -> None:
    assert mod.token_ids_array(text) is None


@pytest.mark.parametrize(
    "bad",
    [b"01", b"00", b"-1", b"-0", b"+1", b"1.0", b"1e3", b"0x1", b"4294967296", b"12345678901",
     b"1-2", b"1 2", b"1]", b"[1", b"", b"\xd9\xa1", b"1\x001", b"7/", b"7:"],
)  # fmt: skip
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_bad_id_in_a_long_array_is_none(mod: ModuleType, bad: bytes, where: str) -> None:
    # room for a word read at every position, and none at the end
    good = [b"1234567", b"0", b"89"]
    items = {"first": [bad, *good], "middle": [*good, bad, *good], "last": [*good, bad]}[where]
    assert mod.token_ids_array(b"[" + b", ".join(items) + b"]") is None
    assert mod.token_ids_array(b"[" + b",".join(items) + b"]") is None


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        (b"[]", []), (b" [ ] ", []), (b"[0]", [0]), (b"[4294967295]", [U32_MAX]),
        (b"\t[1\n,\r2 ]\n", [1, 2]), (b"[10,0,100]", [10, 0, 100]),
        (b"[9999999,10000000,99999999,4294967295,0,1]",
         [9_999_999, 10_000_000, 99_999_999, U32_MAX, 0, 1]),
        (b"[1234567,7654321]   ", [1_234_567, 7_654_321]),
    ],
)  # fmt: skip
def test_edges(mod: ModuleType, text: bytes, ids: list[int]) -> None:
    got = mod.token_ids_array(text)
    assert got is not None and got.dtype == np.uint32 and got.tolist() == ids


def test_any_contiguous_buffer_and_a_type_error_for_the_rest(mod: ModuleType) -> None:
    text = b"[3, 1, 4]"
    raw = msgspec.json.decode(b'{"token_ids": [3, 1, 4]}', type=dict[str, msgspec.Raw])
    for data in (text, bytearray(text), memoryview(text), raw["token_ids"],
                 np.frombuffer(text, np.uint8), array("b", text)):  # fmt: skip
        got = mod.token_ids_array(data)
        assert got is not None and got.tolist() == [3, 1, 4], type(data)
    for bad in ("[1]", 1, None, [1], memoryview(b"[1, 2]")[::2]):
        with pytest.raises(TypeError):
            mod.token_ids_array(bad)


@pytest.mark.parametrize("n", [1, 4_000, 50_000])
def test_a_long_prompt(mod: ModuleType, n: int) -> None:
    # 50,000 ids are past 64 KiB: the compiled parser runs without the GIL
    ids = np.random.default_rng(n).integers(0, 151_936, size=n, dtype=np.uint32)
    text = json.dumps(ids.tolist()).encode()
    got = mod.token_ids_array(text)
    assert got is not None and got.dtype == np.uint32 and np.array_equal(got, ids)
    assert mod.token_ids_array(text[:-1]) is None  # cut short
    assert mod.token_ids_array(text[:-1] + b", -1]") is None  # bad at the very end


def test_the_public_name_is_the_chosen_twin() -> None:
    assert H.token_ids_array(b"[7]").tolist() == [7]
    assert "token_ids_array" in H.__all__
