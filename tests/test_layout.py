"""README's Layout section names every module of the package, and nothing that is gone.

The section is a tree: a line per file or folder, indented under its folder,
its name first, then two or more spaces and what it does. Every ``.py``,
``.pyx`` and ``.pxd`` file under ``kvroute/`` needs its line; a subpackage's
``__init__.py`` is its folder's line. A module added without a line fails with
the module's path, so whoever adds it writes the line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (".py", ".pyx", ".pxd")


def layout_names(readme: str) -> set[str]:
    """The paths the README's Layout section names: ``kvroute/sim/``, ``kvroute/sim/cli.py``...

    :param readme: the README's text.
    :returns: folder paths end in ``/``.
    :raises ValueError: the README has no Layout section with a code block.
    """
    m = re.search(r"^## Layout\n(.*?)^```\n(.*?)^```", readme, re.S | re.M)
    if m is None:
        raise ValueError("README.md has no '## Layout' section with a ``` block")
    names: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, path) of the enclosing folders
    for line in m.group(2).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = (folders[-1][1] if folders else "") + name
        names.add(path)
        if name.endswith("/"):
            folders.append((indent, path))
    return names


def package_modules(root: Path, package: str = "kvroute") -> set[str]:
    """What the Layout section must name: every source file, a subpackage by its folder.

    :param root: the repository (the folder holding ``package``).
    :param package: the package's folder name.
    :returns: paths relative to ``root``, folders ending in ``/``.
    """
    out: set[str] = set()
    for path in (root / package).rglob("*"):
        if "__pycache__" in path.parts or path.suffix not in SOURCES:
            continue
        rel = path.relative_to(root)
        if path.name == "__init__.py" and rel.parent != Path(package):
            out.add(rel.parent.as_posix() + "/")  # a subpackage: its folder's line
        else:
            out.add(rel.as_posix())
    return out


def layout_problems(root: Path, package: str = "kvroute") -> list[str]:
    """Each module the README does not name, and each name under the package that is gone.

    :param root: the repository, holding ``README.md`` and ``package``.
    :param package: the package's folder name.
    :returns: one sentence per problem, naming the path; empty when they agree.
    """
    named = layout_names((root / "README.md").read_text(encoding="utf-8"))
    modules = package_modules(root, package)
    problems = [
        f"README.md's Layout section does not name {m}: add a line for it under"
        f" {m.rstrip('/').rpartition('/')[0]}/ saying what it does"
        for m in sorted(modules - named)
    ]
    for name in sorted(named):
        if name.startswith(package + "/") and not (root / name).exists():
            problems.append(f"README.md's Layout section names {name}, which does not exist")
    return problems


def test_readme_layout_names_every_module() -> None:
    problems = layout_problems(ROOT)
    assert not problems, "\n".join(problems)


# -- the check itself, on a small made-up package ----------------------------------


README = """# pkg

## Layout

```
kvroute/          the library
  __init__.py     the public API
  router.py       the router
  sim/            the simulator
    cli.py        its command
  data/           a trace
tests/            tests
```
"""


def make_tree(tmp_path: Path, readme: str, files: list[str]) -> Path:
    (tmp_path / "README.md").write_text(readme)
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    return tmp_path


BASE = ["kvroute/__init__.py", "kvroute/router.py", "kvroute/sim/__init__.py",
        "kvroute/sim/cli.py", "kvroute/data/trace.jsonl.gz"]  # fmt: skip


def test_a_tree_that_matches_has_no_problems(tmp_path: Path) -> None:
    assert layout_problems(make_tree(tmp_path, README, BASE)) == []


@pytest.mark.parametrize(
    ("extra", "missing"),
    [
        ("kvroute/admission.py", "kvroute/admission.py"),
        ("kvroute/_route.pyx", "kvroute/_route.pyx"),
        ("kvroute/_u64map.pxd", "kvroute/_u64map.pxd"),
        ("kvroute/sim/prefix_cache.py", "kvroute/sim/prefix_cache.py"),
        ("kvroute/proxy/__init__.py", "kvroute/proxy/"),
        ("kvroute/events/engine_hashes.py", "kvroute/events/engine_hashes.py"),
    ],
)
def test_a_module_without_a_line_is_named(tmp_path: Path, extra: str, missing: str) -> None:
    problems = layout_problems(make_tree(tmp_path, README, [*BASE, extra]))
    assert len(problems) == 1 and f"does not name {missing}:" in problems[0], problems


def test_a_line_for_a_module_that_is_gone_is_named(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, README, [f for f in BASE if f != "kvroute/sim/cli.py"])
    assert layout_problems(tree) == [
        "README.md's Layout section names kvroute/sim/cli.py, which does not exist"
    ]


def test_a_module_listed_under_the_wrong_folder_is_caught(tmp_path: Path) -> None:
    # cli.py at the package root, not under sim/: both directions complain.
    readme = README.replace("    cli.py        its command\n", "  cli.py          its command\n")
    problems = layout_problems(make_tree(tmp_path, readme, BASE))
    assert any("does not name kvroute/sim/cli.py" in p for p in problems)
    assert any("names kvroute/cli.py, which does not exist" in p for p in problems)
