"""The store on a local folder: create-if-absent under races, version allocation that never
overwrites, URIs refused at the edge, and KOLM_HOME split into a store and a POSIX state folder.
The same behaviour against a local S3 server: tests/integration/test_s3_store.py."""

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from kolm_ray.artifact import artifact_name, next_version, put_artifact, release_version, reserve_version
from kolm_ray.errors import InputError, KolmRuntimeError
from kolm_ray.store import LocalStore, fetched, join, location_of, open_store
from tests.races import race


def test_put_if_absent_race_has_exactly_one_winner_whose_bytes_stay(tmp_path):
    store = open_store(tmp_path)
    won = race(16, lambda i: store.put_if_absent("k/one.bin", f"writer {i}".encode() * 1000))
    assert won.count(True) == 1
    winner = won.index(True)
    assert store.read_bytes("k/one.bin") == f"writer {winner}".encode() * 1000
    assert store.list("k") == ["k/one.bin"]  # no temp file left behind


def test_put_if_absent_never_overwrites_an_existing_file(tmp_path):
    (tmp_path / "a.kolm").write_bytes(b"first")
    store = open_store(tmp_path)
    assert store.put_if_absent("a.kolm", b"second") is False
    src = tmp_path / "src"
    src.write_bytes(b"third")
    assert store.put_if_absent("a.kolm", src) is False
    assert (tmp_path / "a.kolm").read_bytes() == b"first"


def test_write_bytes_replaces_atomically_and_reads_back(tmp_path):
    store = open_store(tmp_path)
    store.write_bytes("x/y.json", b"1")
    store.write_bytes("x/y.json", b"22")
    assert store.read_bytes("x/y.json") == b"22" and store.size("x/y.json") == 2
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["y.json"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("x/missing.json")
    store.delete("x/missing.json")  # not an error
    store.delete("x/y.json")
    assert not store.exists("x/y.json") and store.list() == []


def test_directories_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    store = open_store(tmp_path / "store")
    store.upload_dir(src, "d")
    assert store.list("d") == ["d/a.txt", "d/sub/b.txt"]
    assert store.list("d", recursive=False) == ["d/a.txt"]
    out = store.download_dir("d", tmp_path / "out")
    assert (out / "sub" / "b.txt").read_text() == "b"


def test_train_storage_of_a_folder_is_its_absolute_path_and_no_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, fs = open_store("runs").train_storage("train")
    assert path == str(tmp_path / "runs" / "train") and fs is None and Path(path).is_dir()


def test_a_store_pickles_as_its_location(tmp_path):
    import pickle

    store = pickle.loads(pickle.dumps(open_store(tmp_path)))
    assert isinstance(store, LocalStore) and store.uri == str(tmp_path)
    remote = pickle.loads(pickle.dumps(open_store("s3://kolm-bucket/pre/fix")))
    assert remote.uri == "s3://kolm-bucket/pre/fix" and remote.url("a/b") == "s3://kolm-bucket/pre/fix/a/b"


def test_a_created_file_is_on_disk_when_put_if_absent_returns(tmp_path, monkeypatch):
    """A power cut cannot be staged here: what can be seen is that the file's bytes, its name in
    its folder, and the folder made for it in its parent were fsynced before the call returned."""
    store = open_store(tmp_path / "store")
    synced = []  # (inode, a folder?, what the folder held at that moment)
    fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        held = sorted(os.listdir(f"/proc/self/fd/{fd}")) if stat.S_ISDIR(st.st_mode) else None
        synced.append((st.st_ino, stat.S_ISDIR(st.st_mode), held))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert store.put_if_absent(".reserved/tldr-1.0", b"marker") is True
    marker, folder = tmp_path / "store" / ".reserved" / "tldr-1.0", tmp_path / "store" / ".reserved"
    assert (marker.stat().st_ino, False, None) in synced
    folders = [(ino, held) for ino, is_dir, held in synced if is_dir]
    assert any(ino == folder.stat().st_ino and "tldr-1.0" in held for ino, held in folders)
    assert any(ino == folder.parent.stat().st_ino and ".reserved" in held for ino, held in folders)  # made for it


def test_a_full_disk_leaves_no_part_of_an_artifact_and_gives_its_version_back(tmp_path, monkeypatch):
    """The disk fills as the artifact is written (ENOSPC, here where a write-back filesystem
    reports it: at the fsync). The end to end run on a real full tmpfs: tests/integration/test_chaos_disk.py."""
    version = reserve_version(tmp_path, "tldr")
    packed = tmp_path.parent / "packed.kolm"
    packed.write_bytes(b"artifact" * 1000)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(KolmRuntimeError) as e:
        put_artifact(tmp_path, packed, "tldr", version)
    assert f"{tmp_path / 'tldr-1.0.kolm'}: No space left on device" in str(e.value)
    monkeypatch.undo()
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == [".reserved"]  # no part of the artifact, no temp file, no reservation
    assert reserve_version(tmp_path, "tldr") == version  # space freed: the re-run takes the same version
    assert Path(put_artifact(tmp_path, packed, "tldr", version)).read_bytes() == packed.read_bytes()


# ----- version allocation ------------------------------------------------------------------------


def test_two_compiles_of_one_name_get_different_versions(tmp_path):
    """The bug on main: next_version then rename let two compiles both write NAME-1.0.kolm."""
    versions = race(8, lambda i: reserve_version(tmp_path, "tldr"))
    assert sorted(versions) == [(1, i) for i in range(8)]


def test_racing_compiles_each_write_their_own_artifact_and_none_is_overwritten(tmp_path):
    def compile_one(i: int) -> tuple[tuple[int, int], str]:
        version = reserve_version(tmp_path, "tldr")
        packed = tmp_path / f"packed-{i}"
        packed.write_bytes(f"artifact of compile {i}".encode())
        return version, put_artifact(tmp_path, packed, "tldr", version)

    results = race(6, compile_one)
    assert len({v for v, _ in results}) == 6
    for i, (version, where) in enumerate(results):
        assert Path(where) == tmp_path / artifact_name("tldr", version)
        assert Path(where).read_bytes() == f"artifact of compile {i}".encode()


def test_allocation_continues_after_the_highest_existing_version(tmp_path):
    for v in ("tldr-1.0.kolm", "tldr-1.3.kolm", "other-4.0.kolm"):
        (tmp_path / v).write_bytes(b"x")
    assert reserve_version(tmp_path, "tldr") == (1, 4)
    assert reserve_version(tmp_path, "tldr") == (1, 5)  # 1.4 is reserved though not yet written
    assert reserve_version(tmp_path, "other") == (4, 1)
    assert reserve_version(tmp_path, "new") == (1, 0)
    assert next_version(tmp_path, "tldr") == (1, 4)  # the old peek still reads artifacts only


def test_putting_over_an_existing_artifact_is_refused_and_the_file_kept(tmp_path):
    (tmp_path / "tldr-1.0.kolm").write_bytes(b"published")
    packed = tmp_path / "packed"
    packed.write_bytes(b"impostor")
    with pytest.raises(KolmRuntimeError, match="never overwritten"):
        put_artifact(tmp_path, packed, "tldr", (1, 0))
    assert (tmp_path / "tldr-1.0.kolm").read_bytes() == b"published"


def test_stale_listing_cannot_hand_out_an_existing_version(tmp_path, monkeypatch):
    """A listing that misses an artifact (copied in by hand, or a lagging listing): the
    allocation still checks the artifact itself before and after reserving."""
    (tmp_path / "tldr-1.0.kolm").write_bytes(b"published")
    monkeypatch.setattr(LocalStore, "list", lambda self, prefix="", recursive=True: [])
    assert reserve_version(tmp_path, "tldr") == (1, 1)
    assert (tmp_path / "tldr-1.0.kolm").read_bytes() == b"published"


def test_a_released_version_is_handed_out_again_but_never_one_with_an_artifact(tmp_path):
    v = reserve_version(tmp_path, "tldr")
    assert release_version(tmp_path, "tldr", v) is True  # below the gate: no artifact
    assert reserve_version(tmp_path, "tldr") == v
    packed = tmp_path / "packed"
    packed.write_bytes(b"art")
    put_artifact(tmp_path, packed, "tldr", v)
    assert release_version(tmp_path, "tldr", v) is False
    assert reserve_version(tmp_path, "tldr") == (v[0], v[1] + 1)


def test_reservation_markers_say_who_took_the_version(tmp_path):
    reserve_version(tmp_path, "tldr")
    marker = json.loads((tmp_path / ".reserved" / "tldr-1.0").read_text())
    assert {"reserved_at", "host", "pid"} <= set(marker)


def test_an_invalid_name_is_refused_before_anything_is_reserved(tmp_path):
    with pytest.raises(InputError, match="invalid Specialist name"):
        reserve_version(tmp_path, "../etc")
    assert not (tmp_path / ".reserved").exists()


# ----- locations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, words", [
    ("ftp://host/store", "unsupported store"),
    ("http://example.invalid/store", "unsupported store"),
    ("s3://", "names no bucket"),
    ("s3:///prefix", "names no bucket"),
    ("s3://Bad_Bucket/prefix", "not a valid bucket name"),
    ("s3://ab/prefix", "not a valid bucket name"),
    ("s3://kolm-bucket/prefix?access_key=AKIA&secret_key=s", "query string"),
    ("s3://kolm-bucket/../other-bucket", "'..'"),
    ("s3://kolm-bucket/a//b", "empty"),
    ("", "empty store location"),
])
def test_bad_store_uris_are_refused_naming_the_uri(uri, words):
    with pytest.raises(InputError, match=words) as e:
        open_store(uri)
    assert uri.split("?")[0] in str(e.value) or not uri


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a//b"])
def test_keys_escaping_the_root_are_refused(tmp_path, key):
    with pytest.raises(InputError, match="invalid key"):
        open_store(tmp_path).write_bytes(key, b"x")
    assert not (tmp_path.parent / "escape").exists()


def test_gs_has_no_create_if_absent_and_says_so():
    store = open_store("gs://kolm-bucket/artifacts")
    assert store.can_create_if_absent is False
    with pytest.raises(InputError, match="create-if-absent is not supported on gs://") as e:
        store.put_if_absent("a-1.0.kolm", b"x")  # refused before any request: nothing can be overwritten
    assert "gs://kolm-bucket/artifacts/a-1.0.kolm" in str(e.value)


def test_locations_join_and_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert join("s3://b-kt/pre/", "cache", "teacher") == "s3://b-kt/pre/cache/teacher"
    assert join("store", "artifacts") == "store/artifacts"
    assert location_of("s3://kolm-bucket/a/x-1.0.kolm") == "s3://kolm-bucket/a/x-1.0.kolm"
    assert location_of("x-1.0.kolm") == str(tmp_path / "x-1.0.kolm")
    assert open_store("file:///tmp/kolm").uri == "/tmp/kolm"
    (tmp_path / "f").write_text("local")
    with fetched("f") as p:
        assert p.read_text() == "local"


# ----- KOLM_HOME ---------------------------------------------------------------------------------


def test_a_folder_kolm_home_is_both_the_store_and_the_state_folder(kolm_home):
    from kolm_ray import home

    assert home.store_uri() == str(kolm_home) and home.state_dir() == kolm_home == home.kolm_home()
    assert home.teacher_cache_dir() == str(kolm_home / "cache" / "teacher")
    assert home.artifacts_uri() == str(kolm_home / "artifacts")


def test_an_object_storage_kolm_home_keeps_state_on_a_posix_folder(monkeypatch, tmp_path):
    from kolm_ray import home
    from kolm_ray.signing import default_key_paths

    monkeypatch.setenv("KOLM_HOME", "s3://kolm-bucket/team")
    monkeypatch.setenv("KOLM_STATE_DIR", str(tmp_path / "state"))
    assert home.store_uri() == "s3://kolm-bucket/team"
    assert home.teacher_cache_dir() == "s3://kolm-bucket/team/cache/teacher"
    assert home.artifacts_uri() == "s3://kolm-bucket/team/artifacts"
    assert home.state_dir() == tmp_path / "state" == home.kolm_home()
    assert default_key_paths()[0] == tmp_path / "state" / "keys" / "signing.pem"  # keys never in a bucket
    monkeypatch.delenv("KOLM_STATE_DIR")
    assert home.state_dir() == Path.home() / ".kolm"


# ----- the response cache ------------------------------------------------------------------------


def test_a_cache_written_before_stores_still_hits(tmp_path):
    """The layout is unchanged: an entry written by the old ResponseCache (root/KEY[:2]/KEY.json)."""
    from kolm_ray.sampling.cache import CACHE_FORMAT_VERSION, ResponseCache

    key = "ab" + "c" * 62
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / f"{key}.json").write_text(json.dumps({"v": CACHE_FORMAT_VERSION, "text": "old answer"}))
    assert ResponseCache(tmp_path).get(key)["text"] == "old answer"
    ResponseCache(str(tmp_path)).put("cd" + "e" * 62, {"text": "new"})
    assert json.loads((tmp_path / "cd" / ("cd" + "e" * 62 + ".json")).read_text())["text"] == "new"


def test_a_torn_or_foreign_cache_entry_is_a_miss(tmp_path):
    from kolm_ray.sampling.cache import ResponseCache

    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / ("ab" * 32 + ".json")).write_text('{"v": 1, "text": "cut')
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / ("cd" * 32 + ".json")).write_text('{"v": 99, "text": "future"}')
    cache = ResponseCache(tmp_path)
    assert cache.get("ab" * 32) is None and cache.get("cd" * 32) is None


# ----- the compile's store -----------------------------------------------------------------------


def _cfg(tmp_path, store):
    from kolm_ray.compile import CompileConfig

    return CompileConfig(task="t", examples=tmp_path / "e.jsonl", holdout=tmp_path / "h.jsonl", base="b",
                         name="tldr", store=store, work_dir=tmp_path / "w")


def test_compile_store_takes_a_path_or_an_s3_uri_unmangled(tmp_path):
    assert _cfg(tmp_path, tmp_path / "arts").store == str(tmp_path / "arts")
    assert _cfg(tmp_path, "s3://kolm-bucket/arts/").store == "s3://kolm-bucket/arts"


@pytest.mark.parametrize("store, words", [
    ("gs://kolm-bucket/arts", "no create-if-absent"),
    ("ftp://host/arts", "unsupported store"),
])
def test_compile_store_without_create_if_absent_is_refused_at_the_edge(tmp_path, store, words):
    with pytest.raises(InputError, match=words):
        _cfg(tmp_path, store)
