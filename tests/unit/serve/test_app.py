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


def test_the_endpoint_is_the_running_serves_and_a_different_port_asked_for_is_refused():
    import pytest

    from kolm_ray.errors import InputError
    from kolm_ray.serve.app import RunningServe, endpoint

    running = RunningServe(host="127.0.0.1", port=8000, route_prefixes={"kolm": "/"})
    assert endpoint("127.0.0.1", 8001, None, insist=True) == ("127.0.0.1", 8001)  # Serve starts where asked
    assert endpoint("127.0.0.1", 8000, running, insist=True) == ("127.0.0.1", 8000)
    assert endpoint("127.0.0.1", 8000, RunningServe("0.0.0.0", 8123, {}), insist=False) == ("0.0.0.0", 8123)
    with pytest.raises(InputError, match=r"already listens on 127.0.0.1:8000 .*use --port 8000, or stop Serve"):
        endpoint("127.0.0.1", 8001, running, insist=True)
    with pytest.raises(InputError, match="use --host 0.0.0.0 --port 8000"):
        endpoint("127.0.0.1", 8000, RunningServe("0.0.0.0", 8000, {}), insist=True)


def test_a_route_prefix_held_by_another_app_is_refused_naming_it_and_the_fix():
    import pytest

    from kolm_ray.errors import InputError
    from kolm_ray.serve.app import RunningServe, check_route_prefix

    running = RunningServe(host="127.0.0.1", port=8000, route_prefixes={"kolm": "/", "tight": "/tight"})
    check_route_prefix(running, "kolm", "/")  # redeploying an app on its own prefix updates it
    check_route_prefix(running, "other", "/other")
    with pytest.raises(InputError, match=r"route prefix / is held by the app 'kolm'.*--route-prefix /other "
                                         r"--app-name other.*kolm serve --stop --app-name kolm"):
        check_route_prefix(running, "second", "/")


def test_stop_needs_a_cluster_and_takes_no_artifacts(specialists):
    res = RUNNER.invoke(cli, ["serve", "--stop", "--app-name", "kolm"], env={"RAY_ADDRESS": ""})
    assert res.exit_code == 2 and "--stop needs the cluster the app runs on" in res.output
    res = RUNNER.invoke(cli, ["serve", str(specialists["route"]), "--stop"], env={"RAY_ADDRESS": ""})
    assert res.exit_code == 2 and "--stop takes no ARTIFACTS" in res.output


def test_serve_says_which_key_it_trusts_when_one_is_given(specialists, tmp_path):
    res = RUNNER.invoke(cli, ["serve", str(specialists["route"]), "--key", str(specialists["public_key"]),
                              "--emit-config", str(tmp_path / "serve.json")])
    assert res.exit_code == 0, res.output
    [line] = [x for x in res.stderr.splitlines() if "trust" in x]
    assert str(specialists["public_key"]) in line
