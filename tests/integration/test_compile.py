"""`kolm compile` end to end on the bundled example: recorded teacher over the real SDK, a LoRA
fit with DeepSpeed (ZeRO-2, gloo) under Ray Train on CPU, eval, gate, signed artifact."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli
from kolm_ray.testing.messages_api import MessagesAPIServer, replay_responder

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "routing"
RUNNER = CliRunner()


def _recorded_teacher() -> MessagesAPIServer:
    answers = {}
    for line in (EXAMPLE / "recorded-teacher.jsonl").read_text().splitlines():
        rec = json.loads(line)
        answers[rec["input"]] = rec["output"]
    return MessagesAPIServer(replay_responder(answers)).start()


@pytest.fixture(scope="module")
def compiled(ray_session, tiny_base, tmp_path_factory):
    """One compile of the bundled example, shared by the tests below."""
    home = tmp_path_factory.mktemp("home")
    work = tmp_path_factory.mktemp("work")
    srv = _recorded_teacher()
    env = {"KOLM_HOME": str(home), "ANTHROPIC_BASE_URL": srv.url, "ANTHROPIC_API_KEY": "recorded"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        args = ["compile", "--task-file", str(EXAMPLE / "task.txt"), "--examples", str(EXAMPLE / "examples.jsonl"),
                "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", str(tiny_base), "--name", "routing",
                "--work-dir", str(work), "--epochs", "8", "--lr", "3e-3"]
        res = RUNNER.invoke(cli, [*args, "--gate", "K=60"])
        yield {"res": res, "home": home, "work": work, "args": args, "env": env, "server": srv, "mp": mp}
    srv.stop()


def _env(compiled, monkeypatch):
    for k, v in compiled["env"].items():
        monkeypatch.setenv(k, v)


def test_compile_beats_the_base_and_signs_an_artifact(compiled, monkeypatch):
    res = compiled["res"]
    assert res.exit_code == 0, res.output
    for stage in ("verifier", "teacher", "fit", "eval", "signed"):
        assert any(line.startswith(stage) for line in res.output.splitlines()), res.output
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


def test_gate_101_exits_3_and_leaves_no_promotable_artifact(compiled, monkeypatch):
    _env(compiled, monkeypatch)
    res = RUNNER.invoke(cli, [*compiled["args"], "--gate", "K=101"])
    assert res.exit_code == 3, res.output
    assert "below the gate K=101" in res.output
    assert "(reused)" in res.output  # the finished fit was not redone
    store = compiled["home"] / "artifacts"
    assert sorted(p.name for p in store.glob("*.kolm")) == ["routing-1.0.kolm"]
    assert list((store / "rejected").glob("routing-1.1.report.json"))


def test_fit_killed_midway_resumes_on_rerun(compiled, monkeypatch):
    _env(compiled, monkeypatch)
    args = [*compiled["args"], "--seed", "7", "--max-steps", "30", "--checkpoint-every", "10", "--max-failures", "0"]
    monkeypatch.setenv("KOLM_FIT_FAIL_AT_STEP", "25")
    res = RUNNER.invoke(cli, args)
    assert res.exit_code == 1, res.output
    assert "re-run the same compile to resume" in res.output
    monkeypatch.delenv("KOLM_FIT_FAIL_AT_STEP")
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
    monkeypatch.setenv("KOLM_FIT_FAIL_AT_STEP", "12")
    res = RUNNER.invoke(cli, [*compiled["args"], "--seed", "8", "--max-steps", "16", "--checkpoint-every", "5",
                              "--max-failures", "1"])
    assert res.exit_code == 0, res.output
    assert "resumed at step" in res.output


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    os.environ.get("KOLM_TEST_JOB_SUBMIT") != "1",
    reason="opt-in (KOLM_TEST_JOB_SUBMIT=1): a second head node beside this session's in-process Ray "
    "is not yet reliable on one machine (the driver was SIGTERMed during `ray start`); see issue 3's note",
)
def test_ray_job_submit_runs_a_compile_on_a_head_node(compiled, tmp_path):
    """`ray job submit ... python jobs/compile.py ...` against a local `ray start --head`."""
    venv_bin = str(Path(sys.executable).parent)
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": "kolm-test-token-0123456789abcdef", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    ray = str(Path(venv_bin) / "ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # Every port explicit: this session's own Ray already holds the defaults (the dashboard
    # agent's 52365 among them), and a second cluster on them would have no job agent.
    extra_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    start = subprocess.run([ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", *extra_ports,
                            "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
                            "--include-dashboard=true", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    try:
        job_env = {**compiled["env"], "PATH": env["PATH"]}
        args = [a.replace(str(ROOT) + "/", "") for a in compiled["args"][1:]]  # relative to the working dir
        address = ["--address", f"http://127.0.0.1:{dash}"]
        for _ in range(60):  # the job agent comes up some seconds after `ray start` returns
            sub = subprocess.run(
                [ray, "job", "submit", *address, "--no-wait", "--submission-id", "kolm-compile-test",
                 "--working-dir", str(ROOT),
                 "--runtime-env-json", json.dumps({"env_vars": job_env, "excludes": [".venv", "runs", ".git"]}),
                 "--", "python", "jobs/compile.py", *args, "--gate", "K=60"],
                env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
            )
            if sub.returncode == 0 or not any(s in sub.stderr for s in ("No available agent", "Connection refused")):
                break
            time.sleep(2)
        assert sub.returncode == 0, sub.stderr[-3000:]
        status = ""
        for _ in range(240):
            status = subprocess.run([ray, "job", "status", *address, "kolm-compile-test"], env=env,
                                    capture_output=True, text=True, timeout=60).stdout
            if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
                break
            time.sleep(2)
        logs = subprocess.run([ray, "job", "logs", *address, "kolm-compile-test"], env=env,
                              capture_output=True, text=True, timeout=60).stdout
        assert "SUCCEEDED" in status, status + logs[-4000:]
        assert "artifact" in logs and "K-score" in logs
    finally:
        _stop_cluster(temp_dir)  # not `ray stop`: that would also stop this session's own Ray


def _stop_cluster(temp_dir: Path) -> None:
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
            procs += [p, *p.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)
