"""Which checkpoint a re-run resumes from: the newest whose files match its manifests; the
unusable ones are said, never loaded (the killed-fit end to end is in
tests/integration/test_chaos_compile.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kolm_ray.train.checkpoints import (
    RAY_SNAPSHOT, Resume, check, checkpoint_name, choose, manifest_name, prepare_resume, step_of, write_manifest,
)

# ----- the choice (pure, given each checkpoint's check) -----------------------------------------


def _asked(results: dict[str, str | None]):
    asked: list[str] = []

    def usable(name: str) -> str | None:
        asked.append(name)
        return results[name]

    return usable, asked


def test_the_newest_usable_checkpoint_is_chosen_and_older_ones_are_not_even_checked():
    usable, asked = _asked({"step-000010": None, "step-000020": None, "step-000005": "never asked"})
    assert choose(["step-000010", "step-000020", "step-000005"], usable) == Resume("step-000020", 20)
    assert asked == ["step-000020"]


def test_an_unusable_newest_falls_back_to_the_previous_one_and_says_why():
    usable, asked = _asked({"step-000010": None, "step-000020": "kolm/x.pt: 0 bytes, its manifest says 9"})
    r = choose(["step-000020", "step-000010"], usable)
    assert r == Resume("step-000010", 10, (("step-000020", "kolm/x.pt: 0 bytes, its manifest says 9"),))
    assert asked == ["step-000020", "step-000010"]
    assert r.line() == ("checkpoint step-000020 is unreadable (kolm/x.pt: 0 bytes, its manifest says 9); "
                        "resuming from step-000010")


def test_no_usable_checkpoint_starts_over_and_says_so():
    r = choose(["step-000020", "step-000010"], {"step-000020": "no manifest", "step-000010": "empty"}.get)
    assert r == Resume(None, 0, (("step-000020", "no manifest"), ("step-000010", "empty")))
    assert r.line() == ("checkpoints step-000020 (no manifest), step-000010 (empty) are unreadable; "
                        "no usable checkpoint: the fit starts over from step 0")


def test_steps_order_numerically_and_other_folders_are_ignored():
    r = choose(["step-99", "step-100", "tmp", "step-", "checkpoint_2020"], lambda n: None)
    assert r.name == "step-100" and r.step == 100
    assert choose([], lambda n: None) == Resume(None, 0) and Resume(None, 0).line() is None
    assert Resume("step-000010", 10).line() == "resuming from checkpoint step-000010"
    assert [step_of(n) for n in ("step-000010", "step-7", "step-x", "step-000010.tmp")] == [10, 7, None, None]


# ----- the check, on real folders -----------------------------------------------------------------


def _save(run: Path, step: int, world: int = 1, big: bytes = b"\x01" * 4096) -> Path:
    """A checkpoint as ranks save it: rank 0 the engine state, adapter and state.json, every rank
    its own shard, each rank's manifest last."""
    folder = run / checkpoint_name(step)
    for rank in range(world):
        own = run.parent / f"{run.name}.save-{step}-rank{rank}"
        (own / "kolm").mkdir(parents=True)
        (own / "kolm" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(big + bytes([rank]))
        if rank == 0:
            (own / "kolm" / "mp_rank_00_model_states.pt").write_bytes(big)
            (own / "adapter").mkdir()
            (own / "adapter" / "adapter_model.safetensors").write_bytes(b"adapter" * 100)
            (own / "state.json").write_text(json.dumps({"step": step}))
        write_manifest(own, step=step, rank=rank, world=world)
        for p in own.rglob("*"):  # Ray Train merges every rank's folder into the one checkpoint
            if p.is_file():
                (folder / p.relative_to(own)).parent.mkdir(parents=True, exist_ok=True)
                p.rename(folder / p.relative_to(own))
        shutil.rmtree(own)
    return folder


def test_a_whole_checkpoint_passes_and_each_kind_of_damage_is_named(tmp_path):
    good = _save(tmp_path, 10, world=2)
    assert check(None, str(good), step=10, world=2) is None

    truncated = _save(tmp_path, 20, world=2)
    with (truncated / "kolm" / "mp_rank_00_model_states.pt").open("r+b") as f:
        f.truncate(100)
    assert check(None, str(truncated)) == "kolm/mp_rank_00_model_states.pt: 100 bytes, its manifest says 4,096"

    zeroed = _save(tmp_path, 30, world=2)
    (zeroed / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 700)  # same size
    assert check(None, str(zeroed)) == "adapter/adapter_model.safetensors: its content does not match its manifest (SHA-256)"

    shard_lost = _save(tmp_path, 40, world=2)
    (shard_lost / manifest_name(1)).unlink()  # rank 1's upload never finished
    assert check(None, str(shard_lost)) == "the manifest of rank 1 is missing"

    cut_off = _save(tmp_path, 50)
    (cut_off / manifest_name(0)).unlink()
    assert check(None, str(cut_off)).startswith("no manifest")

    (tmp_path / "step-000060").mkdir()
    assert check(None, str(tmp_path / "step-000060")) == "empty"
    assert check(None, str(good), world=1) == "saved by 2 worker(s), this fit has 1"
    assert check(None, str(good), step=20) == "its manifest is of step 10"
    (good / manifest_name(1)).write_text("{not json")
    assert check(None, str(good)) == "the manifest of rank 1 is unreadable"


def _snapshot(run: Path, *names: str) -> None:
    (run / RAY_SNAPSHOT).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in names],
        "latest_checkpoint_result": {"checkpoint_dir_name": names[-1], "metrics": {}}}))


def test_prepare_moves_the_unusable_newer_checkpoints_aside_and_deletes_the_snapshot_that_names_them(tmp_path):
    _save(tmp_path, 10)
    bad = _save(tmp_path, 20)
    (bad / "kolm" / "mp_rank_00_model_states.pt").write_bytes(b"")
    _snapshot(tmp_path, "step-000010", "step-000020")
    resume, lines = prepare_resume(None, str(tmp_path), world=1)
    assert resume.name == "step-000010" and resume.step == 10
    assert lines[0] == ("checkpoint step-000020 is unreadable (kolm/mp_rank_00_model_states.pt: 0 bytes, its manifest "
                        "says 4,096); resuming from step-000010")
    assert "kept aside as step-000020.unusable-" in lines[1] and len(lines) == 2
    assert not bad.exists() and not (tmp_path / RAY_SNAPSHOT).exists()  # Ray would resume from the garbage
    [kept] = tmp_path.glob("step-000020.unusable-*")  # never deleted: a later save of step 20 cannot merge into it
    assert (kept / "kolm" / "mp_rank_00_model_states.pt").is_file()
    assert (tmp_path / "step-000010").is_dir()


def test_checkpoints_an_older_kolm_saved_without_manifests_are_kept_not_deleted(tmp_path):
    for step in (10, 20):
        old = _save(tmp_path, step)
        for m in old.glob("kolm-manifest*"):
            m.unlink()
    resume, lines = prepare_resume(None, str(tmp_path), world=1)
    assert resume.name is None and "starts over from step 0" in lines[0]
    assert sorted(p.name.split(".")[0] for p in tmp_path.glob("step-*.unusable-*")) == ["step-000010", "step-000020"]
    assert prepare_resume(None, str(tmp_path), world=1)[0].name is None  # set aside folders are not checkpoints


def test_a_manifest_entry_without_size_or_digest_rules_the_checkpoint_out_without_a_crash(tmp_path):
    import json

    _save(tmp_path, 10)
    bad = _save(tmp_path, 20)
    [manifest] = bad.glob("kolm-manifest*")
    m = json.loads(manifest.read_text())
    m["files"] = {name: None for name in m["files"]}
    manifest.write_text(json.dumps(m))
    resume, lines = prepare_resume(None, str(tmp_path), world=1)
    assert resume.name == "step-000010" and "without its size and SHA-256" in lines[0]


def test_prepare_keeps_a_snapshot_that_names_only_usable_checkpoints(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    _snapshot(tmp_path, "step-000010", "step-000020")
    resume, lines = prepare_resume(None, str(tmp_path), world=1)
    assert resume == Resume("step-000020", 20) and lines == ["resuming from checkpoint step-000020"]
    assert (tmp_path / RAY_SNAPSHOT).is_file()


@pytest.mark.parametrize("snapshot, said", [
    ('{"checkpoint_results": [{"checkpoint_d', "unreadable: JSONDecodeError"),  # cut off while Ray wrote it
    (json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step-000030"}]}), "names step-000030, which is gone"),
])
def test_a_snapshot_ray_would_refuse_is_removed_and_said(tmp_path, snapshot, said):
    _save(tmp_path, 10)
    (tmp_path / RAY_SNAPSHOT).write_text(snapshot)
    resume, lines = prepare_resume(None, str(tmp_path), world=1)
    assert resume.name == "step-000010"
    assert lines == ["resuming from checkpoint step-000010",
                     f"Ray's list of this run's checkpoints ({RAY_SNAPSHOT}) {said}: removed; resuming from step-000010"]
    assert not (tmp_path / RAY_SNAPSHOT).exists()


def test_prepare_on_a_run_never_started(tmp_path):
    assert prepare_resume(None, str(tmp_path / "fit-none")) == (Resume(None, 0), [])
