"""`kolm sample` end to end: the real anthropic SDK against the local Messages API server,
the fan-out on a local Ray instance, the response cache and the shared quota."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli
from kolm_ray.testing.corpus import ROUTING_TASK, TLDR_TASK, routing_rows, tldr_rows
from kolm_ray.testing.messages_api import FaultPlan, replay_responder, sample_variants
from tests.conftest import ASSETS, cli_json, write_jsonl

RUNNER = CliRunner()


def kolm(*args):
    return RUNNER.invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def tldr_examples(tmp_path):
    rows = tldr_rows(60, seed=5)
    path = tmp_path / "tldr.jsonl"
    # 12 labeled rows teach the verifier and the few-shot prompt; the rest are inputs only.
    path.write_text("\n".join([r.to_json() for r in rows[:12]] + [r.to_json(with_output=False) for r in rows[12:]]) + "\n")
    return rows, path


def test_sample_60_rows_k4_through_429s_and_529s_then_rerun_is_free(ray_session, messages_api, tldr_examples, tmp_path):
    rows, path = tldr_examples
    srv = messages_api(
        replay_responder({r.input: r.output for r in rows}, sample_variants("text")),
        latency_s=0.01,
        faults=FaultPlan(rate_limit=0.15, overloaded=0.1, retry_after_s=0.05, seed=11),
    )
    out = tmp_path / "out"
    # 12 attempts: at a 25% fault rate a sample fails 12 times running once in ~17 million.
    args = ["sample", TLDR_TASK, "--examples", str(path), "--k", "4", "--out", str(out), "--json", "--max-attempts", "12"]
    res = kolm(*args)
    assert res.exit_code == 0, res.output
    summary = cli_json(res)
    assert srv.stats.succeeded == 240  # exactly one paid answer per sample
    assert srv.stats.faults["rate_limit"] > 0 and srv.stats.faults["overloaded"] > 0
    assert summary["calls"] == 240 and summary["cache_hits"] == 0
    assert summary["retries"] == sum(srv.stats.faults.values())
    assert summary["retries_by_kind"] == {"rate_limited": srv.stats.faults["rate_limit"],
                                          "overloaded": srv.stats.faults["overloaded"]}
    assert summary["cost_usd"] > 0 and summary["usage"]["cache_read_tokens"] > 0

    table = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(table) == 240
    chosen = [r for r in table if r["chosen"]]
    assert sorted(r["id"] for r in chosen) == sorted(r.id for r in rows)
    # Best-of-k keeps the clean sample, never the preamble, the clipped or the doubled one.
    by_id = {r.id: r.output for r in rows}
    assert all(r["text"] == by_id[r["id"]] for r in chosen)
    assert summary["acceptance_rate"] >= 0.95
    assert json.loads((out / "verifier.json").read_text())["kind"] == "text"

    before = srv.stats.requests
    res = kolm(*args)
    assert res.exit_code == 0, res.output
    again = cli_json(res)
    assert srv.stats.requests == before  # not one new call
    assert again["calls"] == 0 and again["cache_hits"] == 240 and again["cost_usd"] == 0


def test_labels_without_references_learn_the_verifier_from_samples(ray_session, messages_api, tmp_path):
    rows = routing_rows(24, seed=2)
    labels = sorted({r.output for r in rows})
    messages_api(replay_responder({r.input: r.output for r in rows}, sample_variants("label", labels)))
    path = write_jsonl(tmp_path / "route.jsonl", rows, with_output=False)
    out = tmp_path / "out"
    res = kolm("sample", ROUTING_TASK, "--examples", str(path), "--k", "4", "--out", str(out), "--min-agreement", "0.9")
    assert res.exit_code == 0, res.output
    assert "learned from the teacher's samples" in res.output
    assert "verifier    kind label (samples)" in res.output  # what was learned, and from where
    # Three of four samples agree on every row: 75%, under the 90% asked for, so every row is flagged.
    assert "24 rows below 90%" in res.output
    chosen = [r for r in pq.read_table(out / "samples.parquet").to_pylist() if r["chosen"]]
    assert {r["agreement"] for r in chosen} == {0.75}
    truth = {r.id: r.output for r in rows}
    # One of four samples carries a wrong label; the majority vote keeps the right one.
    wrong = [(r["id"], r["text"], r["k"], truth[r["id"]]) for r in chosen if r["text"] != truth[r["id"]]]
    assert not wrong, res.output


def test_batch_mode_resubmits_errored_requests_and_pays_once(ray_session, messages_api, tldr_examples, tmp_path):
    rows, path = tldr_examples
    srv = messages_api(replay_responder({r.input: r.output for r in rows}), batch_delay_s=0.05, batch_error_rate=0.2)
    out = tmp_path / "out"
    args = ["sample", TLDR_TASK, "--examples", str(path), "--k", "2", "--n", "30", "--batch",
            "--batch-poll", "0.05", "--out", str(out), "--json"]
    res = kolm(*args)
    assert res.exit_code == 0, res.output
    summary = cli_json(res)
    assert summary["mode"] == "batch" and summary["calls"] == 60 and summary["failed_samples"] == 0
    assert srv.stats.succeeded == 60 and srv.stats.batch_requests > 60
    assert srv.stats.requests == 0  # nothing went through the online endpoint
    n = srv.stats.batch_requests
    assert kolm(*args).exit_code == 0
    assert srv.stats.batch_requests == n


def test_outage_past_the_failure_threshold_exits_1_and_writes_nothing(ray_session, messages_api, tldr_examples, tmp_path):
    rows, path = tldr_examples
    messages_api(replay_responder({}), faults=FaultPlan(server_error=1.0))
    out = tmp_path / "out"
    res = RUNNER.invoke(cli, ["sample", TLDR_TASK, "--examples", str(path), "--k", "1", "--n", "10",
                              "--max-attempts", "2", "--out", str(out)])
    assert res.exit_code == 1
    assert "10 of 10 rows got no teacher sample" in res.output
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_quota_is_shared_across_processes_on_the_cluster(ray_session, messages_api, tmp_path):
    """Two 'compiles' in two worker processes, each wanting 16 calls in flight, under one quota of 3."""
    import asyncio
    import os

    from kolm_ray.sampling.config import QuotaConfig

    srv = messages_api(replay_responder({"x": "y"}), latency_s=0.05)
    from kolm_ray.sampling.limits import set_limits
    from kolm_ray.sampling.quota import teacher_quota

    set_limits(max_in_flight=3)  # the operator's limit for the organization
    teacher_quota(os.environ["ANTHROPIC_API_KEY"], srv.url)
    env = {"ANTHROPIC_BASE_URL": srv.url, "ANTHROPIC_API_KEY": os.environ["ANTHROPIC_API_KEY"],
           "KOLM_HOME": os.environ["KOLM_HOME"]}

    @ray_session.remote(num_cpus=0, runtime_env={"env_vars": env})
    def compile_like(seed: int, cache: str) -> int:
        from kolm_ray.sampling.cache import ResponseCache, request_key
        from kolm_ray.sampling.config import TeacherConfig
        from kolm_ray.sampling.prompt import message_params
        from kolm_ray.sampling.quota import NAMESPACE, quota_name
        from kolm_ray.sampling.teacher import AnthropicTeacher
        import ray

        quota = ray.get_actor(quota_name(os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"]), namespace=NAMESPACE)
        teacher = AnthropicTeacher(TeacherConfig(), ResponseCache(cache), quota)
        params = message_params(model="m", system=[], user_input="x", max_tokens=8, temperature=None)

        async def go():
            rs = await asyncio.gather(*(teacher.sample(params, request_key(params, seed * 100 + i)) for i in range(16)))
            return sum(r.text == "y" for r in rs)

        return asyncio.run(go())

    done = ray_session.get([compile_like.remote(1, str(tmp_path / "c1")), compile_like.remote(2, str(tmp_path / "c2"))])
    assert done == [16, 16]
    assert srv.stats.max_in_flight <= 3


@pytest.mark.parametrize(
    "name", ["malformed_json.jsonl", "missing_input.jsonl", "nonstring_input.jsonl", "nonstring_output.jsonl",
             "empty.jsonl", "duplicate_ids.jsonl"],
)
def test_bad_examples_exit_2_naming_file_and_line(name):
    path = ASSETS / "bad" / name
    res = RUNNER.invoke(cli, ["sample", "a task", "--examples", str(path)])
    assert res.exit_code == 2
    assert f"error: {path}" in res.output


def test_bad_arguments_exit_2(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", tldr_rows(3))
    assert RUNNER.invoke(cli, ["sample", "--examples", str(good)]).exit_code == 2  # no task
    res = RUNNER.invoke(cli, ["sample", "t", "--examples", str(good), "--teacher", "gpt-9"])
    assert res.exit_code == 2 and "no price for teacher model 'gpt-9'" in res.output
    assert RUNNER.invoke(cli, ["sample", "t", "--examples", str(good), "--k", "0"]).exit_code == 2


def test_console_script_exit_code_for_bad_input():
    proc = subprocess.run([sys.executable, "-m", "kolm_ray.cli", "sample", "t", "--examples",
                           str(ASSETS / "bad" / "missing_input.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing_input.jsonl:2: missing field \"input\"" in proc.stderr


def test_score_command(tmp_path):
    rows = tldr_rows(24, seed=3)
    ex = write_jsonl(tmp_path / "ex.jsonl", rows)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"input": r.input, "output": r.output, "reference": r.output}) for r in rows))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"input": r.input, "output": ""}) for r in rows))
    res = RUNNER.invoke(cli, ["score", str(good), "--examples", str(ex), "--task", TLDR_TASK, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["k"] >= 95
    res = RUNNER.invoke(cli, ["score", str(bad), "--examples", str(ex), "--task", TLDR_TASK])
    assert res.exit_code == 0 and res.output.startswith("K-score 0.0")
    assert RUNNER.invoke(cli, ["score", str(good)]).exit_code == 2  # no verifier given
