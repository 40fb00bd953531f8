"""Run every check CI runs: lint, types, the tests on both twins, and the packages.

Usage, from a clone after ``pip install -e '.[dev,compare]'``::

    python scripts/check.py            # every step, in this order
    python scripts/check.py ruff mypy  # just these steps

Steps:

``ruff``
    ``ruff check .`` with the rules in pyproject.toml.
``mypy``
    ``mypy`` (strict, on the package; pyproject.toml says so).
``tests``
    ``python -m pytest``: the suite on the compiled cores (benchmarks run once
    each, untimed). tests/test_build.py fails if a compiled core did not load.
``twins``
    ``KVROUTE_NO_EXTENSIONS=1 python -m pytest``: the same suite on the
    pure-Python twins alone, the run the ``pragma: no cover`` branches of
    kvroute/_compat.py name.
``package``
    ``python -m build --no-isolation``: the sdist, then the wheel built from
    the unpacked sdist (so a file missing from the sdist breaks the build).
    The sdist must hold the Cython sources and no generated C; the wheel
    the compiled cores. The wheel is installed, with its two dependencies
    only, into a fresh virtual environment outside the clone, where
    ``import kvroute`` must use the compiled cores, route a request, load
    none of the extras, and run ``kvroute bench``.

Every step runs even after one fails; the exit status is 1 if any failed.
Each step prints its time, and the last line sums them up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

#: The compiled cores: each pair's ``.pyx`` is in the sdist, its module in the wheel.
CORES = ("_index", "_hashing", "_route")
#: What the core must not load (the extras), checked in the installed wheel too.
EXTRAS = ("cbor2", "zmq", "aiohttp", "prometheus_client", "msgspec", "matplotlib")

SMOKE = f"""if True:
    import sys
    import numpy as np
    import kvroute
    from kvroute import Request, Router, kvroute_block_hashes

    assert kvroute.USE_EXTENSIONS, "the wheel's compiled cores did not load"
    assert kvroute.BlockIndex.__module__ == "kvroute._index", kvroute.BlockIndex
    assert "site-packages" in kvroute.__file__, kvroute.__file__
    router = Router(block_size=16, workers=[0, 1, 2, 3])
    prompt = np.arange(4096, dtype=np.uint32)
    router.index.store(2, kvroute_block_hashes(prompt[:2048], 16))
    d = router.route(Request("smoke", tokens=prompt))
    assert (d.worker, d.matched_blocks) == (2, 128), (d.worker, d.matched_blocks)
    router.finished("smoke")
    loaded = sorted(set({EXTRAS!r}) & set(sys.modules))
    assert not loaded, f"import kvroute loaded {{loaded}}"
    print(f"kvroute {{kvroute.__version__}}: compiled cores, routed to worker {{d.worker}}")
"""


def run(cmd: Sequence[str | Path], *, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
    """Run ``cmd`` (printed first), raising CalledProcessError if it fails."""
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the switches that would change what is tested."""
    drop = {"KVROUTE_NO_EXTENSIONS", "KVROUTE_DEBUG_BUILD", "PYTHONPATH", "PYTHONHOME"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def step_ruff() -> None:
    run([PY, "-m", "ruff", "check", "."])


def step_mypy() -> None:
    run([PY, "-m", "mypy"])


def step_tests() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KVROUTE_NO_EXTENSIONS"}
    run([PY, "-m", "pytest"], env=env)


def step_twins() -> None:
    run([PY, "-m", "pytest"], env={**os.environ, "KVROUTE_NO_EXTENSIONS": "1"})


def _check_sdist(path: Path) -> None:
    with tarfile.open(path) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    want = {f"kvroute/{core}.pyx" for core in CORES}
    want |= {"kvroute/_u64map.pxd", "kvroute/_buffers.pxd", "setup.py", "pyproject.toml"}
    want |= {"kvroute/py.typed", "kvroute/data/mooncake_conversation.jsonl.gz"}
    missing = sorted(want - names)
    generated = sorted(n for n in names if n.endswith((".c", ".so", ".pyd", ".html")))
    assert not missing, f"{path.name} lacks {missing}"
    assert not generated, f"{path.name} holds build products {generated}"
    print(f"{path.name}: {len(names)} files, the Cython sources, no build products")


def _check_wheel(path: Path) -> None:
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
    for core in CORES:
        built = [n for n in names if n.startswith(f"kvroute/{core}.") and n.endswith(".so")]
        assert built, f"{path.name} lacks the compiled kvroute.{core}"
    stubs = {f"kvroute/{core}.pyi" for core in CORES} | {"kvroute/py.typed"}
    assert stubs <= names, f"{path.name} lacks {sorted(stubs - names)}"
    assert not [n for n in names if n.endswith(".c")], f"{path.name} holds generated C"
    print(f"{path.name}: {len(names)} files, compiled {', '.join(CORES)}")


def step_package() -> None:
    with tempfile.TemporaryDirectory(prefix="kvroute-check-") as tmp:
        work = Path(tmp)
        dist = work / "dist"
        # the sdist, then the wheel from it; --no-isolation: this environment's
        # setuptools and Cython (the dev extra), so no download is needed
        run([PY, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], env=clean_env())
        (sdist,) = dist.glob("kvroute-*.tar.gz")
        (wheel,) = dist.glob("kvroute-*.whl")
        _check_sdist(sdist)
        _check_wheel(wheel)
        venv = work / "venv"
        run([PY, "-m", "venv", venv], env=clean_env())
        bindir = venv / ("Scripts" if os.name == "nt" else "bin")
        vpy = bindir / "python"
        env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
        run([vpy, "-m", "pip", "install", "--quiet", wheel], env=env, cwd=work)
        # outside the clone, so that its kvroute/ cannot be imported instead
        run([vpy, "-W", "error", "-c", SMOKE], env=env, cwd=work)
        run([bindir / "kvroute", "--help"], env=env, cwd=work)
        run([vpy, "-m", "kvroute", "bench", "--help"], env=env, cwd=work)
        bench = ["bench", "--workload", "synthetic", "--requests", "500", "--residencies", "0"]
        run([vpy, "-m", "kvroute", *bench, "--repeat", "1", "-q"], env=env, cwd=work)


STEPS: dict[str, Callable[[], None]] = {
    "ruff": step_ruff,
    "mypy": step_mypy,
    "tests": step_tests,
    "twins": step_twins,
    "package": step_package,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/check.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "steps", nargs="*", metavar="STEP", help="steps to run (default: all, in this order)"
    )
    args = parser.parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    chosen = args.steps or list(STEPS)
    results: list[tuple[str, bool, float]] = []
    start = time.monotonic()
    for name in chosen:
        print(f"\n=== check: {name}", flush=True)
        t0 = time.monotonic()
        try:
            STEPS[name]()
            ok = True
        except (subprocess.CalledProcessError, AssertionError, ValueError) as e:
            print(f"check: {name} FAILED: {e}", flush=True)
            ok = False
        results.append((name, ok, time.monotonic() - t0))
        print(f"=== check: {name} {'ok' if ok else 'FAILED'} in {results[-1][2]:.0f} s", flush=True)
    total = time.monotonic() - start
    summary = ", ".join(f"{n} {'ok' if ok else 'FAILED'} ({s:.0f} s)" for n, ok, s in results)
    print(f"\ncheck: {summary}; total {total:.0f} s", flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
