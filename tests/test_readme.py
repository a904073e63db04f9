"""CI must run exactly the README's install and test commands."""

import re

from tests.conftest import REPO


def _block(section: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {section}\n.*?```bash\n(.*?)```", text, re.S | re.M)
    assert match, f"README has no bash block under '## {section}'"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_commands_in_order():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    position = -1
    for command in _block("Install")[1:] + _block("Test"):  # the venv line is done by CI's own
        assert command in lines, f".ci/run does not run README's {command!r}"
        assert lines.index(command) > position, f"{command!r} runs out of order"
        position = lines.index(command)
