"""The progress model (kolm_ray.progress) and the CLI's displays (kolm_ray.cli.progress), driven
tick by tick with made-up times: no sleeps."""

import threading

import click
import pytest

from kolm_ray.cli.progress import LineProgress, LiveProgress, progress_display
from kolm_ray.progress import StageState, duration, eta_seconds, line_due
from kolm_ray.train.fit import follow_steps


def test_eta_is_the_work_left_at_the_observed_rate():
    seen = [(100.0, 0)]
    assert eta_seconds(seen, 480) is None  # one pair is no rate
    seen.append((110.0, 40))  # 4 a second
    assert eta_seconds(seen, 480) == pytest.approx(110.0)
    seen.append((120.0, 120))  # 6 a second since the first pair
    assert eta_seconds(seen, 480) == pytest.approx(60.0)
    assert eta_seconds(seen, 480, now=150.0) == pytest.approx(30.0)  # less the time since the last pair
    assert eta_seconds(seen, 480, now=500.0) == 0.0  # late, never negative
    assert eta_seconds(seen + [(130.0, 480)], 480) == 0.0
    assert eta_seconds(seen, None) is None


def test_eta_waits_for_progress_and_ignores_the_start_up():
    assert eta_seconds([(0.0, 50), (30.0, 50)], 120) is None  # no step yet since the first pair
    # A resumed fit's first pair is at its resumed step: the rate counts only the steps since.
    assert eta_seconds([(600.0, 50), (610.0, 60)], 120) == pytest.approx(60.0)


def test_a_line_is_due_first_then_every_tenth_or_every_interval_and_at_the_end():
    assert line_due(0.0, 1, 100, None)
    assert not line_due(5.0, 5, 100, (0.0, 1))
    assert line_due(5.0, 11, 100, (0.0, 1))  # another 10%
    assert line_due(31.0, 12, 100, (0.0, 11))  # 30 s since the last line
    assert not line_due(31.0, 11, 100, (0.0, 11))  # nothing new to say
    assert line_due(32.0, 100, 100, (31.0, 99))  # the last one
    assert line_due(40.0, 7, None, (0.0, 5)) and not line_due(10.0, 7, None, (0.0, 5))  # no total: by time


def test_durations_are_short():
    assert [duration(s) for s in (9.6, 100, 125, 7500)] == ["10s", "1m40s", "2m05s", "2h05m"]


def test_stage_summaries_name_the_unit_the_figures_and_the_eta():
    s = StageState("teacher", 480, "calls")
    assert s.summary() == "0/480 calls · 0%"
    s.observe(0.0, 40)
    s.observe(10.0, 80)
    assert s.summary(10.0) == "120/480 calls · 25% · ETA 45s"
    fit = StageState("fit", None, "steps")
    fit.observe(0.0, 0, total=120)
    fit.observe(10.0, 30, figures={"loss": 1.23449})
    assert fit.summary(10.0) == "step 30/120 · loss 1.234 · ETA 30s"


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_for_a_scripted_compile():
    clock, lines = _Clock(), []
    shown = LineProgress(write=lines.append, clock=clock)
    shown.stage("teacher", 40, "calls")
    for t in range(1, 11):
        clock.now = float(t)
        shown.advance(4)
    shown.stage("fit", None, "steps")
    clock.now = 20.0
    shown.advance(0, total=120)  # the workers say the total before the first step
    for step in range(1, 121):
        clock.now = 20.0 + step
        shown.advance(1, loss=round(3.0 - step / 100, 3))
    shown.stage("eval", 16, "rows")
    clock.now = 200.0
    shown.advance(8)
    clock.now = 210.0
    shown.advance(8)
    shown.done()
    teacher = [line for line in lines if line.startswith("progress    teacher ")]
    assert teacher[0] == "progress    teacher 4/40 calls · 10%"
    assert teacher[1] == "progress    teacher 8/40 calls · 20% · ETA 8s"
    assert teacher[-1] == "progress    teacher 40/40 calls · 100%" and len(teacher) == 10
    fit = [line for line in lines if line.startswith("progress    fit ")]
    assert fit[0] == "progress    fit step 0/120"
    assert fit[1] == "progress    fit step 12/120 · loss 2.880 · ETA 1m48s"  # 10% later, 1 step a second
    assert fit[-1] == "progress    fit step 120/120 · loss 1.800"
    assert len(fit) == 11
    assert lines[-2:] == ["progress    eval 8/16 rows · 50%", "progress    eval 16/16 rows · 100%"]
    # Never a stage's own label (``fit         LoRA ...``), which scripts and tests look for.
    assert not [line for line in lines if line.startswith(("teacher ", "fit ", "eval "))]


def test_plain_lines_on_a_slow_stage_come_every_interval():
    clock, lines = _Clock(), []
    shown = LineProgress(write=lines.append, clock=clock, interval_s=30.0)
    shown.stage("teacher", 1000, "calls")
    for t in range(0, 95, 5):  # 1 call every 5 s: a tenth would take 500 s
        clock.now = float(t)
        shown.advance(1)
    assert [line.split(" · ")[0] for line in lines] == [
        "progress    teacher 1/1000 calls", "progress    teacher 7/1000 calls",
        "progress    teacher 13/1000 calls", "progress    teacher 19/1000 calls"]


def test_auto_is_live_on_a_terminal_and_lines_in_a_pipe():
    assert isinstance(progress_display("auto", tty=True), LiveProgress)
    assert isinstance(progress_display("auto", tty=False), LineProgress)
    assert isinstance(progress_display("lines", tty=True), LineProgress)
    assert isinstance(progress_display("live", tty=False), LiveProgress)
    off = progress_display("off", tty=True)
    assert not isinstance(off, (LiveProgress, LineProgress))
    with pytest.raises(click.BadParameter):
        progress_display("bars")


def test_the_fit_follower_passes_on_steps_from_the_resumed_one():
    board = iter([(0, None, None), (50, 120, None), (53, 120, 1.5), (51, 120, 1.6), (53, 120, 1.6), (58, 120, 1.4)])
    got: list[tuple[int, dict]] = []

    class Recorder:
        def advance(self, n=1, *, total=None, **figures):
            got.append((n, {"total": total, **figures}))

    stop = threading.Event()
    reads = 0

    def read():
        nonlocal reads
        reads += 1
        if reads == 5:
            stop.set()  # the fit ended: this is the last read
        return next(board)

    follow_steps(read, Recorder(), stop, every_s=0)
    assert got == [(50, {"total": 120}), (3, {"total": 120, "loss": 1.5}), (5, {"total": 120, "loss": 1.4})]


def test_the_fit_follower_shows_nothing_once_the_driver_stopped_waiting():
    """A final read that answers after the driver gave up on the follower (and moved on to the
    eval stage) is not counted: ``StepGate`` is closed by then."""
    from kolm_ray.train.fit import StepGate

    got: list[int] = []

    class Recorder:
        def advance(self, n=1, *, total=None, **figures):
            got.append(n)

    stop, reading, answer = threading.Event(), threading.Event(), threading.Event()
    reads = 0

    def read():
        nonlocal reads
        reads += 1
        if reads == 1:
            return (10, 120, None)
        reading.set()
        answer.wait()  # a slow board: the driver's join gives up meanwhile
        return (120, 120, 0.5)

    gate = StepGate(Recorder())
    follower = threading.Thread(target=follow_steps, args=(read, gate, stop), kwargs={"every_s": 0})
    follower.start()
    assert reading.wait(60)
    stop.set()
    gate.close()  # what the driver does once its join is over
    answer.set()
    follower.join(60)
    assert not follower.is_alive() and got == [10]


def test_a_failed_read_of_the_step_board_is_logged_once_and_the_last_step_kept(monkeypatch, caplog):
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    from kolm_ray.train import fit

    answers: list = [(5, 120, 1.0), RayActorError(), GetTimeoutError(), RuntimeError("node lost")]
    timeouts: list[float] = []

    def get(ref, timeout=None):
        timeouts.append(timeout)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    class Board:
        class read:
            @staticmethod
            def remote():
                return object()

    monkeypatch.setattr(ray, "get", get)
    read = fit._board_reader(Board())
    with caplog.at_level("WARNING", logger="kolm_ray.train.fit"):
        assert [read() for _ in range(4)] == [(5, 120, 1.0)] * 4
    assert sum("cannot read the step board" in r.getMessage() for r in caplog.records) == 1
    # A read in flight and the final one both end well before the driver stops waiting for them.
    assert all(t is not None and 2 * t + fit.READ_EVERY_S < fit.JOIN_TIMEOUT_S for t in timeouts)


class _Broken:
    """A display whose drawing fails (rich on a closed terminal, a broken pipe on stderr)."""

    def __init__(self) -> None:
        self.calls = 0

    def stage(self, name, total=None, unit=""):
        self.calls += 1

    def advance(self, n=1, *, total=None, **figures):
        self.calls += 1
        raise BrokenPipeError(32, "Broken pipe")

    def done(self):
        self.calls += 1
        raise RuntimeError("rich failed")


def test_a_display_that_raises_turns_itself_off_and_never_fails_the_run(caplog):
    from kolm_ray.progress import GuardedProgress, NoProgress, guarded

    broken = _Broken()
    shown = guarded(broken)
    with caplog.at_level("WARNING", logger="kolm_ray.progress"):
        shown.stage("teacher", 4, "calls")
        shown.advance(1)  # raises inside: logged, the display turned off
        shown.advance(1, total=4, loss=1.0)
        shown.stage("fit")
        shown.done()
    assert broken.calls == 2  # nothing was passed on after the error
    warnings = [r.getMessage() for r in caplog.records if r.name == "kolm_ray.progress"]
    assert len(warnings) == 1 and "BrokenPipeError" in warnings[0]
    assert guarded(shown) is shown and isinstance(guarded(None), NoProgress)
    with GuardedProgress(LineProgress(write=lambda s: None)) as inner:  # a context manager, as the CLI's
        inner.stage("eval", 2, "rows")


def test_a_compile_guards_its_progress_display():
    """compile_specialist shows its stages through ``guarded``: a display that raises cannot fail it."""
    import inspect

    from kolm_ray import compile as compile_module

    source = inspect.getsource(compile_module.compile_specialist)
    assert "shown = guarded(progress)" in source and "NoProgress()" not in source
