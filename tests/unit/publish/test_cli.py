"""`kolm status`, `kolm promote`, `kolm rollback` over a release state on disk."""

import json
import time

from click.testing import CliRunner

from kolm_ray.cli import cli
from kolm_ray.publish.release import EnvState, ReleaseStore, Version, publish

RUNNER = CliRunner()


def _state(home) -> None:
    def v(ver):
        return Version(version=ver, artifact=f"/a/t-{ver}.kolm", artifact_sha256="0" * 64)

    now = time.time()
    r = publish(publish(None, "tldr", v("1.0"), now=now - 60, weight=0.05, hold_s=3600, min_samples=10, tolerance=0.5),
                "tldr", v("1.1"), now=now, weight=0.05, hold_s=3600, min_samples=10, tolerance=0.5)
    ReleaseStore(home, "prod").update(lambda s: EnvState(env="prod", releases={"tldr": r}))


def test_status_promote_rollback(kolm_home, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _state(kolm_home)
    shown = RUNNER.invoke(cli, ["status", "--env", "prod"])
    assert shown.exit_code == 0 and "canary 1.1 at 5%" in shown.output and "0/10 calls" in shown.output
    st = json.loads(RUNNER.invoke(cli, ["status", "--env", "prod", "--json"]).stdout)
    assert st["specialists"][0]["phase"] == "canary" and st["specialists"][0]["hold_left_s"] > 0

    res = RUNNER.invoke(cli, ["promote", "tldr", "--env", "prod"])
    assert res.exit_code == 0 and "tldr@1.1 is stable in prod (previous 1.0 kept)" in res.output
    again = RUNNER.invoke(cli, ["promote", "tldr", "--env", "prod"])
    assert again.exit_code == 2 and "no canary to promote" in again.output
    res = RUNNER.invoke(cli, ["rollback", "tldr", "--env", "prod"])
    assert res.exit_code == 0 and "stable 1.0" in res.output
    hist = ReleaseStore(kolm_home, "prod").load().releases["tldr"].history
    assert [(h.phase, h.reason) for h in hist][-2:] == [("promoted", "manual promote"), ("rolled_back", "manual rollback")]


def test_unknown_environment_and_specialist_exit_2(kolm_home, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = RUNNER.invoke(cli, ["status", "--env", "staging"])
    assert res.exit_code == 2 and "no environment 'staging'" in res.output
    _state(kolm_home)
    res = RUNNER.invoke(cli, ["rollback", "nope", "--env", "prod"])
    assert res.exit_code == 2 and "'nope' is not released in 'prod'" in res.output
    res = RUNNER.invoke(cli, ["publish", "missing.kolm", "--to", "prod", "--hold", "soon"])
    assert res.exit_code == 2 and "invalid duration 'soon'" in res.output
