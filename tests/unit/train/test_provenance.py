"""Pinned provenance (issue 13): a hub base is resolved to its commit once, at compile time, and
that commit is what the manifest records and what serving loads; the manifest's lineage fields
and `kolm inspect`. The hub is an offline stand-in: a local folder laid out like the Hugging
Face cache (``models--ORG--NAME/refs/main``, ``snapshots/<commit>/``) under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from kolm_ray.errors import InputError
from kolm_ray.train.base import pin_base, resolve_base, split_source

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "acme/tiny"


@pytest.fixture
def hub_cache(tmp_path, tiny_base, monkeypatch):
    """A Hugging Face cache holding acme/tiny at COMMIT_A (its main), the hub offline. Returns
    the repository's folder; ``huggingface_hub`` reads its constants at import, so they are set too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--tiny"
    shutil.copytree(tiny_base, repo / "snapshots" / COMMIT_A)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def _move_main_to_another_snapshot(repo: Path, tmp_path: Path) -> None:
    """A second snapshot, of other weights, becomes main (what a push to the hub does)."""
    from kolm_ray.train.base import build_tiny_base

    build_tiny_base(repo / "snapshots" / COMMIT_B, hidden_size=64, layers=1, seed=7)
    (repo / "refs" / "main").write_text(COMMIT_B)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ----- resolving and pinning -------------------------------------------------------------------


def test_a_hub_id_resolves_offline_to_the_commit_its_main_names(hub_cache):
    ref = pin_base(resolve_base(REPO))
    assert (ref.revision, ref.requested, ref.pinned) == (COMMIT_A, "main", True)
    assert ref.source == f"{REPO}@{COMMIT_A}"
    assert ref.manifest_entry() == {"name": REPO, "id": REPO, "revision": COMMIT_A, "requested": "main"}
    assert ref.fingerprint() == {"id": REPO, "revision": COMMIT_A}  # the recipe and the run name hash the commit


def test_a_branch_given_by_name_is_resolved_through_its_ref(hub_cache):
    (hub_cache / "refs" / "release").write_text(COMMIT_A)
    ref = pin_base(resolve_base(f"{REPO}@release"))
    assert (ref.path, ref.revision, ref.requested) == (REPO, COMMIT_A, "release")


def _online_but_unreachable(monkeypatch) -> None:
    """The hub asked for (not offline) at an address nothing answers: an outage."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def test_a_commit_is_used_as_is_without_a_lookup(hub_cache, monkeypatch):
    _online_but_unreachable(monkeypatch)  # online, a commit is not even asked about
    ref = resolve_base(f"{REPO}@{COMMIT_B}")  # not in the cache: a commit is not resolved, only used
    assert pin_base(ref) is ref and ref.pinned and ref.source == f"{REPO}@{COMMIT_B}"
    assert "requested" not in ref.manifest_entry() and ref.manifest_entry()["revision"] == COMMIT_B


def test_an_unknown_revision_offline_is_an_input_error_naming_the_base(hub_cache):
    with pytest.raises(InputError) as e:
        pin_base(resolve_base(f"{REPO}@v9"))
    text = str(e.value)
    assert e.value.exit_code == 2
    assert "acme/tiny@v9" in text and "revision 'v9' is not in the Hugging Face cache" in text
    assert "cached refs: main" in text


def test_an_uncached_commit_offline_is_refused_like_a_branch_naming_it(hub_cache):
    assert pin_base(resolve_base(f"{REPO}@{COMMIT_A}")).revision == COMMIT_A  # cached: used as it is
    with pytest.raises(InputError) as e:
        pin_base(resolve_base(f"{REPO}@{COMMIT_B}"))
    text = str(e.value)
    assert e.value.exit_code == 2
    assert f"{REPO}@{COMMIT_B}" in text and f"revision '{COMMIT_B}' is not in the Hugging Face cache" in text
    assert f"hf download {REPO} --revision {COMMIT_B}" in text


def test_an_uncached_commit_of_an_uncached_repo_offline_names_the_commit(hub_cache):
    from kolm_ray.errors import ServiceUnreachable

    with pytest.raises(ServiceUnreachable) as e:
        pin_base(resolve_base(f"acme/other@{COMMIT_B}"))
    assert e.value.exit_code == 1
    assert f"at revision '{COMMIT_B}'" in str(e.value) and f"--revision {COMMIT_B}" in str(e.value)


def test_an_outage_is_not_reported_as_a_bad_revision(hub_cache, monkeypatch):
    from kolm_ray.errors import ServiceUnreachable

    _online_but_unreachable(monkeypatch)
    assert pin_base(resolve_base(REPO)).revision == COMMIT_A  # the cache still says where a cached branch is
    with pytest.raises(ServiceUnreachable) as e:
        pin_base(resolve_base(f"{REPO}@v9"), timeout_s=2)
    text = str(e.value)
    assert e.value.exit_code == 1
    assert text.startswith(f"cannot reach the Hugging Face hub for {REPO}@v9 ({REPO}): ") and "'v9'" in text


def test_an_uppercase_commit_is_a_commit():
    ref = resolve_base(f"{REPO}@{COMMIT_A.upper()}")
    assert ref.pinned and ref.revision == COMMIT_A and ref.source == f"{REPO}@{COMMIT_A}"


@pytest.mark.parametrize("bad", ["acme/tiny@a@b", f"acme/tiny@main@{COMMIT_A}"])
def test_more_than_one_at_is_an_input_error(bad):
    with pytest.raises(InputError, match="one '@' at most") as e:
        resolve_base(bad)
    assert e.value.exit_code == 2 and bad in str(e.value)


def test_a_local_folder_has_no_revision(tiny_base):
    ref = pin_base(resolve_base(str(tiny_base)))
    assert ref.local and ref.revision is None and ref.source == str(tiny_base.resolve())
    assert set(ref.manifest_entry()) == {"name", "id", "sha256"}
    with pytest.raises(InputError, match="a local folder has no revision"):
        resolve_base(f"{tiny_base}@main")


@pytest.mark.parametrize("bad", ["acme/tiny@", "acme/tiny@a b", "acme/tiny@../x"])
def test_a_malformed_revision_is_an_input_error(bad):
    with pytest.raises(InputError, match="invalid revision|unknown base model"):
        resolve_base(bad)


def test_split_source_takes_apart_only_a_pinned_hub_id(tmp_path):
    assert split_source(f"{REPO}@{COMMIT_A}") == (REPO, COMMIT_A)
    assert split_source(REPO) == (REPO, None)
    assert split_source(f"{REPO}@main") == (f"{REPO}@main", None)  # a branch is never loaded: only a commit
    folder = tmp_path / f"models@{COMMIT_A}"
    folder.mkdir()
    assert split_source(str(folder)) == (str(folder), None)  # a folder is a folder, whatever its name


def test_a_moved_main_does_not_change_what_a_pinned_base_loads(hub_cache, tmp_path):
    from kolm_ray.serve.host import AdapterHost

    ref = pin_base(resolve_base(REPO))
    _move_main_to_another_snapshot(hub_cache, tmp_path)
    host = AdapterHost(ref.source, device="cpu")  # what the eval and a serving replica build
    loaded = host.model.state_dict()
    want = _weights(hub_cache / "snapshots" / COMMIT_A)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert loaded[name].shape == want[name].shape and bool((loaded[name] == want[name]).all())
    assert host.model.config.num_hidden_layers == 2  # snapshot B has one layer
    assert pin_base(resolve_base(REPO)).revision == COMMIT_B  # a new compile pins the new main


def test_serving_loads_the_commit_an_artifact_recorded(hub_cache, tmp_path):
    from kolm_ray.artifact import ARTIFACT_FORMAT_VERSION, pack
    from kolm_ray.serve.catalog import _base_path, base_key, open_specialist
    from kolm_ray.signing import KeySigner, Trust, ensure_default_key

    content = tmp_path / "specialist"
    (content / "adapter").mkdir(parents=True)
    (content / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (content / "verifier.json").write_text('{"format_version": 1, "kind": "label"}')
    entry = pin_base(resolve_base(REPO)).manifest_entry()
    (content / "manifest.json").write_text(json.dumps({
        "format_version": ARTIFACT_FORMAT_VERSION, "name": "route", "version": "1.0", "base": entry,
        "prompt": {"system": "Route it."}, "generation": {"max_new_tokens": 16}}))
    key = ensure_default_key()
    KeySigner(key).sign(content, tmp_path / "specialist.sig")
    art = pack(content, tmp_path / "specialist.sig", tmp_path / "route-1.0.kolm")
    _move_main_to_another_snapshot(hub_cache, tmp_path)
    s = open_specialist(art, Trust(public_key=key.with_suffix(".pub")))
    assert s.base_path == f"{REPO}@{COMMIT_A}" and s.base_key == f"{REPO}@{COMMIT_A}"
    old = {"name": REPO, "id": REPO, "revision": "main"}  # a format-1 artifact: loaded from the bare id, as before
    assert base_key(old) == f"{REPO}@main" and split_source(_base_path(old, {})) == (REPO, None)


def test_an_unknown_revision_exits_2_at_the_cli_before_any_teacher_call(hub_cache, messages_api, tmp_path):
    import ray

    from kolm_ray.cli import cli
    from kolm_ray.testing.messages_api import replay_responder
    from tests.conftest import EXAMPLE

    teacher = messages_api(replay_responder({}))
    was_joined = ray.is_initialized()
    res = CliRunner().invoke(cli, [
        "compile", "--task-file", str(EXAMPLE / "task.txt"), "--examples", str(EXAMPLE / "examples.jsonl"),
        "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", f"{REPO}@v9", "--name", "routing",
        "--out", str(tmp_path / "artifacts"), "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "acme/tiny@v9" in errors[0] and "'v9'" in errors[0], res.stderr
    assert (teacher.stats.requests, teacher.stats.batch_requests) == (0, 0)
    assert ray.is_initialized() == was_joined


# ----- the manifest's lineage ------------------------------------------------------------------


def test_package_versions_are_the_installed_ones():
    from kolm_ray.provenance import package_versions

    got = package_versions()
    assert {"torch", "transformers", "peft", "deepspeed", "ray"} <= set(got)
    for name in ("torch", "transformers", "peft", "ray"):
        assert got[name] == metadata.version(name)
    assert package_versions(("no-such-package-kolm",)) == {"no-such-package-kolm": None}


def test_the_teacher_prompt_digest_follows_the_prompt():
    from kolm_ray.sampling.prompt import prompt_digest, system_blocks

    one = prompt_digest(system_blocks("Route the message.", None, [("a", "b")]))
    assert one == prompt_digest(system_blocks("Route the message.", None, [("a", "b")])) and len(one) == 64
    assert one != prompt_digest(system_blocks("Route the message.", None, [("a", "c")]))  # another few-shot


def test_the_parent_is_the_highest_earlier_version_in_the_store(tmp_path):
    from kolm_ray.artifact import parent_version, reserve_version

    store = tmp_path / "store"
    store.mkdir()
    assert parent_version(store, "route", (1, 0)) is None
    (store / "route-1.0.kolm").write_bytes(b"x")
    (store / "route-1.3.kolm").write_bytes(b"x")
    (store / "other-1.4.kolm").write_bytes(b"x")
    assert reserve_version(store, "route") == (1, 4)  # reserved, never written: not a parent
    assert parent_version(store, "route", (1, 5)) == "1.3"
    assert parent_version(store, "route", (1, 3)) == "1.0"


def test_a_store_that_cannot_be_listed_records_no_parent_with_a_note(tmp_path):
    from kolm_ray.provenance import parent_or_none
    from kolm_ray.store import LocalStore

    class Unlistable(LocalStore):
        def list(self, *args, **kwargs):
            raise OSError("listing refused")

    store = tmp_path / "store"
    store.mkdir()
    (store / "route-1.0.kolm").write_bytes(b"x")
    notes: list[str] = []
    assert parent_or_none(store, "route", (1, 1), notes.append) == "1.0" and notes == []
    assert parent_or_none(Unlistable(store), "route", (1, 1), notes.append) is None
    assert len(notes) == 1 and "parent version not recorded" in notes[0] and "listing refused" in notes[0]


def _manifest(**over) -> dict:
    from kolm_ray.artifact import ARTIFACT_FORMAT_VERSION

    k = {"k": 80.0, "t": None, "c": 80.0, "l": None, "n": 2, "passed": 2}
    m = {"format_version": ARTIFACT_FORMAT_VERSION, "name": "route", "version": "1.1",
         "created_at": "2026-01-01T00:00:00Z", "task": "Route it.",
         "base": {"name": "acme/tiny", "id": REPO, "revision": COMMIT_A, "requested": "main"},
         "prompt": {"system": "Route it."},
         "teacher": {"model": "claude-opus-4-7", "k": 2, "mode": "live", "samples": 4, "cost_usd": 0.01,
                     "paid_this_run_usd": 0.01, "prompt_sha256": "c" * 64},
         "digests": {"examples": "d" * 64, "holdout": "e" * 64, "distillation": "f" * 64},
         "kscore": {"student": k, "base": k}, "gate": None, "compute": {"compile_seconds": 1.0},
         "fit": {"steps": 1, "examples": 2, "loss_start": 1.0, "loss_end": 0.5, "tokens": 9},
         "packages": {"torch": "2.9.0", "deepspeed": None}, "parent": "1.0"}
    m.update(over)
    return m


def _packed(tmp_path: Path, manifest: dict) -> Path:
    from kolm_ray.artifact import pack

    content = tmp_path / "content"
    content.mkdir()
    (content / "manifest.json").write_text(json.dumps(manifest))
    sig = tmp_path / "specialist.sig"
    sig.write_text("{}")  # inspect does not verify
    return pack(content, sig, tmp_path / "route-1.1.kolm")


def test_inspect_shows_the_lineage(tmp_path):
    from kolm_ray.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(_packed(tmp_path, _manifest()))])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert f"  base      {REPO}  commit {COMMIT_A} (pinned from main)" in lines
    assert "  teacher   claude-opus-4-7, prompt sha256 " + "c" * 16 in lines
    assert "  examples  sha256 " + "d" * 16 in lines and "  holdout   sha256 " + "e" * 16 in lines
    assert "  parent    1.0" in lines
    assert "  packages  torch 2.9.0 · deepspeed not installed" in lines


def test_inspect_json_carries_the_lineage(tmp_path):
    from kolm_ray.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(_packed(tmp_path, _manifest(parent=None))), "--json"])
    assert res.exit_code == 0, res.output
    lineage = json.loads(res.output)["lineage"]
    assert lineage["base"] == {"id": REPO, "name": "acme/tiny", "revision": COMMIT_A, "requested": "main",
                               "sha256": None, "pinned": True}
    assert lineage["teacher"] == {"model": "claude-opus-4-7", "prompt_sha256": "c" * 64}
    assert (lineage["examples_sha256"], lineage["holdout_sha256"], lineage["parent"]) == ("d" * 64, "e" * 64, None)
    assert lineage["packages"] == {"torch": "2.9.0", "deepspeed": None}


def test_inspect_reads_a_format_1_artifact_and_says_what_it_did_not_record(tmp_path):
    from kolm_ray.cli import cli

    old = _manifest(format_version=1, base={"name": "qwen-2.5-3b-instruct", "id": "Qwen/Qwen2.5-3B-Instruct",
                                            "revision": "main"})
    for field in ("packages", "parent"):
        del old[field]
    del old["teacher"]["prompt_sha256"]
    res = CliRunner().invoke(cli, ["inspect", str(_packed(tmp_path, old))])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert ("  base      Qwen/Qwen2.5-3B-Instruct  revision main, not pinned to a commit "
            "(not recorded (format 1))") in lines
    assert "  parent    not recorded (format 1)" in lines and "  packages  not recorded (format 1)" in lines


def test_an_artifact_of_a_future_format_is_refused(tmp_path):
    from kolm_ray.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(_packed(tmp_path, _manifest(format_version=99)))])
    assert res.exit_code == 2 and "format_version 99 is not supported" in res.output
