"""Killing a fit's training worker from outside, as a preempted node or the OOM killer would.

``kill_fit_worker(storage, after_step=N)`` watches the fit runs that appear under ``storage``
(a folder or s3://...) while its block runs, finds the Ray Train worker processes through Ray's
state API, and SIGKILLs them once Ray Train has registered a checkpoint of step N or later of
that run (it is named in the run's ``checkpoint_manager_snapshot.json``) and the checkpoint passes
its manifest. Once, then it stops watching: a worker that replaces the killed one is left alone.

Why this lands mid-fit, every time: a worker's reports go through a queue of one that Ray Train's
controller empties every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), and the controller writes
the snapshot when it takes a checkpoint off that queue. From then on the worker can hand over
one more checkpoint at most before the next poll, so a fit with two or more checkpoints left
after step N is still training at least 2 s after the snapshot names step N; the watcher polls
every 20 ms and already knows the worker's pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from typing import Iterator

from kolm_ray.store import open_store
from kolm_ray.train.checkpoints import RAY_SNAPSHOT, check, step_of

WORKER_CLASS = "RayTrainWorker"  # Ray Train v2's worker actor (ray 2.60)


def train_worker_pids() -> list[int]:
    """The pids of the live Ray Train workers of the cluster this process is connected to."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", WORKER_CLASS), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return sorted(a.pid for a in actors if a.pid)


class FitWorkerKiller(threading.Thread):
    def __init__(self, storage: str, after_step: int, timeout_s: float = 900.0) -> None:
        super().__init__(daemon=True, name="fit-worker-killer")
        import pyarrow.fs as pafs

        root, fs = open_store(str(storage)).train_storage()
        self.root, self.fs = root.rstrip("/"), fs if fs is not None else pafs.LocalFileSystem()
        self.after_step = after_step
        self.deadline = time.monotonic() + timeout_s
        self.before = self._runs()  # runs that were there already: finished ones, not ours
        self.stop = threading.Event()
        self.killed: list[int] = []
        self.checkpoint: str | None = None  # the run/step-NNNNNN that was registered when it struck
        self.error: BaseException | None = None

    def _runs(self) -> set[str]:
        import pyarrow.fs as pafs

        if self.fs_type(self.root) != pafs.FileType.Directory:
            return set()
        entries = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return {e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("fit-")}

    def fs_type(self, path: str):
        return self.fs.get_file_info(path).type

    def _registered(self, run: str) -> str | None:
        """The newest checkpoint of ``run`` Ray has registered, of step >= after_step and usable."""
        import pyarrow.fs as pafs

        snapshot = f"{self.root}/{run}/{RAY_SNAPSHOT}"
        if self.fs_type(snapshot) != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_stream(snapshot) as f:
                named = set(re.findall(r"step-\d{6}", f.read().decode()))
        except OSError:
            return None  # being rewritten
        for name in sorted(named, reverse=True):
            if (step_of(name) or 0) >= self.after_step and check(self.fs, f"{self.root}/{run}/{name}") is None:
                return f"{run}/{name}"
        return None

    def run(self) -> None:
        try:
            pids: list[int] = []
            looked = 0.0
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                if time.monotonic() - looked > 0.5:  # know the pids before the moment comes
                    pids, looked = train_worker_pids(), time.monotonic()
                for run in sorted(self._runs() - self.before):
                    if pids and (hit := self._registered(run)):
                        for pid in pids:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                                self.killed.append(pid)
                        self.checkpoint = hit
                        return
                time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001 - handed to the test, which asserts on it
            self.error = e

    def why_not(self) -> str:
        if self.error is not None:
            return f"the watcher failed: {type(self.error).__name__}: {self.error}"
        return (f"no worker was killed: no new run under {self.root} had a registered checkpoint of step "
                f">= {self.after_step} while a Ray Train worker was alive")


@contextlib.contextmanager
def kill_fit_worker(storage: str, after_step: int) -> Iterator[FitWorkerKiller]:
    """Kill the worker(s) of the fit that runs in this block (see the module's docstring)."""
    killer = FitWorkerKiller(storage, after_step)
    killer.start()
    try:
        yield killer
    finally:
        killer.stop.set()
        killer.join(timeout=30)
