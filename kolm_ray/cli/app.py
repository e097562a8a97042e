"""The ``kolm`` command group: parses, validates at the edge, calls the library, prints.

No logic of its own. Errors become exit codes here and only here, each as one ``error:`` line
on stderr:

* ``kolm_ray.errors``: their own code: 2 for bad arguments or input, 1 for runtime failures,
  3 for a failed K-score gate.
* A user's mistake that escaped a command's checks: a missing file, a folder for a file, no
  permission, a file that is not UTF-8 text or not JSON -> 2, naming the path.
* Anything else -> 1, ``internal error: TYPE: MESSAGE``; ``KOLM_DEBUG=1`` prints the traceback.

Click's usage errors (exit 2, printed by click), Ctrl-C and exits pass through untouched.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import PurePath
from types import TracebackType
from typing import Any

import click

from kolm_ray.cli.options import epilog
from kolm_ray.errors import KolmError


class _KolmGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints these itself (a usage error exits 2)
        except KolmError as e:
            _fail(ctx, str(e), e.exit_code)
        except Exception as e:  # noqa: BLE001 - the one safety net: one line, never a bare traceback
            _fail(ctx, *explain(e))


def _fail(ctx: click.Context, message: str, exit_code: int) -> None:
    if os.environ.get("KOLM_DEBUG", "") not in ("", "0"):
        click.echo(traceback.format_exc(), err=True, nl=False)
    click.echo(f"error: {' '.join(message.split())}", err=True)
    cluster = sys.modules.get("kolm_ray.cluster")  # imported only by commands that joined Ray
    if exit_code == 1 and cluster is not None and cluster.ray_log is not None:  # Ray's side of the failure
        click.echo(f"            Ray's log: {cluster.ray_log}", err=True)
    ctx.exit(exit_code)


_OS_MISTAKES: tuple[tuple[type[OSError], str], ...] = (
    (IsADirectoryError, "is a directory, expected a file"),
    (NotADirectoryError, "a part of this path is not a directory"),
    (FileNotFoundError, "no such file or directory"),
    (PermissionError, "permission denied"),
)


def explain(e: Exception) -> tuple[str, int]:
    """The one-line message and exit code for an exception no command turned into a ``KolmError``:
    2 with the path for a user's file mistake, else 1 as an internal error."""
    for kind, what in _OS_MISTAKES:
        if isinstance(e, kind):
            return (f"{e.filename}: {what}" if e.filename is not None else f"{what} ({e})"), 2
    if isinstance(e, UnicodeDecodeError):
        path = _input_path(e.__traceback__)
        return f"{path or 'an input file'}: not UTF-8 text ({e.reason} at byte {e.start})", 2
    if isinstance(e, json.JSONDecodeError):
        path = _input_path(e.__traceback__)
        return f"{path + ':' if path else 'an input file:'}{e.lineno}: not valid JSON ({e.msg} at column {e.colno})", 2
    return (f"internal error: {type(e).__name__}: {e} (run with KOLM_DEBUG=1 for the traceback)", 1)


def _input_path(tb: TracebackType | None) -> str | None:
    """The file being read where a decode error was raised: a path held by the innermost frames,
    up to and including the first of kolm_ray's own (the code that read it)."""
    for frame, _ in reversed(list(traceback.walk_tb(tb))):
        for name, value in frame.f_locals.items():
            if isinstance(value, PurePath):
                return str(value)
            if isinstance(value, str) and name in ("path", "file", "filename") and os.path.isfile(value):
                return value
        if frame.f_globals.get("__name__", "").startswith("kolm_ray."):
            return None
    return None


@click.group(
    cls=_KolmGroup,
    epilog=epilog(
        "kolm compile --task-file task.txt --examples rows.jsonl --eval holdout.jsonl --base qwen-2.5-3b-instruct",
        "kolm verify ~/.kolm/artifacts/routing-1.0.kolm",
        codes={0: "done", 1: "a runtime failure (KOLM_DEBUG=1 prints the traceback of an internal error)",
               2: "bad arguments or input (the message names the file and line)",
               3: "the K-score gate was not met"},
    ),
)
@click.version_option(package_name="kolm_ray")
@click.option("-v", "--verbose", is_flag=True, help="Show Ray's own log lines too (by default they go to the "
              "run's ray.log, or $KOLM_HOME/logs/ray.log); same as KOLM_VERBOSE=1.")
def cli(verbose: bool) -> None:
    """kolm: compile a frontier-model task into a small, signed, self-hosted Specialist."""
    if verbose:
        os.environ["KOLM_VERBOSE"] = "1"  # read where Ray is joined (kolm_ray.cluster.connect)


def main() -> None:
    cli(prog_name="kolm")
