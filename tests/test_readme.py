"""The README's promise to a newcomer: two commands, run by CI, with torch pinned, and docs that exist.

- the README's first code block is exactly ``make demo`` and ``make test``;
- ``.ci/run`` calls ``make test`` under ``set -euo pipefail``;
- ``make test`` installs ``torch==2.13.0`` before the package, then runs pytest (read from ``make -n``,
  so it is make's own order of the recipes, not the order they are written in);
- every relative link in the README, CONTRIBUTING.md and docs/*.md points at a file that exists;
- the README stays under 300 lines, without commit hashes or issue numbers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
TORCH_PIN = "torch==2.13.0"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _code_blocks(text: str) -> list[list[str]]:
    """Each fenced code block's lines, without comments and blank lines."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    return [[line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
            for block in blocks]


def test_the_readme_opens_with_the_two_commands():
    text = _readme()
    first = _code_blocks(text)[0]
    assert first == ["make demo", "make test"], f"the README's first code block is {first}"
    # ... and they come before anything else a newcomer might try.
    assert text.index("make demo") < len(text) // 8


def test_ci_calls_make_test():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.split("#", 1)[0].strip() for line in ci.splitlines()]
    commands = [c for c in commands if c]
    assert "set -euo pipefail" in commands, ".ci/run must stop at the first failure"
    assert "make test" in commands, ".ci/run does not call `make test`"
    # Nothing may swallow a failure of make test (pytest's exit code 5, no tests collected, included).
    assert not any(c.startswith("make test") and ("||" in c or "; true" in c) for c in commands)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make (apt-get install make)")
def test_make_test_pins_torch_before_the_package(tmp_path: Path):
    # A venv path that does not exist makes every set-up step due, so `make -n` lists them all in order.
    out = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"`make -n test` runs nothing matching {pattern!r}:\n{out.stdout}"
        return found[0]

    venv = first(r"-m venv ")
    torch = first(r"pip install .*" + re.escape(TORCH_PIN))
    package = first(r"""pip install -e ["']?\.\[dev\]""")
    pytest_ = first(r"-m pytest")
    assert venv < torch < package < pytest_, out.stdout
    # The package line must not let pip pick another torch: nothing but the package is installed there.
    assert "torch" not in lines[package].split("pip install", 1)[1], lines[package]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make (apt-get install make)")
def test_make_test_sets_up_only_once(tmp_path: Path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for stamp in (".venv-stamp", ".torch-stamp", ".dev-stamp", ".charloom-stamp"):
        (venv / stamp).touch()  # newer than pyproject.toml: everything is set up
    out = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install" not in out.stdout and "-m venv" not in out.stdout, out.stdout
    assert "-m pytest" in out.stdout


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # links inside code are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_docs_file_the_readme_links_exists():
    linked = [link for link in _links(README) if link.startswith("docs/") and link.split("#")[0].endswith(".md")]
    assert len(linked) >= 8, f"the README links too few docs: {linked}"
    for link in linked:
        assert (REPO / link.split("#")[0]).is_file(), f"README links {link}, which does not exist"
    # Every doc is reachable from the README.
    reachable = {link.split("#")[0] for link in linked}
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in reachable, f"docs/{doc.name} is not linked from the README"


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_resolve(page: str):
    path = REPO / page
    for link in _links(path):
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue  # a web address or an anchor on the same page
        target = (path.parent / link.split("#")[0]).resolve()
        assert target.exists(), f"{page} links {link}, which does not exist"


def test_the_readme_is_short_and_for_users():
    text = _readme()
    assert len(text.splitlines()) < 300, f"README.md has {len(text.splitlines())} lines; the limit is 300"
    # No commit hashes (7 to 40 hex digits with both a digit and a letter) and no issue numbers.
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)
    assert not hashes, f"commit hashes in the README: {hashes}"
    assert not re.search(r"\bissue #?\d+|(?<![\w&])#\d+\b", text, re.I), "issue numbers in the README"
    # A sample at each of the book's four temperatures, from a real run.
    section = text[text.index("## What it writes"):]
    for t in ("0.2", "0.5", "1.0", "1.2"):
        assert f"Temperature {t}" in section[:2000]
