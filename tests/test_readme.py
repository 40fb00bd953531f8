"""The README's Python examples run as written, and say what they print."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs_and_its_comments_hold(code: str) -> None:
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    # A line ending in "# <literal>" states the value of its expression.
    for line in code.splitlines():
        m = re.match(r"^(\S[^#=]*?)\s+#\s+(\{.*\}|\(.*\))\s*$", line)
        if m:
            assert eval(m.group(1), namespace) == eval(m.group(2)), line
