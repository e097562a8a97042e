"""Progress on long work (a compile's or a sample's stages): what a stage reports as it goes, and
the pure functions a display is made of.

A stage says it started (``StageProgress.stage``: its name, its total when known, its unit),
then how much more is done, with figures such as the fit's loss (``advance``), and the run says
when it is over (``done``). ``StageState`` keeps what was observed; ``eta_seconds`` and
``line_due`` decide from observed (time, done) pairs alone, so tests drive them tick by tick
with made-up times. Must not print or draw: the CLI's renderers (``kolm_ray.cli.progress``) do,
a live display on a terminal and plain lines in pipes and job logs.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

RATE_WINDOW = 20  # observations the rate is measured over: recent enough to follow a change of pace


class StageProgress(Protocol):
    """Who is told of a long run's progress. ``stage`` starts a stage (and ends the one before);
    ``advance`` adds ``n`` done (``total``: the stage's total, once it is known); ``done`` ends
    the run's display. Called from any thread."""

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None: ...
    def advance(self, n: int = 1, *, total: int | None = None, **figures: float) -> None: ...
    def done(self) -> None: ...


class NoProgress:
    """A ``StageProgress`` that shows nothing."""

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        pass

    def advance(self, n: int = 1, *, total: int | None = None, **figures: float) -> None:
        pass

    def done(self) -> None:
        pass


def eta_seconds(seen: Sequence[tuple[float, int]], total: int | None, now: float | None = None) -> float | None:
    """Seconds left: the work left at the rate between the oldest and the newest observed
    (time, done) pair, less the time since the newest (``now``), never below 0. None without a
    total or until two pairs show progress; 0 once done reaches the total. The time before the
    first pair (a worker starting, a model loading) is not part of the rate."""
    if total is None or not seen:
        return None
    (t0, d0), (t1, d1) = seen[0], seen[-1]
    if d1 >= total:
        return 0.0
    if d1 <= d0 or t1 <= t0:
        return None
    left = (total - d1) * (t1 - t0) / (d1 - d0)
    return max(0.0, left - (now - t1)) if now is not None and now > t1 else left


def line_due(now: float, done: int, total: int | None, last: tuple[float, int] | None,
             interval_s: float = 30.0, fraction: float = 0.1) -> bool:
    """Whether a plain progress line is due after an advance: the first one, then each time
    another ``fraction`` of the total is done or ``interval_s`` has passed since the last line,
    whichever comes first, and the one that reaches the total. ``last``: (time, done) of the
    last line printed."""
    if last is None:
        return True
    at, was = last
    if done == was:
        return False
    if total and (done >= total or done - was >= fraction * total):
        return True
    return now - at >= interval_s


def duration(seconds: float) -> str:
    """``1m40s``, ``10s``, ``2h05m``: short, for an ETA."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class StageState:
    """What a display knows of the stage in progress."""

    name: str
    total: int | None = None
    unit: str = ""
    done: int = 0
    figures: dict[str, float] = field(default_factory=dict)
    seen: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))

    def observe(self, now: float, n: int, total: int | None = None, figures: dict[str, float] | None = None) -> None:
        if total is not None:
            self.total = total
        self.done += n
        self.figures.update(figures or {})
        self.seen.append((now, self.done))

    def eta(self, now: float | None = None) -> float | None:
        return eta_seconds(list(self.seen), self.total, now)

    def summary(self, now: float | None = None) -> str:
        """``120/480 calls · 25% · ETA 1m40s``; a fit's ``step 30/120 · loss 1.234 · ETA 2m05s``."""
        of = f"/{self.total}" if self.total else ""
        if self.unit == "steps":
            parts = [f"step {self.done}{of}"]
        else:
            parts = [f"{self.done}{of} {self.unit}".rstrip()]
            if self.total:
                parts.append(f"{100 * self.done // self.total}%")
        parts += [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.figures.items()]
        eta = self.eta(now)
        if eta is not None and (not self.total or self.done < self.total):
            parts.append(f"ETA {duration(eta)}")
        return " · ".join(parts)


class GuardedProgress:
    """A ``StageProgress`` that never raises: it passes each call on to ``display`` until one
    raises (rich failing to draw, a broken pipe on stderr), logs that first error, and shows
    nothing after. Progress is a courtesy: it must not fail a compile that has paid its teacher.
    A context manager (entering and leaving ``display`` when it is one, guarded the same way)."""

    def __init__(self, display: StageProgress) -> None:
        self.display = display
        self.failed: BaseException | None = None

    def _call(self, what: str, *args: object, **kwargs: object) -> None:
        if self.failed is not None:
            return
        try:
            getattr(self.display, what)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever a display raises, the work goes on without it
            self.off(e)

    def off(self, error: BaseException) -> None:
        """Turn the display off for ``error``: logged, the first time only."""
        if self.failed is None:
            self.failed = error
            logging.getLogger(__name__).warning("progress display off after an error (%s: %s)",
                                                type(error).__name__, error)

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        self._call("stage", name, total, unit)

    def advance(self, n: int = 1, *, total: int | None = None, **figures: float) -> None:
        self._call("advance", n, total=total, **figures)

    def done(self) -> None:
        self._call("done")

    def __enter__(self) -> "GuardedProgress":
        if hasattr(self.display, "__enter__"):
            self._call("__enter__")
        return self

    def __exit__(self, *exc: object) -> None:
        if hasattr(self.display, "__exit__"):
            self._call("__exit__", *exc)


def guarded(display: StageProgress | None) -> StageProgress:
    """``display`` wrapped in ``GuardedProgress`` (once); ``NoProgress`` for None."""
    if display is None:
        return NoProgress()
    return display if isinstance(display, GuardedProgress) else GuardedProgress(display)
