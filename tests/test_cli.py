"""The ``kvroute`` command line: exit codes, errors on stderr, --json, on tiny traces.

A few tests run the real entry point (``python -m kvroute``) in a subprocess;
the rest call :func:`kvroute.__main__.main` in-process, which is faster.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kvroute
import kvroute._cli
from kvroute import __main__ as cli
from kvroute import bench

ROOT = Path(__file__).resolve().parents[1]
HAVE_DYNAMO = importlib.util.find_spec("dynamo") is not None

#: Flags that keep a run tiny: one small workload, no memory fill, one round.
FAST = ["--workload", "mooncake", "--residencies", "0", "--repeat", "1"]


def tiny_trace(path: Path, n: int = 60) -> Path:
    """``n`` requests with shared prefixes, enough to fill and evict a small fleet."""
    lines = []
    for i in range(n):
        ids = [0, 1 + i % 5, *range(100 + 10 * i, 104 + 10 * i)]
        lines.append(json.dumps({
            "timestamp": i, "input_length": 512 * len(ids), "output_length": 8, "hash_ids": ids,
        }))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvroute", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_subprocess_bench_writes_json(tmp_path: Path) -> None:
    trace = tiny_trace(tmp_path / "tiny.jsonl")
    out = tmp_path / "out.json"
    p = run_cli("bench", *FAST, "--trace", str(trace), "--workers", "2", "--capacity", "64",
                "--json", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    w = data["workloads"]["mooncake"]
    for key in (
        "block_ops_per_s", "block_ops_per_s_with_removals", "seconds", "peak_sizeof_bytes",
        "bytes_per_residency", "maxrss_bytes", "residencies", "state_ok",
    ):  # fmt: skip
        assert key in w, key
    assert w["ops"]["match"] == 60 and w["blocks"]["query"] == 60 * 6 * 16
    assert w["blocks"]["removed"] > 0  # 2 x 64 blocks is too small for the trace
    assert w["trace"] == str(trace) and w["state_ok"]
    assert data["block_ops_per_s"] == w["block_ops_per_s"]
    assert data["headline_workload"] == "mooncake"
    assert data["index"]["implementation"] in ("compiled", "python")
    assert data["checks_failed"] == [] and "memory" not in data
    # The table goes to stdout, progress to stderr.
    assert "block ops/s" in p.stdout and "building the mooncake op stream" in p.stderr


def test_subprocess_quiet_prints_nothing(tmp_path: Path) -> None:
    trace = tiny_trace(tmp_path / "tiny.jsonl")
    p = run_cli("bench", *FAST, "--trace", str(trace), "-q")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


@pytest.mark.skipif(not HAVE_DYNAMO, reason="needs the 'compare' extra")
@pytest.mark.compare
def test_subprocess_compare(tmp_path: Path) -> None:
    trace = tiny_trace(tmp_path / "tiny.jsonl")
    out = tmp_path / "out.json"
    p = run_cli("bench", *FAST, "--trace", str(trace), "--capacity", "64", "--compare",
                "--json", str(out), "-q")  # fmt: skip
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    c = data["workloads"]["mooncake"]["compare"]
    assert c["mismatches"] == 0 and c["queries_checked"] == 60
    for key in ("block_ops_per_s", "block_ops_per_s_with_removals", "seconds", "ratio"):
        assert key in c, key
    assert data["dynamo_version"]


def test_subprocess_compare_without_dynamo_names_the_extra(tmp_path: Path) -> None:
    # A package named dynamo that fails to import shadows the real one.
    fake = tmp_path / "shadow" / "dynamo"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no dynamo here')\n")
    trace = tiny_trace(tmp_path / "tiny.jsonl")
    p = run_cli("bench", *FAST, "--trace", str(trace), "--compare",
                env={"PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])})  # fmt: skip
    assert p.returncode == 2
    assert "pip install -e '.[compare]'" in p.stderr and p.stdout == ""


def test_subprocess_help_and_version() -> None:
    p = run_cli("--help")
    assert p.returncode == 0 and "bench" in p.stdout
    p = run_cli("bench", "--help")
    assert p.returncode == 0 and "--compare" in p.stdout and "exit status" in p.stdout
    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"kvroute {kvroute.__version__}"


# -- in-process -----------------------------------------------------------


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage: kvroute" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--workload", "nope"],
        ["bench", "--requests", "0"],
        ["bench", "--workers", "x"],
        ["bench", "--residencies", "-1"],
        ["bench", "--index", "fortran"],
        ["bench", "--unknown"],
    ],
)
def test_bad_options_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kvroute bench" in err and "error:" in err


def test_malformed_trace_exits_2_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1]}\n'
                     '{"timestamp": 1, "input_length": 1, "output_length": 1}\n')  # fmt: skip
    assert cli.main(["bench", *FAST, "--trace", str(trace)]) == 2
    out, err = capsys.readouterr()
    assert f"kvroute bench: error: cannot read the trace: {trace}:2: missing" in err
    assert out == ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trace", "/nonexistent/trace.jsonl"], "cannot read the trace"),
        (["--json", "/nonexistent/dir/out.json"], "does not exist"),
        (["--capacity", "8"], "must be at least --blocks-per-hash"),
    ],
)
def test_input_errors_exit_2(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", *FAST, "--trace", str(tiny_trace(tmp_path / "t.jsonl")), *extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_empty_trace_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    assert cli.main(["bench", *FAST, "--trace", str(tmp_path / "empty.jsonl")]) == 2
    assert "no requests" in capsys.readouterr().err


def test_failed_check_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.timing, "verify_state", lambda *_args: False)
    out = tmp_path / "out.json"
    args = ["bench", *FAST, "--trace", str(tiny_trace(tmp_path / "t.jsonl")), "--json", str(out)]
    assert cli.main(args) == 1
    assert "check failed: mooncake" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["workloads"]["mooncake"]["state_ok"] is False and data["checks_failed"]


def test_every_workload_and_memory_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    args = ["bench", "--requests", "40", "--residencies", "3000", "--churn-rounds", "1",
            "--repeat", "1", "--index", "python", "--engine-hashes",
            "--json", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    data: dict[str, Any] = json.loads(out.read_text())
    assert list(data["workloads"]) == ["mooncake", "synthetic", "miss-heavy"]
    assert data["workloads"]["synthetic"]["workers"] == 256
    assert data["workloads"]["synthetic"]["capacity_blocks"] == 2048
    assert all(w["engine_hashes"] for w in data["workloads"].values())
    assert set(data["memory"]) == {"kvroute keys", "engine hashes"}
    assert data["bytes_per_residency"] == data["memory"]["kvroute keys"]["bytes_per_residency"]
    assert data["index"] == {"implementation": "python", "module": "kvroute._index_py"}
    text = capsys.readouterr().out
    assert "synthetic" in text and "miss-heavy" in text and "engine hashes" in text


def test_python_index_defaults_are_reduced(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    args = ["bench", "--workload", "mooncake", "--requests", "20", "--index", "python",
            "--residencies", "1000", "--json", str(out), "-q"]  # fmt: skip
    assert cli.main(args) == 0
    data = json.loads(out.read_text())
    assert data["workloads"]["mooncake"]["repeat"] == 1
    # --residencies was explicit, so no note about its default; engine-hash memory skipped.
    assert list(data["memory"]) == ["kvroute keys"]
    assert any("engine hashes skipped" in n for n in data["notes"])


def test_commands_table_drives_the_parser() -> None:
    parser = cli.build_parser()
    names = {c.name for c in cli.COMMANDS}
    assert names == {"bench", "replay", "proxy", "mock-worker"}
    required = {"replay": ["default"], "proxy": ["--worker", "http://127.0.0.1:1"]}
    for cmd in cli.COMMANDS:
        argv = [cmd.name, *required.get(cmd.name, [])]
        assert parser.parse_args(argv)._run is cmd.run


def test_replay_reports_bad_input_as_usage_errors(tmp_path: Path) -> None:
    missing = run_cli("replay", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "No such file" in missing.stderr
    unknown = run_cli("replay", "default", "--policy", "nosuch", "--limit", "5")
    assert unknown.returncode == 2
    assert "unknown routing policy 'nosuch'" in unknown.stderr


def test_replay_writes_json_per_policy(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = run_cli(
        "replay",
        "default",
        "--policy",
        "round_robin,kvroute",
        "--limit",
        "200",
        "--workers",
        "4",
        "--gpu-blocks",
        "256",
        "--json",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    policies = doc["results"]["policies"]
    assert set(policies) == {"round_robin", "kvroute"}
    for figures in policies.values():
        # each figure once (issue 14): the mean and p99 TTFT live in ttft_ms only
        for path in (
            "prefix_reuse",
            "ttft_ms.mean",
            "ttft_ms.p99",
            "throughput.output_tokens_per_s",
        ):
            value: Any = figures
            for key in path.split("."):
                value = value[key]
            assert isinstance(value, float)


def test_shared_cli_helpers_doctests() -> None:
    result = doctest.testmod(kvroute._cli)
    assert result.attempted > 0 and result.failed == 0
