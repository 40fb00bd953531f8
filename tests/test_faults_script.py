"""scripts/faults.py, the fault-injection harness, runs (one quick fault) and lists its faults.

The long runs and the figures of docs/reliability.md come from the script;
this keeps it from rotting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "faults.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_harness_lists_every_proxy_fault() -> None:
    out = _run("--list")
    assert out.returncode == 0, out.stderr
    names = {line.split()[0] for line in out.stdout.splitlines()}
    assert names >= {
        "slow-clients", "connection-flood", "big-bodies", "hangup-json", "hangup-stream",
        "worker-5xx", "sigkill", "sigkill-stream", "sigstop", "sigstop-deadline",
    }  # fmt: skip


def test_the_state_faults_are_in_the_same_harness() -> None:
    out = _run("--list")
    assert out.returncode == 0, out.stderr
    sides = dict(line.split()[:2] for line in out.stdout.splitlines())
    state = {
        "restart", "reset", "gap-replay", "gap-no-replay", "junk-frames", "block-size",
        "hash-seed", "silent-removals", "silent-stores", "steady", "sessions",
    }  # fmt: skip
    assert {n for n, side in sides.items() if side == "state"} == state
    assert all(sides[n] == "proxy" for n in ("sigkill", "worker-5xx"))


def test_a_quick_state_fault_runs_and_prints_its_row() -> None:
    out = _run("--quick", "--side", "state", "reset")
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| reset")]
    assert "NOT HELD" not in row and "CRASHED" not in row


def test_a_quick_fault_runs_end_to_end_and_prints_its_row() -> None:
    out = _run("--quick", "hangup-stream")
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| hangup-stream")]
    assert "the worker's request aborted" in row
