"""Compiles sharing one cluster with serving and with each other, through the compile queue:
the README's pipeline on one head (a detached `kolm serve --env`, then a compile against the
same head), `kolm queue` and `kolm cancel`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from kolm_ray.cli import cli
from tests.conftest import cli_json

RUNNER = CliRunner()
KOLM = str(Path(sys.executable).parent / "kolm")


def _env(compiled, monkeypatch) -> None:
    for k, v in compiled["env"].items():
        monkeypatch.setenv(k, v)


def test_the_readme_pipeline_serves_and_compiles_on_one_head(compiled, ray_session, serve_port, monkeypatch):
    """`kolm serve --env prod --detach` with its default replica size (a whole CPU of the head's
    two), then `kolm compile` against the same head: the compile is admitted with what serving
    left and finishes, and serving keeps answering."""
    from openai import OpenAI
    from ray import serve

    from kolm_ray.publish import controller

    _env(compiled, monkeypatch)
    env = "readme-prod"
    stable = compiled["home"] / "artifacts" / "routing-1.0.kolm"
    assert RUNNER.invoke(cli, ["publish", str(stable), "--to", env]).exit_code == 0
    res = RUNNER.invoke(cli, ["serve", "--env", env, "--port", str(serve_port), "--detach"])
    assert res.exit_code == 0, res.output
    try:
        res = RUNNER.invoke(cli, [*compiled["args"], "--name", "routing-beside-serving", "--max-steps", "8"])
        assert res.exit_code == 0, res.output
        assert "admitted ·" in res.output and "artifact " in res.output
        client = OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="unused", timeout=60)
        reply = client.chat.completions.create(model="routing", messages=[{"role": "user", "content": "I was charged twice"}])
        assert reply.choices[0].message.content is not None
        done = cli_json(RUNNER.invoke(cli, ["queue", "--all", "--json"]))
        mine = [t for t in done if t["name"] == "routing-beside-serving"]
        assert mine and mine[-1]["state"] == "done" and mine[-1]["grant"] is None
    finally:
        controller.stop(env)
        serve.delete(f"kolm-{env}")


def test_a_cancelled_compile_stops_and_gives_its_place_back(compiled, ray_session, monkeypatch, tmp_path):
    """`kolm cancel ID` on a running compile: its driver stops (exit 1, "cancelled"), the queue
    lists it as cancelled, and the next compile is admitted."""
    import os

    _env(compiled, monkeypatch)
    env = {**os.environ}
    args = [KOLM, *compiled["args"][:-4], "--work-dir", str(tmp_path / "w"), "--name", "routing-cancelled",
            "--epochs", "400", "--tenant", "canceller"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ticket = None
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            tickets = cli_json(RUNNER.invoke(cli, ["queue", "--json"]))
            running = [t for t in tickets if t["name"] == "routing-cancelled" and t["state"] == "running"
                       and t["stage"] == "fit"]
            if running:
                ticket = running[0]["id"]
                break
            time.sleep(1)
        assert ticket, "the compile never reached its fit"
        res = RUNNER.invoke(cli, ["cancel", ticket])
        assert res.exit_code == 0 and "cancelled" in res.output, res.output
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]
    assert "was cancelled" in out, out[-5000:]
    listed = {t["id"]: t for t in cli_json(RUNNER.invoke(cli, ["queue", "--all", "--json"]))}
    assert listed[ticket]["state"] == "cancelled" and listed[ticket]["grant"] is None
    assert RUNNER.invoke(cli, ["cancel", ticket]).output.startswith(f"{ticket} had already ended")
    assert RUNNER.invoke(cli, ["cancel", "no-such-ticket"]).exit_code == 2
