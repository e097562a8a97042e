"""How ``kolm compile`` and ``kolm sample`` show a stage's progress (``kolm_ray.progress``): a live
display on a terminal (rich), plain lines in pipes and job logs, or nothing (``--progress``).

Both write to stderr, so stdout keeps the stage lines alone. Plain lines start with
``progress    `` (``progress    fit step 30/120 · loss 1.234 · ETA 2m05s``), one per stage every
10% or 30 s, whichever comes first: never with a stage's own label, which scripts look for. The
live display opens at the first stage, once Ray is joined, so it draws on the terminal that Ray's
own output was moved away from (``kolm_ray.cluster.quiet_ray_output``) rather than into Ray's
log file.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

import click

from kolm_ray.progress import NoProgress, StageProgress, StageState, line_due

MODES = ("auto", "live", "lines", "off")
LINE_LABEL = "progress    "


class LineProgress:
    """Plain progress lines, for a pipe or a job's log."""

    def __init__(self, write: Callable[[str], None] = lambda s: click.echo(s, err=True),
                 clock: Callable[[], float] = time.monotonic, interval_s: float = 30.0, fraction: float = 0.1) -> None:
        self.write, self.clock, self.interval_s, self.fraction = write, clock, interval_s, fraction
        self._state: StageState | None = None
        self._last: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        with self._lock:
            self._state, self._last = StageState(name, total, unit), None

    def advance(self, n: int = 1, *, total: int | None = None, **figures: float) -> None:
        with self._lock:
            s = self._state
            if s is None:
                return
            now = self.clock()
            s.observe(now, n, total, figures)
            if line_due(now, s.done, s.total, self._last, self.interval_s, self.fraction):
                self._last = (now, s.done)
                self.write(f"{LINE_LABEL}{s.name} {s.summary(now)}")

    def done(self) -> None:
        with self._lock:
            self._state = self._last = None

    def say(self, line: str) -> None:
        """A stage line, on stdout."""
        click.echo(line)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


class LiveProgress:
    """A live display on the terminal: one bar per stage, with its figures and ETA."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._live: Any = None
        self._task: Any = None
        self._state: StageState | None = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        # stderr resolved when drawing (Ray may have moved descriptor 2 since). Not rich's stdout
        # redirect: click writes to stdout's binary buffer, past it (``say`` prints above the bars).
        live = Progress(TextColumn("{task.description:<11}"), BarColumn(), TextColumn("{task.fields[text]}"),
                        console=Console(stderr=True), redirect_stdout=False, redirect_stderr=False)
        live.start()
        return live

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        with self._lock:
            if self._live is None:
                self._live = self._open()
            self._finish_task()
            self._state = StageState(name, total, unit)
            self._task = self._live.add_task(name, total=total, text=self._state.summary())

    def advance(self, n: int = 1, *, total: int | None = None, **figures: float) -> None:
        with self._lock:
            if self._state is None:
                return
            now = self.clock()
            self._state.observe(now, n, total, figures)
            self._live.update(self._task, completed=self._state.done, total=self._state.total,
                              text=self._state.summary(now))

    def _finish_task(self) -> None:
        if self._state is not None and self._state.total is None:
            self._live.update(self._task, total=max(1, self._state.done), completed=max(1, self._state.done))

    def say(self, line: str) -> None:
        """A stage line: above the bars when stdout is the same terminal, else on stdout as it is."""
        with self._lock:
            if self._live is not None and sys.stdout.isatty():
                self._live.console.print(line, markup=False, highlight=False, soft_wrap=True)
                return
        click.echo(line)

    def done(self) -> None:
        with self._lock:
            if self._live is not None:
                self._finish_task()
                self._live.stop()
            self._live = self._task = self._state = None

    def __enter__(self) -> "LiveProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


class _Off(NoProgress):
    def say(self, line: str) -> None:
        click.echo(line)

    def __enter__(self) -> "_Off":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_display(mode: str = "auto", tty: bool | None = None) -> Any:
    """The display for ``--progress MODE`` (a context manager and a ``StageProgress``): ``auto``
    is live when stderr is a terminal (``tty``, default: asked), plain lines otherwise.
    Raises: click.BadParameter for an unknown mode."""
    if mode not in MODES:
        raise click.BadParameter(f"{mode!r} is not one of {', '.join(MODES)}", param_hint="--progress")
    if mode == "auto":
        mode = "live" if (sys.stderr.isatty() if tty is None else tty) else "lines"
    display: StageProgress = {"live": LiveProgress, "lines": LineProgress, "off": _Off}[mode]()
    return display
