"""The nightly pipeline on the bundled example: a spec that fails its gate leaves the released
version serving; one that passes and compares well goes out behind a canary."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from kolm_ray.publish.release import ReleaseStore
from kolm_ray.signing import Trust

from ..conftest import ROOT


def test_nightly_publishes_only_what_passes_its_gate_and_compare(compiled, monkeypatch, tmp_path):
    from kolm_ray.publish.nightly import run_nightly
    from kolm_ray.publish.service import publish_artifact

    for k, v in compiled["env"].items():
        monkeypatch.setenv(k, v)
    home = compiled["home"]
    trust = Trust(public_key=home / "keys" / "signing.pub")
    publish_artifact(home, "nightly", str(home / "artifacts" / "routing-1.0.kolm"), trust, weight=0.05, hold_s=3600,
                     min_samples=10, tolerance=0.5)
    flags = dict(zip(compiled["args"][1::2], compiled["args"][2::2]))  # ["compile", "--flag", value, ...]
    config = {"task_file": flags["--task-file"], "examples": flags["--examples"], "eval": flags["--eval"],
              "base": flags["--base"], "work_dir": flags["--work-dir"],
              "fit": {"epochs": int(flags["--epochs"]), "lr": float(flags["--lr"])}}
    # A gate no student can meet honestly: K=100 over a holdout whose first row's reference is a
    # label the examples never use (the fit is the one already made; only the eval runs again).
    rows = [json.loads(line) for line in Path(flags["--eval"]).read_text().splitlines() if line.strip()]
    rows[0]["output"] = "escalate"
    unmatchable = tmp_path / "holdout-unmatchable.jsonl"
    unmatchable.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = tmp_path / "specs"
    specs.mkdir()
    # The deprecated form (kolm compile's arguments) still reads.
    args = [a for a in compiled["args"][1:]]
    i = args.index("--name")
    del args[i:i + 2]  # the spec names it
    i = args.index("--eval")
    args[i + 1] = str(unmatchable)
    (specs / "a-too-strict.json").write_text(json.dumps(
        {"name": "routing", "env": "nightly", "compile": [*args, "--gate", "K=100"]}))
    (specs / "b-good.json").write_text(json.dumps(
        {"name": "routing", "env": "nightly", "compile": {**config, "gate": "K=60", "new_version": True},
         "canary": 10, "hold": "1h", "audit": {"rate": 0.25, "shadow": True}}))
    # Inputs identical to the canary just published: nothing new is compiled or published.
    (specs / "compile.yaml").write_text(yaml.safe_dump({**config, "gate": 60}))
    (specs / "c-same.json").write_text(json.dumps({"name": "routing", "env": "nightly", "compile": "compile.yaml"}))
    lines = []
    results = run_nightly(specs, home, trust, say=lines.append)
    assert [r.outcome for r in results] == ["gate_failed", "published", "unchanged"], lines
    r = ReleaseStore(home, "nightly").load().releases["routing"]
    assert (r.phase, r.stable.version, r.canary.weight) == ("canary", "1.0", 0.1)
    assert (r.canary.audit.rate, r.canary.audit.shadow) == (0.25, True)
    assert "rolled out behind 10% traffic" in results[1].detail


def test_nightly_job_with_a_malformed_spec_exits_2(tmp_path):
    (tmp_path / "bad.json").write_text('{"name": "x", "env": "prod"}')
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "nightly.py"), str(tmp_path)], capture_output=True,
                         text=True, env={"KOLM_HOME": str(tmp_path / "home"), "PATH": "/usr/bin"})
    assert res.returncode == 2 and "bad.json: invalid spec: compile: Field required" in res.stderr
