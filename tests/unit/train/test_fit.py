"""What a failed fit tells the user ("re-run to resume" only where a re-run can help), and the
fit's learning-rate schedule."""

from __future__ import annotations

from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from kolm_ray.train.fit import failure_message, lr_schedule, resumable

RESUME = "re-run the same compile to resume"


def _raised(e: BaseException) -> UserExceptionWithTraceback:
    return UserExceptionWithTraceback(e, f"Traceback (most recent call last):\n  ...\n{type(e).__name__}: {e}")


def test_a_base_that_cannot_load_is_not_worth_a_rerun():
    err = WorkerGroupError("worker errors", {0: _raised(OSError("We couldn't connect to 'https://huggingface.co'\n"
                                                                 "to load the files")),
                                             1: _raised(OSError("We couldn't connect to 'https://huggingface.co'"))})
    assert not resumable(err)
    text = failure_message(err, 2, "/runs/x/train/fit-1")
    assert RESUME not in text and "Re-running will fail the same way" in text
    assert "OSError: We couldn't connect to 'https://huggingface.co'" in text and "\n" not in text
    assert text.count("OSError") == 1  # the same cause on every worker is said once


def test_a_wrong_target_module_is_not_worth_a_rerun():
    err = WorkerGroupError("worker errors", {0: _raised(ValueError("Target modules {'qkv_proj'} not found"))})
    assert RESUME not in failure_message(err, 2, "/ckpt")


def test_a_dead_worker_resumes_from_the_checkpoints():
    died = WorkerHealthCheckFailedError("A worker health check failed.", RuntimeError("actor died"))
    peer = _raised(RuntimeError("Connection closed by peer"))  # its gloo peer: a symptom of the death
    err = WorkerGroupError("worker errors", {0: died, 1: peer})
    assert resumable(err)
    text = failure_message(err, 0, "/runs/x/train/fit-1")
    assert text.endswith(f"Its checkpoints are kept under /runs/x/train/fit-1: {RESUME}.") and "\n" not in text


def test_a_lost_connection_or_the_controller_resumes():
    assert resumable(WorkerGroupError("worker errors", {0: _raised(ConnectionResetError("reset by peer"))}))
    assert resumable(ControllerError(RuntimeError("the controller lost its placement group")))


def test_ray_2_60_hands_over_the_raised_exception_itself():
    """Ray 2.60's WorkerGroupError holds what the training code raised, unwrapped (its
    WorkerGroupPollStatus.errors takes ``_base_exc`` out of the wrapper)."""
    garbage = WorkerGroupError("worker errors", {0: KeyError("filename 'storages' not found")})
    assert not resumable(garbage)
    assert "Re-running will fail the same way" in failure_message(garbage, 0, "/ckpt")
    died = WorkerGroupError("worker errors", {0: WorkerHealthCheckFailedError("health check failed", RuntimeError("x"))})
    assert resumable(died) and RESUME in failure_message(died, 0, "/ckpt")
    from ray.exceptions import ActorDiedError

    assert resumable(WorkerGroupError("worker errors", {0: ActorDiedError()}))
    assert resumable(WorkerGroupError("worker errors", {0: ConnectionResetError("reset by peer")}))


# ----- the learning-rate schedule ----------------------------------------------------------------


def _optimizer(lr: float = 1.0):
    import torch

    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(round(scheduler.get_last_lr()[0], 6))
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_the_lr_warms_up_to_its_peak_then_decays_to_zero_at_the_last_step():
    """The first step already trains (at 1/warmup of the peak): a warm-up from lr 0, as
    transformers' schedule has it, cost the routing example 7.5 K points."""
    lrs = _lrs(lr_schedule(_optimizer(2.0), warmup=4, total=10), 11)
    assert lrs == [0.5, 1.0, 1.5, 2.0, 2.0, round(2 * 5 / 6, 6), round(2 * 4 / 6, 6), 1.0, round(2 * 2 / 6, 6),
                   round(2 / 6, 6), 0.0]


def test_without_warm_up_the_lr_starts_at_its_peak():
    assert _lrs(lr_schedule(_optimizer(), warmup=0, total=4), 4) == [1.0, 0.75, 0.5, 0.25]
    assert _lrs(lr_schedule(_optimizer(), warmup=0, total=0), 1) == [1.0]  # no steps: nothing to divide by


def test_a_resumed_fit_continues_the_schedule_from_its_checkpoint(tmp_path):
    """DeepSpeed saves the scheduler's state_dict in the checkpoint and loads it into the one a
    resumed worker builds (same warm-up, same total): the curve goes on where it stopped."""
    import torch

    whole = _lrs(lr_schedule(_optimizer(), warmup=3, total=12), 12)
    first = lr_schedule(_optimizer(), warmup=3, total=12)
    before = _lrs(first, 5)
    torch.save({"lr_scheduler": first.state_dict()}, tmp_path / "ckpt.pt")
    resumed = lr_schedule(_optimizer(), warmup=3, total=12)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["lr_scheduler"])
    assert before + _lrs(resumed, 7) == whole
