"""`kolm ... --help` teaches: every command (walked from the group, so a new one is covered) ends
with examples and its exit codes, every option says what it does, and the command listings show
whole one-line summaries."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli

RUNNER = CliRunner()


def _walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(cli))
GROUPS = [(path, cmd) for path, cmd in COMMANDS if isinstance(cmd, click.Group)]


def _id(path: tuple[str, ...]) -> str:
    return " ".join(("kolm", *path))


def _help(path: tuple[str, ...]) -> str:
    res = RUNNER.invoke(cli, [*path, "--help"], terminal_width=80)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_the_walk_finds_every_command_family():
    names = {_id(path) for path, _ in COMMANDS}
    assert {"kolm compile", "kolm serve", "kolm publish", "kolm queue limits", "kolm teacher-limits set",
            "kolm receipts verify", "kolm base tiny", "kolm verify", "kolm score"} <= names


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[_id(p) for p, _ in COMMANDS])
def test_help_ends_with_examples_and_exit_codes(path, cmd):
    assert cmd.epilog and "Example" in cmd.epilog and "Exit codes" in cmd.epilog, _id(path)
    text = _help(path)
    tail = text[text.index("Example"):]
    assert "Exit codes" in tail  # the examples come first, the codes last
    examples = [line.strip() for line in tail.splitlines() if line.strip().startswith("kolm")]
    assert examples, f"{_id(path)}: no example invocation in its help"
    # Shown as written, not rewrapped into a paragraph (click keeps \b blocks as they are).
    for line in cmd.epilog.splitlines():
        if line.strip().startswith("kolm"):
            assert line.strip() in examples
    assert all(code in tail for code in ("0  ", "2  ")), f"{_id(path)}: exit codes 0 and 2 not explained"


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[_id(p) for p, _ in COMMANDS])
def test_every_option_has_help(path, cmd):
    missing = [p.opts[0] for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, f"{_id(path)}: options without help: {missing}"


@pytest.mark.parametrize("path, group", GROUPS, ids=[_id(p) for p, _ in GROUPS])
def test_command_listing_shows_whole_one_line_summaries(path, group):
    text = _help(path)
    listing = text[text.index("Commands:"):].split("\n\n")[0].splitlines()[1:]
    assert "..." not in "\n".join(listing) and "…" not in "\n".join(listing), "\n".join(listing)
    rows = [re.match(r"^  (\S+)\s{2,}(\S.*)$", line) for line in listing]
    assert all(rows), f"a summary wrapped onto a second line:\n{chr(10).join(listing)}"
    shown = {m.group(1): m.group(2) for m in rows}
    assert set(shown) == set(group.commands)
    for name, sub in group.commands.items():
        assert shown[name] == sub.get_short_help_str(limit=1000), name
