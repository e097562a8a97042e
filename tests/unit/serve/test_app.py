"""`kolm serve` at the edge (before Ray starts) and the generated `serve deploy` config."""

import json

from click.testing import CliRunner

from kolm_ray.cli import cli

RUNNER = CliRunner()


def test_emit_config_writes_a_serve_deploy_config_that_builds_the_app(specialists, tmp_path):
    from ray.serve import Application

    from kolm_ray.serve.app import app_builder

    out = tmp_path / "serve.json"
    res = RUNNER.invoke(cli, ["serve", str(specialists["route"]), str(specialists["tldr"]), "--key",
                              str(specialists["public_key"]), "--emit-config", str(out), "--port", "8111"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(out.read_text())
    [app] = cfg["applications"]
    assert app["import_path"] == "kolm_ray.serve.app:app_builder" and cfg["http_options"]["port"] == 8111
    assert isinstance(app_builder(app["args"]), Application)


def test_serving_only_refused_artifacts_exits_2(specialists):
    res = RUNNER.invoke(cli, ["serve", str(specialists["tampered"]), "--key", str(specialists["public_key"]),
                              "--emit-config", "unused.json"])
    assert res.exit_code == 2 and "nothing to serve" in res.output
    assert "signature verification failed" in res.output


def test_bad_serve_arguments_exit_2(specialists, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"a": "short"}))
    for args, words in [
        ([str(tmp_path / "missing.kolm")], "artifact not found"),
        ([str(specialists["route"]), "--api-keys", str(keys)], "tokens of 16+ characters"),
        ([str(specialists["route"]), "--base-path", "nodir"], "invalid --base-path"),
        ([str(specialists["route"]), "--detach"], "--detach needs a running cluster"),
    ]:
        res = RUNNER.invoke(cli, ["serve", *args, "--key", str(specialists["public_key"])], env={"RAY_ADDRESS": ""})
        assert res.exit_code == 2 and words in res.output, (args, res.output)


def test_serving_options_reach_the_deploy_config_and_the_teacher_key_does_not(specialists, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret-audit-key")
    out = tmp_path / "serve.json"
    res = RUNNER.invoke(cli, ["serve", str(specialists["route"]), "--key", str(specialists["public_key"]),
                              "--emit-config", str(out), "--batch-greedy", "--audit-rate", "0.25"])
    assert res.exit_code == 0, res.output
    [app] = json.loads(out.read_text())["applications"]
    assert app["args"]["model"]["batch_greedy"] is True and app["args"]["audit"]["rate"] == 0.25
    assert "sk-secret-audit-key" not in out.read_text()
