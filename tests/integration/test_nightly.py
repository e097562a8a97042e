"""The nightly pipeline on the bundled example: a spec that fails its gate leaves the released
version serving; one that passes and compares well goes out behind a canary."""

import json
import subprocess
import sys

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
    args = [a for a in compiled["args"][1:]]
    i = args.index("--name")
    del args[i:i + 2]  # the spec names it
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "a-too-strict.json").write_text(json.dumps(
        {"name": "routing", "env": "nightly", "compile": [*args, "--gate", "K=101"]}))
    (specs / "b-good.json").write_text(json.dumps(
        {"name": "routing", "env": "nightly", "compile": [*args, "--gate", "K=60", "--new-version"], "canary": 10,
         "hold": "1h", "audit": {"rate": 0.25, "shadow": True}}))
    # Inputs identical to the canary just published: nothing new is compiled or published.
    (specs / "c-same.json").write_text(json.dumps(
        {"name": "routing", "env": "nightly", "compile": [*args, "--gate", "K=60"]}))
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
