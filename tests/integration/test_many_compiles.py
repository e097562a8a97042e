"""Eight compiles submitted at once with `ray job submit` to one 2-CPU head, three tenants,
against a Messages API stand-in that allows 16 calls in flight: every job finishes (no
deadlock), the teacher never sees more than 16 calls in flight and few 429s, and the queue
admits a tenant that arrived later before another tenant's backlog."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner

from kolm_ray.cli import cli
from tests.conftest import EXAMPLE, ROOT

RUNNER = CliRunner()
LIMIT = 16


def _submit(ray_head, submission_id: str, job_env: dict[str, str], args: list[str]) -> None:
    env = {**os.environ, **ray_head.env}
    env.pop("RAY_ADDRESS", None)
    for _ in range(60):  # the job agent comes up some seconds after `ray start` returns
        sub = subprocess.run(
            [ray_head.ray_bin, "job", "submit", "--address", ray_head.dashboard_url, "--no-wait",
             "--submission-id", submission_id, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": job_env, "excludes": [".venv", "runs", ".git"]}),
             "--", "python", "jobs/compile.py", *args],
            env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        if sub.returncode == 0 or not any(s in sub.stderr for s in ("No available agent", "Connection refused")):
            break
        time.sleep(2)
    assert sub.returncode == 0, sub.stderr[-3000:]


def _queue(monkeypatch_env: dict[str, str]) -> list[dict]:
    res = RUNNER.invoke(cli, ["queue", "--all", "--json"], env=monkeypatch_env)
    assert res.exit_code == 0, res.output
    # stdout alone: Ray relays its raylet's warnings ("12 PYTHON worker processes have been
    # started...") to this test process, the session's driver, whenever they come.
    out = res.stdout
    start = 0 if out.startswith("[") else out.index("\n[") + 1
    return json.JSONDecoder().raw_decode(out, start)[0]


def test_eight_compiles_at_once_finish_within_the_teacher_limit_and_tenants_take_turns(
        ray_head, ray_session, tiny_base, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from kolm_ray.testing.messages_api import MessagesAPIServer, replay_responder

    answers = {json.loads(x)["input"]: json.loads(x)["output"]
               for x in (EXAMPLE / "recorded-teacher.jsonl").read_text().splitlines() if x.strip()}
    server = MessagesAPIServer(replay_responder(answers), latency_s=0.05, max_in_flight=LIMIT).start()
    home = tmp_path / "home"
    env = {"KOLM_HOME": str(home), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "eight-compiles"}
    try:
        # The operator states the organization's limit once; no compile can change it.
        res = RUNNER.invoke(cli, ["teacher-limits", "set", "--max-in-flight", str(LIMIT)], env=env)
        assert res.exit_code == 0, res.output
        task = (EXAMPLE / "task.txt").read_text().strip()
        # Each compile its own task wording: none answers another's teacher calls from the cache.
        jobs = [(f"a{i}", "acme") for i in range(4)] + [(f"b{i}", "bolt") for i in range(3)] + [("c0", "cara")]

        def submit(name: str, tenant: str) -> None:
            args = [f"{task} (batch {name})", "--examples", str(EXAMPLE / "examples.jsonl"),
                    "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", str(tiny_base), "--name", f"many-{name}",
                    "--work-dir", str(tmp_path / "runs" / name), "--n", "24", "--k", "2", "--max-steps", "4",
                    "--tenant", tenant]
            _submit(ray_head, f"many-{name}-{os.getpid()}", {**env, "PATH": ray_head.env["PATH"]}, args)

        client = JobSubmissionClient(ray_head.dashboard_url)
        ids = [f"many-{name}-{os.getpid()}" for name, _ in jobs]
        # Paused, so that every ticket is in the queue before the first is admitted: acme's four
        # first, then bolt's three and cara's one.
        assert RUNNER.invoke(cli, ["queue", "limits", "--pause"], env=env).exit_code == 0
        for name, tenant in jobs:
            submit(name, tenant)
        deadline = time.time() + 900  # eight job drivers import torch on two cores
        while True:
            waiting = sorted((t for t in _queue(env) if t["state"] == "waiting"), key=lambda t: t["position"])
            if len(waiting) == len(jobs):
                break
            ended = [i for i in ids if client.get_job_status(i).is_terminal()]
            assert not ended, client.get_job_logs(ended[0])[-3000:]
            assert time.time() < deadline, f"only {len(waiting)} of {len(jobs)} compiles queued: {waiting}"
            time.sleep(1)
        # `kolm queue` shows the fair order: the tenants take turns, not first come first served
        # (acme's four arrived first: FIFO would admit all of them before anyone else's).
        tenants = [t["tenant"] for t in waiting]
        assert set(tenants[:3]) == {"acme", "bolt", "cara"}, tenants
        assert set(tenants[3:5]) == set(tenants[5:7]) == {"acme", "bolt"} and tenants[7] == "acme", tenants
        assert RUNNER.invoke(cli, ["queue", "limits", "--resume"], env=env).exit_code == 0

        deadline = time.time() + 1200
        while time.time() < deadline and not all(client.get_job_status(i).is_terminal() for i in ids):
            time.sleep(2)
        for i in ids:
            status = client.get_job_status(i)
            assert status == JobStatus.SUCCEEDED, f"{i}: {status}: {client.get_job_logs(i)[-3000:]}"

        tickets = {t["name"]: t for t in _queue(env)}
        assert all(tickets[f"many-{name}"]["state"] == "done" for name, _ in jobs), tickets
        admitted = sorted(tickets.values(), key=lambda t: t["admitted_at"])
        # Two run at once on the 2-CPU head; the third slot goes to the tenant with none running.
        # Tickets admitted in one tick share `admitted_at` (two that finish together free two
        # slots at once), so cara's compile must be admitted no later than the third admission.
        third_at = admitted[2]["admitted_at"]
        assert {t["tenant"] for t in admitted[:2]} == {"acme", "bolt"}, [t["tenant"] for t in admitted]
        assert tickets["many-c0"]["admitted_at"] <= third_at, [(t["tenant"], t["admitted_at"]) for t in admitted]
        # The teacher's limit held: never more than 16 in flight, and 429s are rare.
        paid = server.stats.succeeded
        assert server.stats.max_in_flight <= LIMIT, server.stats
        assert paid >= 8 * 24 * 2 * 0.9
        assert server.stats.rate_limited / paid < 0.05, server.stats
    finally:
        server.stop()
