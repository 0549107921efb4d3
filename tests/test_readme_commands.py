"""The README's commands stay true: every `mmaudit` command in its shell blocks parses with
the CLI's own parser (each flag and choice exists), and its test command is the one
.ci/run runs. The demo, the gate example and the report run for real in tests/test_demo.py
and tests/test_report_gate.py; commands that need a GPU, the Hub or a server are parsed only."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            for part in re.split(r"&&|\|\||;", line.split(" #")[0]):
                if part.strip().startswith("mmaudit "):
                    commands.append(part.strip())
    return commands


COMMANDS = _readme_commands()


def test_the_readme_has_its_commands():
    assert len(COMMANDS) >= 8 and COMMANDS[0] == "mmaudit demo"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    from audit.cli import build_parser

    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exc:  # argparse's way of rejecting a flag, a choice or a missing argument
        pytest.fail(f"README command does not parse (exit {exc.code}): {command}")


def test_the_readme_test_command_is_what_ci_runs():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"python -m pytest[^\n`]*", ci).group(0).strip()
    assert test_command in readme
