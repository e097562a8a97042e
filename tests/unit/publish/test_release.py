"""Release state: transitions with reasons, durability, and one writer at a time."""

import errno
import io
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from kolm_ray.errors import InputError, KolmRuntimeError
from kolm_ray.publish.release import EnvState, ReleaseStore, Version, add_version, promote, rollback, routes


def v(ver: str) -> Version:
    return Version(version=ver, artifact=f"/a/t-{ver}.kolm", artifact_sha256="0" * 64, offline_k=90.0)


KW = dict(weight=0.05, hold_s=60, min_samples=10, tolerance=0.5)


def test_first_version_is_stable_then_canary_then_promoted_then_rolled_back():
    r = add_version(None, "t", v("1.0"), now=1, **KW)
    assert r.phase == "stable" and r.canary is None
    r = add_version(r, "t", v("1.1"), now=2, **KW)
    assert r.phase == "canary" and r.canary.version == "1.1" and r.canary.weight == 0.05
    r = promote(r, now=3, reason="online K fine")
    assert (r.phase, r.stable.version, r.previous.version, r.canary) == ("promoted", "1.1", "1.0", None)
    r = rollback(r, now=4, reason="manual")
    assert (r.stable.version, r.previous, r.retired.version) == ("1.0", None, "1.1")
    with pytest.raises(InputError, match="nothing to roll back to"):
        rollback(r, now=5, reason="again")  # a second rollback never brings the rejected version back
    assert [(t.phase, t.version, t.reason) for t in r.history] == [
        ("stable", "1.0", "first version"), ("canary", "1.1", "published behind 5% of traffic"),
        ("promoted", "1.1", "online K fine"), ("rolled_back", "1.1", "manual")]


def test_a_rolled_back_canary_leaves_stable_serving_and_stays_loaded():
    r = rollback(add_version(add_version(None, "t", v("1.0"), now=1, **KW), "t", v("1.1"), now=2, **KW), now=3,
                 reason="regressed")
    assert (r.phase, r.stable.version, r.canary) == ("rolled_back", "1.0", None)
    assert {x.version for x in r.hosted()} == {"1.0", "1.1"}
    with pytest.raises(InputError, match="nothing to roll back to"):
        rollback(r, now=4, reason="again")
    with pytest.raises(InputError, match="already released"):
        add_version(r, "t", v("1.1"), now=5, **KW)
    assert routes(EnvState(env="e", releases={"t": r})) == {"t": {"stable": "1.0", "canary": None, "weight": 0.0,
                                                                  "audit_rate": 0.0, "shadow": False}}


def test_publishing_over_a_running_canary_needs_force_and_a_version_once():
    r = add_version(add_version(None, "t", v("1.0"), now=1, **KW), "t", v("1.1"), now=2, **KW)
    with pytest.raises(InputError, match="still in canary"):
        add_version(r, "t", v("1.2"), now=3, **KW)
    assert add_version(r, "t", v("1.2"), now=3, force=True, **KW).canary.version == "1.2"
    with pytest.raises(InputError, match="already released"):
        add_version(r, "t", v("1.1"), now=3, force=True, **KW)
    with pytest.raises(InputError, match="no canary to promote"):
        promote(add_version(None, "t", v("1.0"), now=1, **KW), now=2, reason="x")


def test_state_survives_a_new_store_and_concurrent_writers_serialize(tmp_path):
    def add(i):
        def change(s: EnvState) -> EnvState:
            first = add_version(None, f"s{i}", v("1.0"), now=i, **KW)
            return s.model_copy(update={"releases": {**s.releases, f"s{i}": first}})
        ReleaseStore(tmp_path, "prod").update(change)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = ReleaseStore(tmp_path, "prod").load()
    assert sorted(state.releases) == sorted(f"s{i}" for i in range(12)) and state.revision == 12


def test_bad_environment_names_are_refused(tmp_path):
    with pytest.raises(InputError, match="invalid environment name"):
        ReleaseStore(tmp_path, "../prod")


# Another process inside ReleaseStore.update: it says so once it holds the lock, then waits.
_HOLDER = """
import sys, time
from pathlib import Path
from kolm_ray.publish.release import ReleaseStore

def change(s):
    print("holding", flush=True)
    time.sleep(120)
    return s

ReleaseStore(Path(sys.argv[1]), "prod").update(change)
"""


@pytest.fixture
def lock_holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_writer_waits_for_the_lock_then_gives_up_saying_why(tmp_path, lock_holder):
    start = time.monotonic()
    with pytest.raises(KolmRuntimeError, match=r"^another publish to 'prod' held the lock for 0.5 s; try again$"):
        ReleaseStore(tmp_path, "prod").update(_first_release("t"), timeout_s=0.5)
    assert time.monotonic() - start >= 0.5
    assert not ReleaseStore(tmp_path, "prod").exists()


def test_a_lock_held_by_a_killed_writer_is_not_left_stale(tmp_path, lock_holder):
    """A publish killed mid-update (SIGKILL: no cleanup runs) must not wedge the environment:
    the OS lets go of its lock with the process, and the next writer takes it at once."""
    lock_holder.kill()
    lock_holder.wait()
    assert (tmp_path / "envs" / "prod" / "release.lock").exists()  # the file stays: only the lock went
    state = ReleaseStore(tmp_path, "prod").update(_first_release("t"), timeout_s=0)
    assert state.releases["t"].stable.version == "1.0" and state.revision == 1


def _first_release(name: str):
    def change(s: EnvState) -> EnvState:
        return s.model_copy(update={"releases": {**s.releases, name: add_version(None, name, v("1.0"), now=1, **KW)}})
    return change


def test_a_release_is_on_disk_when_update_returns(tmp_path, monkeypatch):
    """A power cut cannot be staged here: what can be seen is that the bytes now named
    release.json were fsynced, and its folder after the rename, before `update` returned."""
    store = ReleaseStore(tmp_path, "prod")
    synced = []  # (inode, a folder?, the inode release.json named at that moment)
    fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, stat.S_ISDIR(st.st_mode), store.path.stat().st_ino if store.exists() else None))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.update(_first_release("t"))
    state_file, folder = store.path.stat().st_ino, store.dir.stat().st_ino
    assert (state_file, False) in [(ino, is_dir) for ino, is_dir, _ in synced]
    assert (folder, True, state_file) in synced  # the folder, once the rename to release.json was in it


class _FillsUp:
    """A file on a disk that fills halfway through the first write."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fill_the_disk(monkeypatch, folder, where: str) -> None:
    """From now on, writes in ``folder`` hit ENOSPC: during the bytes' write, or at the fsync
    (where a write-back filesystem reports it)."""
    if where == "fsync":
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
        return
    real_open = io.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and os.path.dirname(os.readlink(f"/proc/self/fd/{f.fileno()}")) == str(folder):
            return _FillsUp(f)
        return f

    monkeypatch.setattr(io, "open", open_on_a_full_disk)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_mid_write_leaves_the_previous_state_whole(tmp_path, monkeypatch, where):
    store = ReleaseStore(tmp_path, "prod")
    store.update(_first_release("t"))
    before = store.path.read_bytes()
    _fill_the_disk(monkeypatch, store.dir, where)
    with pytest.raises(KolmRuntimeError, match=f"cannot write the release state {store.path}: No space left on device"):
        store.update(_first_release("u"))
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert sorted(ReleaseStore(tmp_path, "prod").load().releases) == ["t"]
    assert sorted(p.name for p in store.dir.iterdir()) == ["release.json", "release.lock"]  # no temp file left
    assert store.update(_first_release("u")).revision == 2  # and the next write goes through
