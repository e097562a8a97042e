"""`kolm compile` with a base it cannot get: refused by the preflight before the teacher is paid
for anything (issue 11: it used to pay the whole teacher stage, then fail the fit twice)."""

from __future__ import annotations

from click.testing import CliRunner

from kolm_ray.cli import cli
from tests.conftest import EXAMPLE


def test_an_unreachable_base_exits_1_in_one_line_before_any_teacher_call(messages_api, tmp_path, monkeypatch):
    import ray

    from kolm_ray.testing.messages_api import replay_responder

    teacher = messages_api(replay_responder({}))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    was_joined = ray.is_initialized()
    res = CliRunner().invoke(cli, [
        "compile", "--task-file", str(EXAMPLE / "task.txt"), "--examples", str(EXAMPLE / "examples.jsonl"),
        "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", "qwen-2.5-3b-instruct", "--name", "routing",
        "--out", str(tmp_path / "artifacts"), "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("created a ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: cannot reach the Hugging Face hub for qwen-2.5-3b-instruct (Qwen/Qwen2.5-3B-Instruct)"), res.stderr
    assert "hf download Qwen/Qwen2.5-3B-Instruct" in errors[0]
    stats = teacher.stats
    # No message and no batch reached the teacher: nothing paid. (A free token count checking the
    # key may come first: the teacher's own preflight, `sampling.teacher.probe`.)
    assert (stats.requests, stats.batch_requests, stats.succeeded) == (0, 0, 0)
    assert ray.is_initialized() == was_joined  # refused before joining (or starting) a cluster


def test_an_unreachable_teacher_exits_1_before_any_paid_call_or_ray(tiny_base, tmp_path, monkeypatch):
    import ray

    from kolm_ray.testing.cluster import free_port

    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    was_joined = ray.is_initialized()
    res = CliRunner().invoke(cli, [
        "compile", "--task-file", str(EXAMPLE / "task.txt"), "--examples", str(EXAMPLE / "examples.jsonl"),
        "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", str(tiny_base), "--name", "routing",
        "--out", str(tmp_path / "artifacts"), "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot reach the teacher at http://127.0.0.1:"), res.stderr
    assert "nothing was paid" in errors[0] and "Traceback" not in res.output
    assert ray.is_initialized() == was_joined


def test_the_teacher_preflight_is_a_free_token_count(messages_api, monkeypatch):
    from kolm_ray.sampling.teacher import probe
    from kolm_ray.testing.messages_api import replay_responder

    teacher = messages_api(replay_responder({}))
    probe("claude-opus-4-7")
    assert (teacher.stats.count_tokens, teacher.stats.requests) == (1, 0)  # counted, not a paid message
