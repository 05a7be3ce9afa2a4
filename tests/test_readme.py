"""README's two commands are the ones CI runs: the test command word for word in `.ci/run`, inside a stock
Debian root shell (empty environment, plain PATH), so the set-up is proven with Debian's own python3."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOCK = "env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def readme_commands() -> list[str]:
    """The indented command lines of README's quick start, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Quick start")
    section = text[start:text.index("\n## ", start + 1)]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_has_the_setup_and_the_test_command():
    commands = readme_commands()
    assert commands[0] == "scripts/setup && scripts/demo"
    assert commands[1] == "scripts/setup && .venv/bin/python -m pytest -q"


def test_ci_runs_readmes_test_command_in_a_stock_debian_shell():
    ci = (ROOT / ".ci/run").read_text()
    test_command = readme_commands()[1]
    assert f"STOCK=({STOCK})" in ci
    calls = [line for line in ci.splitlines() if re.match(r'\s*"\$\{STOCK\[@\]\}" bash -c ', line)]
    assert calls == [f"\"${{STOCK[@]}}\" bash -c '{test_command}'"]
