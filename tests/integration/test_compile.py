"""`kolm compile` end to end on the bundled example: recorded teacher over the real SDK, a LoRA
fit with DeepSpeed (ZeRO-2, gloo) under Ray Train on CPU, eval, gate, signed artifact."""

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli
from tests.fit_kill import kill_fit_worker

ROOT = Path(__file__).resolve().parents[2]
RUNNER = CliRunner()


def _env(compiled, monkeypatch):
    for k, v in compiled["env"].items():
        monkeypatch.setenv(k, v)


def test_compile_beats_the_base_and_signs_an_artifact(compiled, monkeypatch):
    res = compiled["res"]
    assert res.exit_code == 0, res.output
    for stage in ("preflight", "verifier", "teacher", "fit", "eval", "signed"):
        assert any(line.startswith(stage) for line in res.output.splitlines()), res.output
    checked = next(line for line in res.output.splitlines() if line.startswith("preflight"))
    assert " (Qwen2, local folder) · LoRA on q_proj,k_proj,v_proj,o_proj · chat template ok · " in checked, checked
    art = compiled["home"] / "artifacts" / "routing-1.0.kolm"
    assert art.is_file()
    assert any(line.startswith("K-score ") for line in res.output.splitlines())

    _env(compiled, monkeypatch)
    pub = compiled["home"] / "keys" / "signing.pub"
    ok = RUNNER.invoke(cli, ["verify", str(art), "--key", str(pub)])
    assert ok.exit_code == 0, ok.output

    shown = json.loads(RUNNER.invoke(cli, ["inspect", str(art), "--json"]).output)
    student, base = shown["kscore"]["student"], shown["kscore"]["base"]
    assert student["k"] >= base["k"] + 30, (student, base)
    assert shown["base"]["sha256"] and shown["teacher"]["model"] == "claude-opus-4-7"
    assert shown["fit"]["loss_end"] < shown["fit"]["loss_start"]
    assert set(shown["digests"]) == {"examples", "holdout", "distillation"}
    assert "adapter/adapter_model.safetensors" in shown["files"]


def test_compile_in_a_pipe_prints_progress_lines_with_the_loss_and_an_eta(compiled):
    # Not a terminal (CliRunner's stderr, as a pipe or a job's log): plain lines on stderr, which
    # the fixture's output holds too; the fit's come while it runs, from its workers' steps.
    lines = compiled["res"].output.splitlines()
    fit = [line for line in lines if line.startswith("progress    fit step ")]
    assert fit and all(" · loss " in line for line in fit[1:]), lines
    assert any(" · ETA " in line for line in fit), fit
    last, total = fit[-1].split()[3].split("/")
    assert last == total, fit  # shown to the end
    assert lines.index(fit[-1]) < next(i for i, line in enumerate(lines) if line.startswith("fit         LoRA"))
    assert any(line.startswith("progress    teacher ") and " calls · " in line for line in lines), lines
    assert any(line.startswith("progress    eval ") and " rows · " in line for line in lines), lines


def test_adapter_loads_with_peft(compiled, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tarfile.open(compiled["home"] / "artifacts" / "routing-1.0.kolm") as t:
        t.extractall(tmp_path, filter="data")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "specialist" / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    report = json.loads((tmp_path / "specialist" / "eval.json").read_text())
    row = report["rows"][0]
    assert {"output", "k", "passed"} <= set(row["student"]) and {"output", "k"} <= set(row["base"])


def test_identical_inputs_reuse_the_version_and_pay_nothing(compiled, monkeypatch):
    _env(compiled, monkeypatch)
    store = compiled["home"] / "artifacts"
    served = compiled["server"].stats.requests
    res = RUNNER.invoke(cli, [*compiled["args"], "--gate", "K=60"])
    assert res.exit_code == 0, res.output
    assert "unchanged   identical inputs to routing-1.0: reusing it" in res.output
    assert res.output.strip().splitlines()[-1] == f"artifact    {store / 'routing-1.0.kolm'}"
    assert compiled["server"].stats.requests == served  # no teacher call, not even a cached sample read
    assert sorted(p.name for p in store.glob("*.kolm")) == ["routing-1.0.kolm"]
    # The gate still applies to the reused version: one above its K-score fails it, and nothing is
    # written (a version with K below 100; a perfect one passes every gate: tests/unit/test_compile.py).
    k = json.loads(RUNNER.invoke(cli, ["inspect", str(store / "routing-1.0.kolm"), "--json"]).stdout)["kscore"]
    res = RUNNER.invoke(cli, [*compiled["args"], "--gate", "K=100"])
    if k["student"]["k"] < 100:
        assert res.exit_code == 3, res.output
        assert "compiled from identical inputs" in res.output and "below the gate K=100" in res.output
    else:  # a perfect score meets every gate, the reused version included
        assert res.exit_code == 0, res.output
        assert "unchanged   identical inputs to routing-1.0: reusing it" in res.output
    assert sorted(p.name for p in store.glob("*.kolm")) == ["routing-1.0.kolm"]


def _unmatchable_holdout(compiled, dest: Path) -> Path:
    """The example's holdout with the first row's reference a label the examples never use: no
    student can score 100 on it."""
    src = Path(compiled["args"][compiled["args"].index("--eval") + 1])
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    rows[0]["output"] = "escalate"
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def test_a_gate_no_student_can_meet_exits_3_and_leaves_no_promotable_artifact(compiled, monkeypatch, tmp_path):
    _env(compiled, monkeypatch)
    args = list(compiled["args"])
    args[args.index("--eval") + 1] = str(_unmatchable_holdout(compiled, tmp_path / "holdout.jsonl"))
    res = RUNNER.invoke(cli, [*args, "--gate", "K=100", "--new-version"])
    assert res.exit_code == 3, res.output
    assert "below the gate K=100" in res.output
    assert "(reused)" in res.output  # the finished fit was not redone
    store = compiled["home"] / "artifacts"
    assert sorted(p.name for p in store.glob("*.kolm")) == ["routing-1.0.kolm"]
    assert list((store / "rejected").glob("routing-1.1.report.json"))


def test_fit_killed_midway_resumes_on_rerun(compiled, monkeypatch):
    _env(compiled, monkeypatch)
    args = [*compiled["args"], "--seed", "7", "--max-steps", "30", "--checkpoint-every", "10", "--max-failures", "0"]
    # The worker is SIGKILLed from outside once Ray Train has registered the step-10 checkpoint.
    with kill_fit_worker(compiled["work"] / "train", after_step=10) as killer:
        res = RUNNER.invoke(cli, args)
    assert killer.killed, killer.why_not()
    assert res.exit_code == 1, res.output
    assert "re-run the same compile to resume" in res.output
    res = RUNNER.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "resumed at step" in res.output
    art = sorted((compiled["home"] / "artifacts").glob("routing-*.kolm"))[-1]
    with tarfile.open(art) as t:
        train = json.load(t.extractfile("specialist/train.json"))
    assert train["resumed_from_step"] >= 10
    assert train["steps_this_run"] == 30 - train["resumed_from_step"] < 30
    assert [s for s, _ in train["loss_curve"]] == list(range(1, 31))  # one curve across both runs


def test_a_dying_worker_is_replaced_and_the_fit_resumes(compiled, monkeypatch):
    _env(compiled, monkeypatch)
    # Killed from outside once Ray Train has registered the step-5 checkpoint; its replacement is left alone.
    with kill_fit_worker(compiled["work"] / "train", after_step=5) as killer:
        res = RUNNER.invoke(cli, [*compiled["args"], "--seed", "8", "--max-steps", "16", "--checkpoint-every", "5",
                                  "--max-failures", "1"])
    assert killer.killed, killer.why_not()
    assert res.exit_code == 0, res.output
    assert "resumed at step" in res.output


def test_compare_two_compiles_of_the_example(compiled, monkeypatch):
    """`kolm compare` on two real compiles: the 30-step resumed fit against the first one."""
    _env(compiled, monkeypatch)
    store = compiled["home"] / "artifacts"
    old, new = store / "routing-1.0.kolm", sorted(store.glob("routing-*.kolm"))[-1]
    assert new != old
    res = RUNNER.invoke(cli, ["compare", str(old), str(new)])
    assert res.exit_code == 0, res.output
    labels = [line.split("  ")[0] for line in res.output.splitlines()]
    assert {"K-score", "regressions", "recommended"} <= set(labels), res.output
    shown = json.loads(RUNNER.invoke(cli, ["compare", str(old), str(new), "--json"]).stdout)
    assert shown["shared_rows"] == 40 and shown["recommendation"] in {"promote", "hold", "reject"}
    assert round(shown["delta_k"], 6) == round(shown["new"]["k"] - shown["old"]["k"], 6)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--base", "gpt-5"], "unknown base model 'gpt-5'"),
        (["--gate", "88"], "invalid --gate '88'"),
        (["--name", "Bad Name"], "invalid Specialist name"),
    ],
)
def test_bad_compile_arguments_exit_2(compiled, monkeypatch, extra, words):
    _env(compiled, monkeypatch)
    res = RUNNER.invoke(cli, [*compiled["args"], *extra])
    assert res.exit_code == 2 and words in res.output, res.output


def test_holdout_without_references_exits_2_naming_the_line(compiled, monkeypatch, tmp_path):
    _env(compiled, monkeypatch)
    bad = tmp_path / "holdout.jsonl"
    bad.write_text('{"input": "a", "output": "billing"}\n{"input": "b"}\n')
    args = list(compiled["args"])
    args[args.index("--eval") + 1] = str(bad)
    res = RUNNER.invoke(cli, args)
    assert res.exit_code == 2 and f"{bad}:2:" in res.output


def test_ray_job_submit_runs_a_compile_on_a_head_node(compiled, ray_head):
    """`ray job submit --working-dir . -- python jobs/compile.py ...` against the session's head node."""
    env = {**os.environ, **ray_head.env}
    env.pop("RAY_ADDRESS", None)
    ray = ray_head.ray_bin
    job_env = {**compiled["env"], "PATH": env["PATH"]}
    args = [a.replace(str(ROOT) + "/", "") for a in compiled["args"][1:]]  # relative to the working dir
    address = ["--address", ray_head.dashboard_url]
    for _ in range(60):  # the job agent comes up some seconds after `ray start` returns
        sub = subprocess.run(
            [ray, "job", "submit", *address, "--no-wait", "--submission-id", "kolm-compile-test",
             "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": job_env, "excludes": [".venv", "runs", ".git"]}),
             "--", "python", "jobs/compile.py", *args, "--gate", "K=60", "--new-version"],
            env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        if sub.returncode == 0 or not any(s in sub.stderr for s in ("No available agent", "Connection refused")):
            break
        time.sleep(2)
    assert sub.returncode == 0, sub.stderr[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)  # token from RAY_AUTH_TOKEN
    for _ in range(600):
        status = client.get_job_status("kolm-compile-test")
        if status.is_terminal():
            break
        time.sleep(1)
    logs = client.get_job_logs("kolm-compile-test")
    assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-4000:]}"
    # The job reused the module's finished stages and wrote the next version of the artifact
    # (--new-version: the inputs are identical to routing-1.0's).
    assert "K-score" in logs, logs[-4000:]
    art = Path(next(line.split()[1] for line in logs.splitlines() if line.startswith("artifact ")))
    assert art.parent == compiled["home"] / "artifacts" and art.name != "routing-1.0.kolm" and art.is_file()


def test_a_driver_without_the_clusters_token_is_refused_in_one_line_before_the_teacher(ray_head, tiny_base, tmp_path,
                                                                                         messages_api):
    """The preflight asks the head before joining: a missing token is one line saying how to set
    it, in seconds (Ray itself retries for 20 s and says only "Failed to connect")."""
    import sys

    from kolm_ray.testing.messages_api import replay_responder

    teacher = messages_api(replay_responder({}))  # reachable: the teacher's own preflight passes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    example = ROOT / "examples" / "routing"
    run = subprocess.run(
        [sys.executable, "-m", "kolm_ray.cli", "compile", "--task-file", str(example / "task.txt"),
         "--examples", str(example / "examples.jsonl"), "--eval", str(example / "holdout.jsonl"),
         "--base", str(tiny_base), "--name", "routing", "--work-dir", str(tmp_path / "work"),
         "--address", ray_head.address],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the Ray cluster at {ray_head.address} refused this driver: the head runs with token "
                      "auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token "
                      "(`ray get-auth-token` on the head prints it)"], run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not run.stdout.strip()
    assert teacher.stats.requests == 0  # nothing paid
