"""``write_samples`` replaces a samples folder so that, at every instant and after a crash at
any step, the folder is there and readable, whole: the previous dataset or the new one.

Each step of the write (every mkdir, parquet write, fsync, link, rename, exchange, removal) is
a place to crash. A forked child is killed (SIGKILL: no cleanup runs) just before the n-th
step, for every n until the write completes; and in this process an error is raised at each
step, so the cleanup that does run never removes the folder in use."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _killed_at(out: Path, new, n: int) -> int:
    """Write ``new`` over ``out`` in a forked child killed (SIGKILL) just before the n-th step;
    returns its exit code (-9: killed, 0: the write completed first)."""
    from kolm_ray.sampling import fanout

    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind runs when it is killed
        try:
            traced(lambda: os.kill(os.getpid(), signal.SIGKILL), n)
            fanout.write_samples(out, new)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def outcome(tag: str):
    from kolm_ray.sampling.fanout import SampleOutcome, SampleSummary
    from kolm_ray.sampling.pricing import Usage
    from kolm_ray.verifier import synthesize

    samples = pa.Table.from_pylist([{"id": f"r{i}", "tag": tag, "text": f"{tag} {i}"} for i in range(50)])
    verifier = synthesize("Route it.", ["billing", "sales"], ["a", "b"])
    summary = SampleSummary(
        teacher=tag, mode="online", rows=50, k=1, samples=50, calls=50, cache_hits=0, retries=0, retries_by_kind={},
        failed_samples=0, failed_rows=0, failed_row_ids=[], accepted_rows=50, acceptance_rate=1.0, mean_agreement=1.0,
        min_agreement=0.5, low_agreement_rows=0, low_agreement_row_ids=[], usage=Usage(), cost_usd=0.0,
        dataset_usage=Usage(), dataset_cost_usd=0.0, elapsed_s=0.0)
    return SampleOutcome(samples=samples, verifier=verifier, summary=summary)


STEPS = [("os", "mkdir"), ("os", "fsync"), ("os", "symlink"), ("os", "replace"), ("os", "rename"),
         ("shutil", "rmtree"), ("pq", "write_table"), ("fanout", "_exchange")]


def traced(crash, n: int, patch=None) -> list[str]:
    """Call ``crash()`` just before the n-th call (from 1) of any step of a write; returns the
    names of the steps seen. ``patch(module, name, fn)`` sets the wrappers (default: setattr)."""
    import shutil

    from kolm_ray.sampling import fanout

    mods = {"os": os, "shutil": shutil, "pq": pq, "fanout": fanout}
    seen: list[str] = []
    patch = patch or setattr
    for mod, name in STEPS:
        real = getattr(mods[mod], name, None)
        if real is None:
            continue

        def step(*a, _real=real, _name=name, **kw):
            seen.append(_name)
            if len(seen) == n:
                crash()
            return _real(*a, **kw)

        patch(mods[mod], name, step)
    return seen


def _readable(out: Path) -> str:
    """The dataset at ``out``, whole: all three files, of one write. Returns its tag."""
    table = pq.read_table(out / "samples.parquet")
    summary = json.loads((out / "summary.json").read_text())
    json.loads((out / "verifier.json").read_text())
    tags = set(table.column("tag").to_pylist())
    assert tags == {summary["teacher"]} and table.num_rows == 50, (tags, summary["teacher"])
    return summary["teacher"]


def _old(tmp_path: Path, layout: str) -> Path:
    """The previous dataset at ``out``: written by this code (a link to a version), or a plain
    folder as kolm wrote it before."""
    from kolm_ray.sampling.fanout import write_samples

    out = tmp_path / "samples"
    old = outcome("old")
    if layout == "link":
        write_samples(out, old)
    else:
        out.mkdir()
        pq.write_table(old.samples, out / "samples.parquet")
        (out / "verifier.json").write_text(old.verifier.to_json())
        (out / "summary.json").write_text(old.summary.model_dump_json())
    return out


@pytest.mark.parametrize("layout", ["link", "folder"])
def test_a_write_killed_at_any_step_leaves_the_old_or_the_new_dataset(tmp_path, layout):
    new = outcome("new")
    tags, n = [], 1
    while True:
        case = tmp_path / f"n{n}"
        case.mkdir()
        out = _old(case, layout)
        code = _killed_at(out, new, n)
        assert code in (0, -signal.SIGKILL), code
        tags.append(_readable(out))  # whatever step it died at, the dataset is there and whole
        if code == 0:
            break
        n += 1
    # Killed before the switch: the old dataset; from the switch on: the new one; never neither.
    assert tags[0] == "old" and tags[-1] == "new" and n > 5
    assert tags == sorted(tags, key=lambda t: t == "new"), tags  # old ... old new ... new


@pytest.mark.parametrize("layout", ["link", "folder"])
def test_an_error_at_any_step_leaves_a_readable_dataset_and_never_removes_the_one_in_use(tmp_path, layout):
    from kolm_ray.sampling import fanout

    class Boom(Exception):
        pass

    def boom():
        raise Boom

    n = 1
    while True:
        case = tmp_path / f"n{n}"
        case.mkdir()
        out = _old(case, layout)
        with pytest.MonkeyPatch.context() as mp:
            traced(boom, n, mp.setattr)
            try:
                fanout.write_samples(out, outcome("new"))
                finished = True
            except Boom:
                finished = False
        tag = _readable(out)
        if finished:
            assert tag == "new"
            break
        n += 1
    assert n > 5


def test_rewriting_leaves_one_version_and_readers_keep_the_files_they_opened(tmp_path):
    from kolm_ray.sampling.fanout import write_samples

    out = tmp_path / "samples"
    write_samples(out, outcome("one"))
    with open(out / "summary.json") as reader:
        write_samples(out, outcome("two"))
        assert json.loads(reader.read())["teacher"] == "one"  # the replaced version, still readable to it
    assert _readable(out) == "two"
    assert out.is_symlink() and sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".samples.v", "samples"]


# ----- what is at `out` before the write ------------------------------------------------------


def _user_data(tmp_path: Path) -> Path:
    """A folder of the user's own, elsewhere (a big disk), with a file in it."""
    real = tmp_path / "mnt" / "big" / "samples"
    real.mkdir(parents=True)
    (real / "keep.txt").write_text("the user's data")
    return real


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_a_link_the_user_made_is_refused_and_its_target_kept(tmp_path, how):
    from kolm_ray.errors import InputError
    from kolm_ray.sampling.fanout import write_samples

    real = _user_data(tmp_path)
    out = tmp_path / "runs" / "x" / "samples"
    out.parent.mkdir(parents=True)
    os.symlink(real if how == "absolute" else os.path.relpath(real, out.parent), out)
    with pytest.raises(InputError, match="symbolic link") as e:
        write_samples(out, outcome("new"))
    assert str(out) in str(e.value)
    assert (real / "keep.txt").read_text() == "the user's data"  # nothing of the user's removed
    assert os.readlink(out) == (str(real) if how == "absolute" else os.path.relpath(real, out.parent))
    assert sorted(p.name for p in out.parent.iterdir()) == ["samples"]  # no version left behind


def test_a_link_named_like_a_version_but_pointing_elsewhere_is_refused(tmp_path):
    """Only a plain name beside ``out`` is kolm's version: ``../x/.samples.v-...`` is not."""
    from kolm_ray.errors import InputError
    from kolm_ray.sampling.fanout import write_samples

    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    write_samples(elsewhere / "samples", outcome("theirs"))
    version = os.readlink(elsewhere / "samples")
    out = tmp_path / "runs" / "samples"
    out.parent.mkdir()
    os.symlink(os.path.join("..", "other", version), out)
    with pytest.raises(InputError, match="symbolic link"):
        write_samples(out, outcome("new"))
    assert _readable(elsewhere / "samples") == "theirs"


def test_a_file_at_out_is_refused_and_kept(tmp_path):
    from kolm_ray.errors import InputError
    from kolm_ray.sampling.fanout import samples_target, write_samples

    out = tmp_path / "samples"
    out.write_text("not a folder")
    with pytest.raises(InputError, match="is a file") as e:
        samples_target(out)  # what the CLI asks before any teacher call
    assert str(out) in str(e.value)
    with pytest.raises(InputError, match="is a file"):
        write_samples(out, outcome("new"))
    assert out.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]  # nothing swapped aside, nothing leaked


def test_a_name_with_glob_characters_is_swept(tmp_path):
    """What a crashed writer left beside ``samples[1]`` is removed once stale, like any other's."""
    from kolm_ray.sampling.fanout import _STALE_S, write_samples

    out = tmp_path / "samples[1]"
    write_samples(out, outcome("one"))
    stale = [tmp_path / ".samples[1].v-20200101T000000-deadbeef", tmp_path / ".samples[1].old-deadbeef"]
    for p in stale:
        p.mkdir()
        (p / "samples.parquet").write_text("left by a crash")
        old = os.stat(p).st_mtime - 2 * _STALE_S
        os.utime(p, (old, old))
    write_samples(out, outcome("two"))
    assert _readable(out) == "two"
    assert not any(p.exists() for p in stale)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".samples[1].v", "samples[1]"]


def test_a_file_uri_writes_to_its_path_not_a_relative_folder(tmp_path, monkeypatch):
    from kolm_ray.sampling.fanout import write_samples

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    target = tmp_path / "runs" / "samples"
    written = write_samples(target.as_uri(), outcome("new"))
    assert Path(written) == target and _readable(target) == "new"
    assert list(cwd.iterdir()) == []  # no "file:" folder in the working directory


@pytest.mark.parametrize("uri", ["file://otherhost/runs/samples", "http://example.com/samples", "file:///runs/x?y=1"])
def test_a_uri_that_is_no_local_folder_nor_object_storage_is_refused(tmp_path, monkeypatch, uri):
    from kolm_ray.errors import InputError
    from kolm_ray.sampling.fanout import samples_target

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as e:
        samples_target(uri)
    assert uri in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_kolm_sample_refuses_a_users_link_before_any_teacher_call(tmp_path, messages_api):
    from click.testing import CliRunner

    from kolm_ray.cli import cli
    from kolm_ray.testing.messages_api import replay_responder

    srv = messages_api(replay_responder({"q": "a"}))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"input": "q", "output": "a"}) + "\n")
    real = _user_data(tmp_path)
    out = tmp_path / "out"
    os.symlink(real, out)
    res = CliRunner().invoke(cli, ["sample", "Answer.", "--examples", str(rows), "--k", "1", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "symbolic link" in res.output and str(out) in res.output
    assert srv.stats.requests == 0 and srv.stats.count_tokens == 0  # nothing asked of the teacher
    assert (real / "keep.txt").read_text() == "the user's data"
