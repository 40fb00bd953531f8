"""The proxy process's garbage-collector tuning (kvroute.proxy.serving.tune_gc, --gc-threshold)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from kvroute import __main__ as cli
from kvroute.proxy import serving
from kvroute.proxy.config import DEFAULT_GC_THRESHOLD


@pytest.fixture
def gc_state() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_tune_gc_freezes_the_heap_and_raises_only_the_young_threshold(gc_state: None) -> None:
    gc.set_threshold(700, 11, 12)
    assert gc.get_freeze_count() == 0
    serving.tune_gc(5_000)
    assert gc.get_threshold() == (5_000, 11, 12)
    assert gc.get_freeze_count() > 0  # what lived at start-up is out of the collector's way


def test_tune_gc_refuses_a_threshold_that_is_not_positive(gc_state: None) -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="must be > 0"):
        serving.tune_gc(0)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [((), DEFAULT_GC_THRESHOLD), (("--gc-threshold", "0"), 0), (("--gc-threshold", "900"), 900)],
)
def test_the_command_hands_its_gc_threshold_to_serve(
    monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...], expected: int
) -> None:
    got: dict[str, Any] = {}

    async def fake_serve(proxy: Any, host: str, port: int, **kw: Any) -> None:
        got.update(kw)

    monkeypatch.setattr(serving, "serve", fake_serve)
    argv = ["proxy", "--worker", "http://127.0.0.1:9", *flags]
    assert cli.main(argv) == 0
    assert got["gc_threshold"] == expected


def test_a_negative_gc_threshold_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["proxy", "--worker", "http://127.0.0.1:9", "--gc-threshold", "-1"])
    assert e.value.code == 2
    assert "--gc-threshold" in capsys.readouterr().err
