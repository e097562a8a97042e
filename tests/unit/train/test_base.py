import pytest

from kolm_ray.errors import InputError
from kolm_ray.train.base import SHORT_NAMES, resolve_base


def test_short_names_map_to_hub_ids():
    assert resolve_base("qwen-2.5-3b-instruct").path == "Qwen/Qwen2.5-3B-Instruct"
    assert resolve_base("phi-3-mini").path == "microsoft/Phi-3-mini-4k-instruct"
    assert all("/" in v for v in SHORT_NAMES.values())


def test_hub_id_passes_through_unloaded():
    ref = resolve_base("Qwen/Qwen2.5-0.5B-Instruct")
    assert ref.path == "Qwen/Qwen2.5-0.5B-Instruct" and not ref.local
    assert ref.fingerprint() == {"id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "main"}


@pytest.mark.parametrize("name", ["gpt-5", "qwen-9000", "../x", "not a model"])
def test_unknown_base_is_an_input_error(name):
    with pytest.raises(InputError, match="unknown base model"):
        resolve_base(name)


def test_local_folder_needs_a_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        resolve_base(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    ref = resolve_base(str(tmp_path))
    assert ref.local and len(ref.fingerprint()["sha256"]) == 64


def test_tiny_base_loads_with_its_chat_template(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.model_type == "qwen2"
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("unseen wörds ✓").input_ids) == "unseen wörds ✓"  # byte-level: nothing is unknown


def test_the_tokenizer_corpus_ships_with_the_package_and_is_the_synthetic_corpus():
    """The tiny base's tokenizer is trained on package data, not on the test support; the file is
    the text the seeded generators make, so every tiny base (and the tests' expectations of it)
    stays what it was."""
    import tomllib
    from pathlib import Path

    from kolm_ray.testing.corpus import leads_rows, routing_rows, tldr_rows
    from kolm_ray.train.base import TOKENIZER_CORPUS, tokenizer_corpus

    expected = [s for rows in (tldr_rows(200, seed=101), routing_rows(200, seed=101), leads_rows(200, seed=101))
                for r in rows for s in (r.input, r.output)]
    expected.append("You perform this task. Output rules: Answer with exactly one of these labels and nothing else.")
    assert tokenizer_corpus() == expected
    root = Path(__file__).resolve().parents[3]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert TOKENIZER_CORPUS in package_data["kolm_ray.train"]


def test_tiny_bases_are_built_the_same_every_time(tiny_base, tmp_path):
    """Seeded weights and a tokenizer trained on fixed text: two builds are the same files."""
    from kolm_ray.train.base import build_tiny_base, directory_digest

    assert directory_digest(build_tiny_base(tmp_path / "again")) == directory_digest(tiny_base)
