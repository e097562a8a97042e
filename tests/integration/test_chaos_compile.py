"""Chaos on the compile side: the `kolm compile` driver killed with SIGKILL, as `kill -9` of the
terminal's job does (the whole process group), and run again with the same command.

* Killed in the teacher stage once some answers are paid, then again in the fit once a
  checkpoint exists: the third run finishes, the stand-in teacher was paid for every sample
  exactly once, and the fit resumed from the checkpoint the killed run saved.
* A fit killed mid-way whose newest checkpoint is then damaged on disk: the re-run says which
  checkpoint it cannot use and why, resumes from the one before, and never loads the garbage.

Every run is a real `kolm` process joined to the session's head node (`ray_head`), against the
Messages API stand-in (kolm_ray/testing/messages_api.py) on the tiny base: 12 rows, k=2, a
6-row holdout, 40 fit steps. One compile's home and work dir are shared by the module, so the
later compiles find the teacher's answers cached (and pay nothing) and the base's eval done.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from kolm_ray.testing.messages_api import MessagesAPIServer, replay_responder
from kolm_ray.train.checkpoints import check, step_of
from tests.conftest import EXAMPLE

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

KOLM = Path(sys.executable).parent / "kolm"
ROWS, HOLDOUT, K = 12, 6, 2
SAMPLES = ROWS * K  # distinct samples the compile needs: each must be paid for exactly once
ANSWERED_BEFORE_KILL = 10
STEPS, EVERY = 40, 5


class GatedTeacher(MessagesAPIServer):
    """The recorded teacher, slow (every answer takes ``latency_s``), that answers only the next
    ``allow(n)`` samples and then replies 529 overloaded (not paid for, and retried by the
    client) until ``allow(None)``. So a driver killed after those answers is killed while no
    answer is being paid for: a call in flight when its client dies is paid and lost, with a
    real teacher too, which no re-run can undo (at most ``--concurrency`` of them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._left: int | None = None

    def allow(self, n: int | None) -> None:
        with self._lock:
            self._left = n

    def _draw_fault(self) -> str | None:
        with self._lock:
            if self._left is not None:
                if self._left <= 0:
                    return "overloaded"
                self._left -= 1
        return super()._draw_fault()


def _rows(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


@pytest.fixture(scope="module")
def chaos(ray_head, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    answers = {}
    for line in (EXAMPLE / "recorded-teacher.jsonl").read_text().splitlines():
        rec = json.loads(line)
        answers[rec["input"]] = rec["output"]
    teacher = GatedTeacher(replay_responder(answers), latency_s=0.2).start()
    env = {**os.environ, **ray_head.env, "RAY_ADDRESS": ray_head.address, "KOLM_HOME": str(root / "home"),
           "ANTHROPIC_BASE_URL": teacher.url, "ANTHROPIC_API_KEY": f"chaos-{teacher.port}", "PYTHONUNBUFFERED": "1"}
    env.pop("KOLM_DEBUG", None)
    args = [str(KOLM), "compile", "--task-file", str(EXAMPLE / "task.txt"),
            "--examples", str(_rows(EXAMPLE / "examples.jsonl", root / "examples.jsonl", ROWS)),
            "--eval", str(_rows(EXAMPLE / "holdout.jsonl", root / "holdout.jsonl", HOLDOUT)),
            "--base", str(tiny_base), "--name", "chaos", "--work-dir", str(root / "work"), "--k", str(K),
            "--concurrency", "4", "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--max-failures", "0",
            "--batch-size", "2", "--lr", "3e-3"]
    yield {"root": root, "env": env, "args": args, "teacher": teacher, "work": root / "work", "head": ray_head,
           "cache": root / "home" / "cache" / "teacher"}
    teacher.stop()


class Run:
    """One `kolm compile` in its own session (process group), as a shell runs a job."""

    def __init__(self, chaos: dict, *extra: str, label: str):
        self.label = label
        self.started = time.time()
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*chaos["args"], *extra], env=chaos["env"], cwd=chaos["root"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        log = (chaos["root"] / f"{label}.log").open("w")

        def read() -> None:  # each line with the second it came at, for the log
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                log.write(f"[{time.time() - self.started:6.1f}s] {line}")
                log.flush()
            log.close()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, what: str, cond, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not cond():
            assert self.proc.poll() is None, f"the compile ended ({self.proc.returncode}) before {what}:\n{self.output[-4000:]}"
            assert time.time() < deadline, f"no {what} after {timeout:g} s:\n{self.output[-4000:]}"
            time.sleep(0.1)

    def kill_job(self) -> None:
        """SIGKILL to the job's whole process group, as `kill -9 %1` in a shell: no handler, no
        finally, no atexit runs. Nothing the driver started outlives it."""
        import psutil

        group = [self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))]
        os.killpg(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL
        self.reader.join(10)
        _, alive = psutil.wait_procs([p for p in map(_process, group[1:]) if p], timeout=10)
        assert not alive, f"the killed driver's children outlive it: {alive}"
        print(f"killed the job: the driver and {len(group) - 1} child process(es)")

    def finish(self, timeout: float = 600) -> str:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.reader.join(10)
        out = self.output
        print(f"{self.label}: exit {code} after {time.time() - self.started:.0f} s")
        assert code == 0, out[-6000:]
        assert "Traceback" not in out, out[-6000:]
        return out


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _cached(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*.json") if not p.name.startswith("."))


def _checkpoints(work: Path) -> dict[str, str | None]:
    """Every fit checkpoint under the work dir (``fit-NAME/step-N``): None if usable, else why not."""
    return {f"{p.parent.name}/{p.name}": check(None, str(p)) for p in sorted((work / "train").glob("fit-*/step-*"))}


def _usable(work: Path, run: str | None = None) -> list[str]:
    return [k for k, why in _checkpoints(work).items() if why is None and (run is None or k.startswith(run + "/"))]


def _no_fit_workers_left(head, timeout: float = 60) -> float:
    """Wait until the killed driver's fit (its Train controller and workers, on the session's
    head node) is gone: Ray ends a dead driver's actors, and until it has, a worker may still
    save a checkpoint. Returns how long that took."""
    import psutil

    start = time.time()
    raylets = [p for p in psutil.process_iter(["cmdline"])
               if any(str(head.temp_dir) in part for part in p.info["cmdline"] or [])
               and any(part.endswith("raylet") for part in p.info["cmdline"] or [])]
    while True:
        alive = []
        for raylet in raylets:
            for p in _children(raylet):
                try:
                    if any("RayTrainWorker" in part or "TrainController" in part for part in p.cmdline()):
                        alive.append(p)
                except psutil.Error:
                    continue
        if not alive:
            return time.time() - start
        assert time.time() - start < timeout, f"the killed driver's fit still runs after {timeout} s: {alive}"
        time.sleep(0.2)


def _children(p):
    import psutil

    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _train_json(out: str) -> dict:
    artifact = Path(next(line.split()[1] for line in out.splitlines() if line.startswith("artifact ")))
    with tarfile.open(artifact) as t:
        return json.load(t.extractfile("specialist/train.json"))


def _line(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def killed_twice(chaos):
    """One compile killed in its teacher stage, run again and killed in its fit, then run to the end."""
    teacher, cache, work = chaos["teacher"], chaos["cache"], chaos["work"]
    teacher.allow(ANSWERED_BEFORE_KILL)
    first = Run(chaos, label="1-killed-in-teacher")
    first.wait_for(f"{ANSWERED_BEFORE_KILL} answers paid and cached",
                   lambda: teacher.stats.succeeded >= ANSWERED_BEFORE_KILL and _cached(cache) >= ANSWERED_BEFORE_KILL)
    time.sleep(1)  # the driver goes on asking (and hearing 529): killed mid-stage, not between stages
    first.kill_job()
    paid_before = teacher.stats.succeeded
    teacher.allow(None)

    second = Run(chaos, label="2-killed-in-fit")
    second.wait_for("a usable checkpoint", lambda: _usable(work))
    second.kill_job()
    print(f"the killed driver's fit was gone {_no_fit_workers_left(chaos['head']):.1f} s after the kill")
    saved = _usable(work)

    third = Run(chaos, label="3-finished")
    out = third.finish()
    return {"outputs": [first.output, second.output, out], "paid_before_rerun": paid_before, "saved": saved,
            "paid": teacher.stats.succeeded, "prompts": dict(teacher.stats.prompts)}


def test_a_driver_killed_mid_teacher_pays_no_sample_twice(killed_twice):
    first, second, third = killed_twice["outputs"]
    assert "teacher     " not in first  # killed inside the stage
    assert killed_twice["paid_before_rerun"] == ANSWERED_BEFORE_KILL
    # The re-run paid only for what the killed run had not: every sample exactly once in all.
    print(f"stand-in: {killed_twice['paid']} samples paid for, {SAMPLES} needed ({ROWS} rows x k={K})")
    assert killed_twice["paid"] == SAMPLES
    assert len(killed_twice["prompts"]) == ROWS and set(killed_twice["prompts"].values()) == {K}
    assert f"{SAMPLES - ANSWERED_BEFORE_KILL} calls paid now, {ANSWERED_BEFORE_KILL} from cache" in \
        _line(second, "teacher     ")
    assert f"0 calls paid now, {SAMPLES} from cache" in _line(third, "teacher     ")


def test_a_driver_killed_mid_fit_resumes_from_its_checkpoint(killed_twice):
    third = killed_twice["outputs"][2]
    saved = max(step_of(k.split("/")[1]) for k in killed_twice["saved"])
    fit = _line(third, "fit         LoRA")
    resumed = int(re.search(r"resumed at step (\d+)", fit).group(1))
    assert 0 < resumed == saved < STEPS, (fit, killed_twice["saved"])  # killed mid-fit; resumed where it stopped
    # Said before the fit starts (with any checkpoint cut off by the kill, and why, before it).
    said = _line(third, "fit         ")
    assert said.endswith((f"resuming from checkpoint step-{saved:06d}", f"; resuming from step-{saved:06d}")), said
    train = _train_json(third)
    assert train["resumed_from_step"] == resumed and train["steps_this_run"] == STEPS - resumed
    assert [s for s, _ in train["loss_curve"]] == list(range(1, STEPS + 1))  # one curve across both runs


def test_a_damaged_newest_checkpoint_is_said_and_the_previous_one_resumed(chaos, killed_twice):
    work = chaos["work"]
    paid = chaos["teacher"].stats.succeeded
    before = {p.name for p in (work / "train").glob("fit-*")}
    killed = Run(chaos, "--seed", "3", label="4-killed-in-fit")  # another fit: the same teacher samples
    killed.wait_for("two usable checkpoints", lambda: len([k for k in _usable(work)
                                                           if k.split("/")[0] not in before]) >= 2)
    killed.kill_job()
    _no_fit_workers_left(chaos["head"])
    [run] = {p.name for p in (work / "train").glob("fit-*")} - before
    usable = sorted(_usable(work, run), key=lambda k: step_of(k.split("/")[1]))
    assert len(usable) >= 2, _checkpoints(work)  # Ray Train keeps the last two
    previous, newest = (k.split("/")[1] for k in usable[-2:])
    # The disk lets the newest down: the engine state zeroed in place, the adapter cut short.
    state = work / "train" / run / newest / "kolm" / "mp_rank_00_model_states.pt"
    state.write_bytes(b"\0" * state.stat().st_size)
    adapter = work / "train" / run / newest / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])

    out = Run(chaos, "--seed", "3", label="5-finished-after-damage").finish()
    said = _line(out, "fit         checkpoint")
    print(said)
    # The newest (with any cut off while the job died, newer still) is named with why; then the one used.
    assert (re.fullmatch(rf"fit         checkpoint {newest} is unreadable \(.+\); resuming from {previous}", said)
            or re.fullmatch(rf"fit         checkpoints (step-\d+ \(.+\), )+{newest} \(.+\) are unreadable; "
                            rf"resuming from {previous}", said)), said
    assert "mp_rank_00_model_states.pt" in said or "adapter_model.safetensors" in said
    fit = _line(out, "fit         LoRA")
    assert f"resumed at step {step_of(previous)}" in fit, fit
    train = _train_json(out)
    assert train["resumed_from_step"] == step_of(previous) and train["steps_this_run"] == STEPS - step_of(previous)
    assert chaos["teacher"].stats.succeeded == paid  # every sample came from the cache
