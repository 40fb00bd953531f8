"""The Python snippets of README.md and docs/*.md run as written, and say what they print.

Every fenced block whose language is ``python`` runs alone in a fresh
interpreter, with warnings as errors, from an empty directory. A line ending
in ``# <literal>`` (a dict or a tuple) states the value of its expression, and
is checked. A block that is not meant to run alone (it names things defined
elsewhere, or needs a real fleet or network) says so in its info string,
```` ```python fragment ````, and is only compiled. Any other Python block
that raises fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = frozenset({"python", "py", "python3"})
FENCE = re.compile(r"^```(\S*)[ \t]*(.*)$")


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block of a page."""

    page: Path
    line: int  # of its first code line
    code: str
    fragment: bool

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    """The Python blocks of ``page``, in order."""
    out: list[Snippet] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):  # prose, or a closing or plain fence
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m.group(1).lower() in PYTHON:
            code = "\n".join(lines[i + 1 : end]) + "\n"
            out.append(Snippet(page, i + 2, code, "fragment" in m.group(2).split()))
        i = end + 1
    return out


SNIPPETS = [s for page in PAGES for s in snippets(page)]
RUNNABLE = [s for s in SNIPPETS if not s.fragment]
FRAGMENTS = [s for s in SNIPPETS if s.fragment]

# Run in the child: the snippet (on stdin) statement by statement in a fresh
# namespace; an expression statement whose line ends in a comment that is a
# dict or tuple literal is evaluated and compared with it, at that point.
# Compiled with the page's name and line numbers, so a traceback points into
# the page.
CHILD = r"""if True:
    import ast, re, sys
    name, first = sys.argv[1], int(sys.argv[2])
    code = "\n" * (first - 1) + sys.stdin.read()
    lines = code.splitlines()
    namespace = {"__name__": "__main__"}
    for node in ast.parse(code, name).body:
        m = re.search(r"\s#\s+(\{.*\}|\(.*\))\s*$", lines[node.end_lineno - 1])
        try:
            want = ast.literal_eval(m.group(1)) if m else None
        except (ValueError, SyntaxError):  # prose in parentheses, not a value
            m = None
        if m and isinstance(node, ast.Expr):
            got = eval(compile(ast.Expression(node.value), name, "eval"), namespace)
            assert got == want, f"{name}:{node.lineno}: {got!r} is not {want!r}"
        else:
            exec(compile(ast.Module([node], []), name, "exec"), namespace)
"""

#: Hosts a runnable snippet may name: this machine (CI reaches nothing else).
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|localhost|\[?::1\]?)$")
HOSTS = re.compile(r"(?:[a-z]+://)([^/:\s\"']+)|\b(\d{1,3}(?:\.\d{1,3}){3})\b")


def foreign_hosts(code: str) -> set[str]:
    """Hosts (in URLs, or IPv4 addresses) that ``code`` names and that are not loopback."""
    found = {a or b for a, b in HOSTS.findall(code)}
    return {h for h in found if not LOOPBACK.match(h)}


def test_the_pages_have_python_snippets() -> None:
    assert len(snippets(ROOT / "README.md")) >= 2
    assert len(RUNNABLE) >= 5 and FRAGMENTS


def test_runnable_snippets_name_no_host_but_this_machine() -> None:
    assert foreign_hosts("connect('tcp://10.0.0.5:5557'); url = 'http://proxy-host:8080'") == {
        "10.0.0.5",
        "proxy-host",
    }
    assert not foreign_hosts("engine.url + 'http://127.0.0.1:8000/v1' 'tcp://localhost:5'")
    for snippet in RUNNABLE:
        assert not foreign_hosts(snippet.code), snippet.id


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.id for s in RUNNABLE])
def test_snippet_runs_and_its_comments_hold(snippet: Snippet, tmp_path: Path) -> None:
    # a snippet that would reach a real fleet is a fragment: never run it
    assert not foreign_hosts(snippet.code), f"{snippet.id} names {foreign_hosts(snippet.code)}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["MPLBACKEND"] = "Agg"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", CHILD, str(snippet.page), str(snippet.line)],
        input=snippet.code, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("snippet", FRAGMENTS, ids=[s.id for s in FRAGMENTS])
def test_fragment_compiles(snippet: Snippet) -> None:
    compile(snippet.code, snippet.id, "exec")


def test_an_unmarked_snippet_that_raises_is_caught(tmp_path: Path) -> None:
    # the harness itself: a failing block, and a false comment, do fail
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\nundefined_name\n```\n\n```python fragment\nundefined_name\n```\n"
        "\n```py\n(1, 2)  # (1, 3)\n```\n```sh\nfalse\n```\n"
    )
    bad, fragment, wrong = snippets(page)
    assert not bad.fragment and fragment.fragment and not wrong.fragment
    for snippet in (bad, wrong):
        with pytest.raises(AssertionError, match=r"NameError|\(1, 2\) is not \(1, 3\)"):
            test_snippet_runs_and_its_comments_hold(snippet, tmp_path)
    test_fragment_compiles(fragment)
