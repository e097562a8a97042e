"""Signed ``.kolm`` artifacts without a compile, for tests and benchmarks of what consumes them
(serving, compare, publish): a random LoRA adapter on a given base, a verifier synthesized from
given references, and a manifest and eval report of the real shape, signed with kolm's key.

The adapter's LoRA B matrices are random (PEFT initializes them to zero, which would make every
adapter a no-op), so two artifacts on one base answer differently.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

from kolm_ray.artifact import ARTIFACT_FORMAT_VERSION, artifact_path, pack
from kolm_ray.durable import write_json
from kolm_ray.signing import KeySigner, ensure_default_key
from kolm_ray.train.base import resolve_base


def random_adapter(base_dir: Path, dest: Path, seed: int, r: int = 4) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM", init_lora_weights=False))
    model.save_pretrained(dest)
    return dest


def make_artifact(
    store: Path, base_dir: Path, name: str, version: tuple[int, int], *, task: str,
    references: Sequence[tuple[str, str]], seed: int = 0, row_k: Sequence[float] | None = None,
    max_new_tokens: int = 16, private_key: Path | None = None, teacher: str = "none (test artifact)",
) -> Path:
    """Write ``store/NAME-MAJOR.MINOR.kolm``; ``references`` are (input, output) holdout rows and
    ``row_k`` the student's per-row score (0-1) the eval report claims for each; ``teacher`` is
    the teacher model the manifest names (audits ask it)."""
    from kolm_ray.verifier import synthesize

    verifier = synthesize(task, [o for _, o in references])
    row_k = list(row_k) if row_k is not None else [1.0] * len(references)
    rows = []
    for i, ((inp, ref), k) in enumerate(zip(references, row_k)):
        checks = verifier.score(ref, inp, ref).model_dump()
        rows.append({"id": f"r{i}", "input": inp, "reference": ref,
                     "student": {**checks, "output": ref if k >= 0.5 else "", "k": k, "passed": k >= 0.5},
                     "base": {**checks, "output": "", "k": 0.0, "passed": False}})
    k_mean = 100 * sum(row_k) / max(1, len(row_k))
    summary = {"k": round(k_mean, 2), "t": None, "c": round(k_mean, 2), "l": None, "n": len(rows),
               "passed": sum(1 for k in row_k if k >= 0.5)}
    base = resolve_base(str(base_dir))
    vstr = f"{version[0]}.{version[1]}"
    manifest = {
        "format_version": ARTIFACT_FORMAT_VERSION, "name": name, "version": vstr,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "task": task,
        "base": {"name": base.name, **base.fingerprint()},
        "prompt": {"system": task, "format": "chat_template"}, "generation": {"max_new_tokens": max_new_tokens},
        "teacher": {"model": teacher, "k": 0, "mode": "none", "samples": 0, "usage": {},
                    "cost_usd": 0.0, "paid_this_run_usd": 0.0},
        "digests": {}, "kscore": {"student": summary, "base": {**summary, "k": 0.0, "c": 0.0, "passed": 0}},
        "gate": None, "compute": {}, "fit": {"steps": 0, "examples": 0, "loss_start": None, "loss_end": None,
                                             "tokens": 0},
    }
    with tempfile.TemporaryDirectory() as td:
        content = Path(td) / "specialist"
        content.mkdir()
        random_adapter(base_dir, content / "adapter", seed)
        for fname, data in {"manifest.json": manifest, "eval.json": {"student": summary, "rows": rows},
                            "train.json": {"config": {}, "loss_curve": []}}.items():
            write_json(content / fname, data)
        (content / "verifier.json").write_text(verifier.to_json())
        sig = Path(td) / "specialist.sig"
        KeySigner(private_key or ensure_default_key()).sign(content, sig)
        dest = artifact_path(store, name, version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return pack(content, sig, dest)



def rebadge(artifact: Path, store: Path, version: tuple[int, int], name: str | None = None,
            private_key: Path | None = None) -> Path:
    """The same Specialist re-signed as another version (an identical adapter), optionally under
    another name: a canary that is no worse than its stable, without a second compile."""
    import json

    from kolm_ray.artifact import CONTENT_DIR, unpacked

    with unpacked(artifact) as root, tempfile.TemporaryDirectory() as td:
        content = root / CONTENT_DIR
        manifest = json.loads((content / "manifest.json").read_text())
        manifest["version"] = f"{version[0]}.{version[1]}"
        manifest["name"] = name or manifest["name"]
        write_json(content / "manifest.json", manifest)
        sig = Path(td) / "specialist.sig"
        KeySigner(private_key or ensure_default_key()).sign(content, sig)
        return pack(content, sig, artifact_path(store, manifest["name"], version))
