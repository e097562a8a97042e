"""The preflight: every set-up mistake a compile can make is refused before the teacher stage, as
one line with the exit code a user sees (2: what they gave; 1: a service that cannot be reached).
Nothing here downloads or starts Ray: the hub is offline or a closed local port."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kolm_ray.errors import InputError, KolmRuntimeError, ServiceUnreachable
from kolm_ray.preflight import check_base, check_setup, check_signer, check_writable, never_fits
from kolm_ray.signing import KeySigner, default_key_paths, ensure_default_key, signer_from_spec
from kolm_ray.testing.cluster import free_port
from kolm_ray.train.base import resolve_base
from kolm_ray.train.config import FitConfig

QWEN2_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _setup(base: str | Path, tmp_path: Path, fit_cfg: FitConfig | None = None, signer=None):
    return check_setup(resolve_base(str(base)), fit_cfg or FitConfig(), signer or KeySigner(ensure_default_key()),
                       store=str(tmp_path / "artifacts"), work_dir=tmp_path / "work",
                       teacher_cache=str(tmp_path / "cache"))


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and the hub offline: nothing is looked up on the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


# ----- the base ------------------------------------------------------------------------------


def test_the_tiny_base_passes_every_check(tiny_base, tmp_path):
    setup = _setup(tiny_base, tmp_path)
    assert setup.base.source == "local folder" and setup.architecture == "Qwen2"
    assert setup.fit_cfg.target_modules == QWEN2_ATTENTION
    assert setup.chat == "chat template ok"
    line = setup.line("2 CPUs")
    assert line.startswith(f"preflight   base {tiny_base} (Qwen2, local folder) · LoRA on q_proj,k_proj,v_proj,o_proj")
    assert "· chat template ok · 2 CPUs · store ok · signer key " in line
    assert (tmp_path / "artifacts").is_dir() and not list((tmp_path / "artifacts").iterdir())  # the probe is gone


def test_a_nonexistent_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such folder") as e:
        resolve_base(str(tmp_path / "missing"))
    assert e.value.exit_code == 2


def test_a_folder_without_weights_is_an_input_error(tiny_base, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_base, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(InputError, match=r"no weights \(\*\.safetensors") as e:
        check_base(resolve_base(str(bare)))
    assert e.value.exit_code == 2 and str(bare) in _one_line(e.value)


def test_a_sharded_folder_missing_a_shard_names_it(tiny_base, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_base, sharded)
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors"):
        check_base(resolve_base(str(sharded)))


def test_an_unknown_short_name_is_an_input_error():
    with pytest.raises(InputError, match="unknown base model 'qwen-9000'") as e:
        resolve_base("qwen-9000")
    assert e.value.exit_code == 2


def test_a_hub_base_offline_and_not_cached_exits_1_at_once(no_hub):
    with pytest.raises(ServiceUnreachable) as e:
        check_base(resolve_base("qwen-2.5-3b-instruct"))
    text = _one_line(e.value)
    assert e.value.exit_code == 1
    assert text.startswith("cannot reach the Hugging Face hub for qwen-2.5-3b-instruct (Qwen/Qwen2.5-3B-Instruct): "
                           "HF_HUB_OFFLINE is set")
    assert "hf download Qwen/Qwen2.5-3B-Instruct" in text and "HF_HOME" in text


def test_a_hub_that_refuses_the_connection_exits_1_within_seconds(no_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import: maybe under no_hub's setting
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ServiceUnreachable) as e:
        check_base(resolve_base("Qwen/Qwen2.5-0.5B-Instruct"), timeout_s=2)
    assert _one_line(e.value).startswith("cannot reach the Hugging Face hub for Qwen/Qwen2.5-0.5B-Instruct: "
                                         "ConnectError")


def test_a_hub_base_in_the_cache_needs_no_hub(no_hub, tiny_base, tmp_path):
    repo = no_hub / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct"
    commit = "0" * 40
    shutil.copytree(tiny_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    setup = _setup("qwen-2.5-0.5b-instruct", tmp_path)
    assert setup.base.source == "HF cache" and setup.base.folder == repo / "snapshots" / commit
    assert setup.fit_cfg.target_modules == QWEN2_ATTENTION


@pytest.fixture
def hub_says(no_hub, monkeypatch):
    """The hub online, its model listing replaced: ``hub_says(answer)`` sets what ``model_info``
    returns (or raises when it is an exception). Nothing reaches the network."""
    from huggingface_hub import HfApi, constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    said: list = []

    def model_info(self, repo_id, **kwargs):
        if isinstance(said[-1], BaseException):
            raise said[-1]
        return said[-1]

    monkeypatch.setattr(HfApi, "model_info", model_info)
    return said.append


def _hub_error(kind):
    from huggingface_hub.errors import HfHubHTTPError
    from httpx2 import Request, Response  # the hub's own HTTP client

    assert issubclass(kind, HfHubHTTPError)
    return kind("refused", response=Response(401, request=Request("GET", "https://huggingface.co/api/models/x")))


def test_a_hub_id_the_hub_does_not_know_is_an_input_error(hub_says):
    from huggingface_hub.errors import RepositoryNotFoundError

    hub_says(_hub_error(RepositoryNotFoundError))
    with pytest.raises(InputError, match="the Hugging Face hub has no model acme/nope") as e:
        check_base(resolve_base("acme/nope"))
    assert e.value.exit_code == 2


def test_a_gated_hub_base_says_how_to_get_access(hub_says):
    from huggingface_hub.errors import GatedRepoError

    hub_says(_hub_error(GatedRepoError))
    with pytest.raises(ServiceUnreachable, match="is gated on the Hugging Face hub: accept its terms .* HF_TOKEN"):
        check_base(resolve_base("llama-3.2-3b-instruct"))


def test_a_hub_repo_without_weights_is_an_input_error(hub_says):
    from huggingface_hub.hf_api import ModelInfo

    hub_says(ModelInfo(id="acme/gguf-only", siblings=[{"rfilename": f} for f in (
        "config.json", "tokenizer.json", "model-q4.gguf", "original/consolidated.safetensors")]))
    with pytest.raises(InputError, match=r"acme/gguf-only on the Hugging Face hub has no weights \(\*\.safetensors"):
        check_base(resolve_base("acme/gguf-only"))  # a weight file in a subfolder is not one from_pretrained reads


def test_a_commit_the_hub_does_not_have_is_an_input_error_naming_it(hub_says):
    from huggingface_hub.errors import RevisionNotFoundError

    commit = "c" * 40
    hub_says(_hub_error(RevisionNotFoundError))
    with pytest.raises(InputError) as e:
        check_base(resolve_base(f"acme/tiny@{commit}"))
    assert e.value.exit_code == 2
    assert _one_line(e.value) == (f"base model acme/tiny@{commit} (acme/tiny): the Hugging Face hub has no "
                                  f"revision '{commit}' of it: give a branch, tag or commit the repository has")


def test_a_hub_that_names_no_commit_never_yields_an_unpinned_base(hub_says, no_hub, tiny_base):
    from huggingface_hub.hf_api import ModelInfo

    commit = "0" * 40
    repo = no_hub / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub_says(ModelInfo(id="acme/tiny"))  # a stand-in hub: no sha
    got = check_base(resolve_base("acme/tiny"))
    assert got.ref.pinned and (got.ref.revision, got.ref.requested) == (commit, "main")  # pinned from the cache
    assert got.source == "HF cache" and got.folder == repo / "snapshots" / commit


# ----- LoRA target modules -------------------------------------------------------------------


def test_a_missing_target_module_is_an_input_error_naming_those_present(tiny_base, tmp_path):
    with pytest.raises(InputError) as e:
        _setup(tiny_base, tmp_path, FitConfig(target_modules=("q_proj", "qkv_proj")))
    text = _one_line(e.value)
    assert e.value.exit_code == 2
    assert text.startswith("--target-modules qkv_proj: no Linear layer of Qwen2 has that name")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in text


def test_default_targets_are_the_architectures_attention_projections():
    from transformers import Phi3Config, Qwen2Config

    from kolm_ray.train.targets import lora_targets, skeleton

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    assert lora_targets(skeleton(Qwen2Config(vocab_size=100, **small)), None) == QWEN2_ATTENTION
    phi3 = skeleton(Phi3Config(**small))  # meta device: Phi-3's 32k vocabulary costs nothing
    assert set(lora_targets(phi3, None)) == {"qkv_proj", "o_proj"}
    with pytest.raises(InputError, match="o_proj, qkv_proj"):
        lora_targets(phi3, ("q_proj",))  # the fixed list of old fails on Phi-3, naming what is there


def test_the_default_on_qwen2_resumes_runs_of_the_explicit_list(tiny_base):
    """A run started with --target-modules q_proj,k_proj,v_proj,o_proj (the old fixed default)
    keeps its run name when the modules come from the architecture."""
    from kolm_ray.train.fit import run_name
    from kolm_ray.train.targets import with_targets

    base = resolve_base(str(tiny_base))
    pairs = [("I was charged twice", "billing")]
    explicit = FitConfig(target_modules=QWEN2_ATTENTION)
    derived = with_targets(FitConfig(), base.path)
    assert derived.model_dump(mode="json") == explicit.model_dump(mode="json")
    assert run_name(base, "route", pairs, derived) == run_name(base, "route", pairs, explicit)


# ----- chat template -------------------------------------------------------------------------


def test_a_chat_template_that_refuses_a_system_message_is_an_input_error(tiny_base, tmp_path):
    strict = tmp_path / "strict"
    shutil.copytree(tiny_base, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(InputError, match="the chat template of base .* fails on kolm's prompt") as e:
        _setup(strict, tmp_path)
    assert "System role not supported" in _one_line(e.value)


# ----- signer and store ----------------------------------------------------------------------


def test_a_public_key_as_signer_is_an_input_error_naming_it(tmp_path):
    ensure_default_key()
    _, pub = default_key_paths()
    with pytest.raises(InputError) as e:
        check_signer(signer_from_spec(f"key:{pub}"))
    assert e.value.exit_code == 2 and _one_line(e.value).startswith(f"{pub}: is a public key")


def test_a_file_that_is_no_key_is_an_input_error_naming_it(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a key")
    with pytest.raises(InputError, match=f"{junk}: is not a PEM private key"):
        check_signer(signer_from_spec(f"key:{junk}"))


def test_the_default_key_passes_and_is_named():
    assert check_signer(signer_from_spec(None)).startswith("signer key ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode bits")
def test_an_unwritable_store_folder_is_an_input_error(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o500)
    try:
        with pytest.raises(InputError, match="artifact store .* is not writable") as e:
            check_writable(store, "artifact store", "--out")
        assert e.value.exit_code == 2
    finally:
        store.chmod(0o700)


def test_a_store_folder_under_a_file_is_an_input_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"artifact store .*file/store is not writable \(Not a directory\): give --out"):
        check_writable(tmp_path / "file" / "store", "artifact store", "--out")


# ----- the cluster ---------------------------------------------------------------------------


def test_only_what_can_never_fit_is_refused():
    from kolm_ray.admission import Demand, QueuePolicy

    policy = QueuePolicy()
    head = {"head": (2.0, 0.0)}
    assert never_fits(Demand(workers=1, cpus_per_worker=1.0), head, policy) is None
    assert never_fits(Demand(workers=4, cpus_per_worker=1.0), head, policy) is None  # 0.5 CPU each: it waits
    assert "5 fit/eval worker(s) of at least 0.5 CPU" in never_fits(Demand(workers=5), head, policy)
    assert "and 1 GPU each" in never_fits(Demand(gpus_per_worker=1.0), head, policy)
    assert never_fits(Demand(gpus_per_worker=1.0), {**head, "autoscaled:gpu:0": (8.0, 1.0)}, policy) is None
    assert never_fits(Demand(), {"head": (0.0, 0.0)}, policy) is not None


def test_a_ray_address_nothing_listens_on_exits_1_at_once(monkeypatch):
    import ray

    from kolm_ray.preflight import join_cluster

    if ray.is_initialized():
        pytest.skip("this process already joined a cluster (the integration tests' session)")
    monkeypatch.setenv("KOLM_VERBOSE", "1")  # keep this process's stderr where pytest -s shows it

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnreachable) as e:
        join_cluster(address)
    text = _one_line(e.value)
    assert e.value.exit_code == 1 and address in text and "ray start --head" in text and "RAY_ADDRESS" in text
    assert isinstance(e.value, KolmRuntimeError)


def test_a_link_of_the_users_where_the_samples_go_is_refused_before_any_teacher_call(tiny_base, tmp_path):
    """kolm replaces what its samples link points to: a user's own link there would lose their folder."""
    mine = tmp_path / "elsewhere"
    mine.mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "samples").symlink_to(mine)
    with pytest.raises(InputError, match="samples") as e:
        _setup(tiny_base, tmp_path)
    assert e.value.exit_code == 2 and mine.is_dir()
