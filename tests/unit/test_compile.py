"""compile.py's recipe: what makes two compiles the same Specialist, and finding the version an
earlier one made (the end-to-end reuse is in tests/integration/test_compile.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kolm_ray.compile import CompileConfig, prepare, recipe_digest, stage_reuse
from kolm_ray.errors import GateFailed
from kolm_ray.sampling.config import SampleConfig, TeacherConfig
from kolm_ray.signing import KeySigner, ensure_default_key
from kolm_ray.testing.artifacts import make_artifact
from kolm_ray.train.config import FitConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "routing"


@pytest.fixture
def prepared(tiny_base, tmp_path):
    def make(**changes):
        cfg = dict(task="Route the message.", examples=EXAMPLE / "examples.jsonl", holdout=EXAMPLE / "holdout.jsonl",
                   base=str(tiny_base), name="routing", store=str(tmp_path / "store"), work_dir=tmp_path / "work")
        return prepare(CompileConfig(**{**cfg, **changes}))
    return make


def _signer():
    return KeySigner(ensure_default_key())


def _other_key(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "other.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def _recipe(p, teacher=None, sample=None, fit=None, signer=None):
    return recipe_digest(p, teacher or TeacherConfig(), sample or SampleConfig(), fit or FitConfig(),
                         signer or _signer())


def test_how_a_compile_runs_does_not_change_its_recipe(prepared):
    p = prepared()
    same = _recipe(p)
    assert _recipe(p, fit=FitConfig(cpus_per_worker=0.5, checkpoint_every=7, max_failures=0)) == same
    assert _recipe(p, sample=SampleConfig(concurrency=3, actors=1, max_failed_fraction=0.5)) == same
    assert _recipe(p, teacher=TeacherConfig(timeout_s=5, max_attempts=2)) == same
    assert _recipe(prepared(gate=99.0)) == same  # the gate judges the result; it does not make it


@pytest.mark.parametrize("change", [
    {"fit": FitConfig(epochs=9)}, {"fit": FitConfig(lr=1e-3)}, {"fit": FitConfig(seed=1)},
    {"sample": SampleConfig(k=2)}, {"teacher": TeacherConfig(model="claude-sonnet-4-5")},
])
def test_what_makes_the_specialist_changes_its_recipe(prepared, change):
    p = prepared()
    assert _recipe(p, **change) != _recipe(p)


def test_other_rows_or_task_change_the_recipe(prepared, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text((EXAMPLE / "examples.jsonl").read_text().replace("billing", "Billing", 1))
    assert _recipe(prepared(examples=rows)) != _recipe(prepared())
    assert _recipe(prepared(task="Route it.")) != _recipe(prepared())


def _recorded(p, recipe: str, k: float, tiny_base: Path) -> Path:
    """An artifact in p's store that a compile of ``recipe`` made, with student K ``k``."""
    from kolm_ray.artifact import CONTENT_DIR, pack, unpacked
    from kolm_ray.durable import write_json

    store = Path(p.cfg.store)
    art = make_artifact(store, tiny_base, "routing", (1, 0), task=p.cfg.task,
                        references=[("I was charged twice", "billing")], row_k=[k / 100])
    with unpacked(art) as root:  # add the recipe to the manifest and sign it again
        content = root / CONTENT_DIR
        manifest = json.loads((content / "manifest.json").read_text())
        write_json(content / "manifest.json", {**manifest, "recipe": recipe})
        sig = root / "specialist.sig"
        KeySigner(ensure_default_key()).sign(content, sig)
        art.unlink()
        pack(content, sig, art)
    (store / "recipes" / "routing").mkdir(parents=True)
    (store / "recipes" / "routing" / f"{recipe[:32]}.json").write_text(
        json.dumps({"artifact": art.name, "version": "1.0"}))
    return art


def test_stage_reuse_finds_the_version_of_the_same_recipe(prepared, tiny_base):
    p = prepared(gate=60.0)
    recipe = _recipe(p)
    assert stage_reuse(p, recipe, _signer()) is None  # nothing compiled yet
    art = _recorded(p, recipe, 100.0, tiny_base)
    found = stage_reuse(p, recipe, _signer())
    assert found is not None and found.reused and found.version == "1.0" and Path(found.artifact) == art
    assert found.student.k == 100.0
    assert stage_reuse(p, "0" * 64, _signer()) is None  # another recipe
    art.unlink()
    assert stage_reuse(p, recipe, _signer()) is None  # the artifact is gone: compile again


def test_a_reused_version_below_the_gate_fails_it(prepared, tiny_base):
    p = prepared(gate=90.0)
    recipe = _recipe(p)
    _recorded(p, recipe, 50.0, tiny_base)
    with pytest.raises(GateFailed, match="identical inputs"):
        stage_reuse(p, recipe, _signer())


def test_a_record_naming_another_recipe_is_not_trusted(prepared, tiny_base):
    p = prepared()
    recipe = _recipe(p)
    _recorded(p, "f" * 64, 100.0, tiny_base)  # the manifest says another recipe
    rec = Path(p.cfg.store) / "recipes" / "routing"
    (rec / f"{'f' * 32}.json").rename(rec / f"{recipe[:32]}.json")
    assert stage_reuse(p, recipe, _signer()) is None


def test_a_local_base_counts_by_its_content_not_the_path_written(prepared, tiny_base, tmp_path, monkeypatch):
    import os

    same = _recipe(prepared())
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _recipe(prepared(base=os.path.relpath(tiny_base, elsewhere))) == same  # another way to write it


def test_the_signer_is_in_the_recipe_by_its_public_key(prepared, tmp_path):
    from kolm_ray.signing import SigstoreSigner

    other = _other_key(tmp_path)
    assert _recipe(prepared(), signer=KeySigner(other)) != _recipe(prepared())
    assert _recipe(prepared(), signer=SigstoreSigner()) is None  # keyless: the identity is known only once it signs


def test_the_teachers_endpoint_is_in_the_recipe(prepared, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:8765")
    recorded = _recipe(prepared())
    monkeypatch.delenv("ANTHROPIC_BASE_URL")
    assert _recipe(prepared()) != recorded  # the live API is another teacher than a recorded stand-in


def test_a_version_signed_with_another_key_is_not_reused(prepared, tiny_base, tmp_path):
    p = prepared()
    other = _other_key(tmp_path)
    recipe = _recipe(p, signer=KeySigner(other))
    _recorded(p, recipe, 100.0, tiny_base)  # signed with kolm's own key, not ``other``
    said = []
    assert stage_reuse(p, recipe, KeySigner(other), say=said.append) is None
    assert said and "cannot be reused" in said[0]


def test_a_tampered_version_is_not_reused(prepared, tiny_base):
    import tarfile

    p = prepared()
    recipe = _recipe(p)
    art = _recorded(p, recipe, 100.0, tiny_base)
    with tarfile.open(art) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
    with tarfile.open(art, "w") as t:  # one byte of the adapter flipped, the signature kept
        for m, data in members:
            if data is not None and m.name.endswith("adapter_model.safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            t.addfile(m, None if data is None else __import__("io").BytesIO(data))
    said = []
    assert stage_reuse(p, recipe, _signer(), say=said.append) is None
    assert "cannot be reused" in said[0]
