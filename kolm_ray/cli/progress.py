"""The teacher stage's progress bar: drawn on a terminal only, and opened at the stage's first
progress, once Ray is joined, so it draws on the terminal that Ray's own output was moved away
from (``kolm_ray.cluster.quiet_ray_output``) rather than into Ray's log file."""

from __future__ import annotations

import sys
from typing import Any

import click


class TeacherBar:
    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None

    def update(self, n: int) -> None:
        if self._bar is None:
            # A bar on a terminal only: in a log or a job's output it would be one stray line.
            self._bar = click.progressbar(length=self.total, label="teacher", file=sys.stderr, show_pos=True,
                                          hidden=not sys.stderr.isatty())
            self._bar.__enter__()
        self._bar.update(n)

    def say(self, line: str) -> None:
        """A stage line on stdout, on a line of its own when the bar is half drawn."""
        drawn = self._bar is not None and not self._bar.hidden and 0 < self._bar.pos < self.total
        click.echo("\n" + line if drawn else line)

    def __enter__(self) -> "TeacherBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
