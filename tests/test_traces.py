"""The Mooncake-format trace loader: good rows, gzip, the bundled trace, malformed rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kvroute.traces import DEFAULT_TRACE, TraceError, TraceRequest, iter_trace, load_trace

ROWS = [
    {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [0, 1]},
    {"timestamp": 5.5, "input_length": 1536, "output_length": 0, "hash_ids": [0, 1, 2],
     "session_id": "s-1"},
    {"timestamp": 9, "input_length": 0, "output_length": 3, "hash_ids": [],
     "session_id": 42, "extra": "ignored"},
    {"timestamp": 9, "input_length": 512, "output_length": 3, "hash_ids": [2**64 - 1]},
]  # fmt: skip

EXPECTED = [
    TraceRequest(0, 1024, 10, (0, 1)),
    TraceRequest(5.5, 1536, 0, (0, 1, 2), "s-1"),
    TraceRequest(9, 0, 3, (), "42"),
    TraceRequest(9, 512, 3, (2**64 - 1,)),
]


def write(path: Path, lines: list[str], *, compress: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def good_lines() -> list[str]:
    return [json.dumps(r) for r in ROWS]


def test_reads_good_rows(tmp_path: Path) -> None:
    assert load_trace(write(tmp_path / "t.jsonl", good_lines())) == EXPECTED


def test_reads_gzip_whatever_the_name(tmp_path: Path) -> None:
    gz = write(tmp_path / "t.jsonl.gz", good_lines(), compress=True)
    renamed = write(tmp_path / "looks-plain.jsonl", good_lines(), compress=True)
    assert load_trace(gz) == EXPECTED
    assert load_trace(renamed) == EXPECTED


def test_skips_blank_lines_and_accepts_str_paths(tmp_path: Path) -> None:
    lines = ["", good_lines()[0], "   ", good_lines()[1], ""]
    assert load_trace(str(write(tmp_path / "t.jsonl", lines))) == EXPECTED[:2]


def test_limit_stops_early(tmp_path: Path) -> None:
    # The bad third line is never read: limit stops before it.
    path = write(tmp_path / "t.jsonl", [*good_lines()[:2], "not json"])
    assert load_trace(path, limit=2) == EXPECTED[:2]
    assert load_trace(path, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        load_trace(path, limit=-1)


def test_iter_trace_is_lazy(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [good_lines()[0], "not json"])
    it = iter_trace(path)
    assert next(it) == EXPECTED[0]
    with pytest.raises(TraceError):
        next(it)


def test_bundled_trace() -> None:
    rows = load_trace()
    assert len(rows) == 12_031
    assert rows[0] == TraceRequest(0, 6758, 500, tuple(range(14)))
    assert sum(len(r.hash_ids) for r in rows) == 288_500
    assert all(r.session_id is None for r in rows)
    assert DEFAULT_TRACE.endswith(".gz")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"not valid JSON"),
        ("[1, 2]", r"expected a JSON object, got list"),
        ('{"input_length": 1, "output_length": 1, "hash_ids": []}', r"missing .*'timestamp'"),
        ('{"timestamp": 0, "output_length": 1, "hash_ids": []}', r"missing .*'input_length'"),
        ('{"timestamp": 0, "input_length": 1, "hash_ids": []}', r"missing .*'output_length'"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1}', r"missing .*'hash_ids'"),
        ('{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": []}',
         r"'timestamp' must be a non-negative number"),
        ('{"timestamp": "0", "input_length": 1, "output_length": 1, "hash_ids": []}',
         r"'timestamp' must be a non-negative number"),
        ('{"timestamp": NaN, "input_length": 1, "output_length": 1, "hash_ids": []}',
         r"'timestamp' must be a non-negative number"),
        ('{"timestamp": 0, "input_length": 1.5, "output_length": 1, "hash_ids": []}',
         r"'input_length' must be a non-negative integer"),
        ('{"timestamp": 0, "input_length": true, "output_length": 1, "hash_ids": []}',
         r"'input_length' must be a non-negative integer"),
        ('{"timestamp": 0, "input_length": 1, "output_length": -3, "hash_ids": []}',
         r"'output_length' must be a non-negative integer"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": "0,1"}',
         r"'hash_ids' must be a list"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0, -1]}',
         r"hash_ids\[1\] must be an integer in \[0, 2\*\*64\)"),
        (f'{{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [{2**64}]}}',
         r"hash_ids\[0\] must be an integer"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1.0]}',
         r"hash_ids\[0\] must be an integer"),
        ('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [],'
         ' "session_id": []}',
         r"'session_id' must be a string or an integer"),
    ],
)  # fmt: skip
def test_malformed_row_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    # Line 1 good, line 2 blank, line 3 bad: the count includes blank lines.
    path = write(tmp_path / "bad.jsonl", [good_lines()[0], "", line])
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_malformed_row_in_gzip_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl.gz", [good_lines()[0], "{oops"], compress=True)
    with pytest.raises(TraceError, match=r"bad\.jsonl\.gz:2: not valid JSON"):
        load_trace(path)


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good_lines()[0].encode() + b"\n" + b'{"timestamp": "\xff"}\n')
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: not UTF-8"):
        load_trace(path)


def test_truncated_gzip_is_a_trace_error(tmp_path: Path) -> None:
    data = gzip.compress("".join(line + "\n" for line in good_lines() * 50).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="corrupt gzip stream"):
        load_trace(path)


def test_trace_error_is_a_value_error() -> None:
    assert issubclass(TraceError, ValueError)


def test_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "nope.jsonl")
