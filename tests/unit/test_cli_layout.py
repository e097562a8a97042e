"""The CLI stays thin: every command parses, calls the library, prints.

Read from the source with `ast` (nothing imported), so a new module under ``kolm_ray/cli/`` is
covered as soon as it exists. A command function longer than ``MAX_LINES`` (its ``def`` line to
its last line; decorators not counted) holds orchestration that belongs in the library.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kolm_ray

CLI_DIR = Path(kolm_ray.__file__).parent / "cli"
MAX_LINES = 40


def _is_click_command(decorator: ast.expr) -> bool:
    """``@cli.command(...)``, ``@receipts.command``, ``@click.group(...)``, ``@queue_cmd.group()``..."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name in ("command", "group")


def command_lengths(source: str) -> dict[str, int]:
    """Each click command function in ``source`` -> its length in lines, ``def`` to last line."""
    return {node.name: node.end_lineno - node.lineno + 1
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(_is_click_command(d) for d in node.decorator_list)}


def too_long(cli_dir: Path = CLI_DIR, max_lines: int = MAX_LINES) -> list[str]:
    """``module.function: N lines`` for every command function over ``max_lines``."""
    return [f"{path.stem}.{name}: {n} lines"
            for path in sorted(cli_dir.glob("*.py"))
            for name, n in command_lengths(path.read_text(encoding="utf-8")).items() if n > max_lines]


def test_every_cli_command_is_at_most_40_lines():
    assert too_long() == [], ("a command does more than parse -> call the library -> print: move the work into "
                              "kolm_ray (see kolm_ray/serve/launch.py)")


def test_the_check_finds_commands_and_groups_however_they_are_decorated():
    body = "\n".join(f"    x = {i}" for i in range(39))  # with the def line and `return`: 41 lines
    source = f'''
import click
from kolm_ray.cli.app import cli

@cli.command(name="long")
@click.option("--x")
def long_cmd(x):
{body}
    return x

@click.group()
def grp():
    pass

@grp.command
def short():
    pass

def helper():
{body}
    return 1
'''
    assert command_lengths(source) == {"long_cmd": 41, "grp": 2, "short": 2}  # helper: not a command


def test_the_check_sees_the_command_modules():
    seen = {path.stem: command_lengths(path.read_text(encoding="utf-8")) for path in CLI_DIR.glob("*.py")}
    assert {"serve_cmd", "receipts_verify"} <= set(seen["serving"])
    assert "sample" in seen["sampling"] and "queue_cmd" in seen["queue"]
