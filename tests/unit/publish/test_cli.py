"""`kolm status`, `kolm promote`, `kolm rollback` over a release state on disk."""

import json
import time

from click.testing import CliRunner

from kolm_ray.cli import cli
from kolm_ray.publish.release import EnvState, ReleaseStore, Version, add_version

RUNNER = CliRunner()


def _state(home) -> None:
    def v(ver):
        return Version(version=ver, artifact=f"/a/t-{ver}.kolm", artifact_sha256="0" * 64)

    now = time.time()
    first = add_version(None, "tldr", v("1.0"), now=now - 60, weight=0.05, hold_s=3600, min_samples=10, tolerance=0.5)
    r = add_version(first, "tldr", v("1.1"), now=now, weight=0.05, hold_s=3600, min_samples=10, tolerance=0.5)
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


def test_status_shows_the_audited_evidence_behind_the_decision(kolm_home, monkeypatch):
    from kolm_ray.publish.release import AuditSettings
    from kolm_ray.serve.receipts import AuditRecord, Receipt, ReceiptWriter

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def v(ver):
        return Version(version=ver, artifact=f"/a/t-{ver}.kolm", artifact_sha256="0" * 64)

    started = time.time() - 30
    first = add_version(None, "tldr", v("1.0"), now=started - 60, weight=0.5, hold_s=0, min_samples=10, tolerance=0.5)
    r = add_version(first, "tldr", v("1.1"), now=started, weight=0.5, hold_s=3600, min_samples=10, tolerance=0.5,
                    audit=AuditSettings(rate=1.0, tolerance=5))
    ReleaseStore(kolm_home, "prod").update(lambda s: EnvState(env="prod", releases={"tldr": r}))
    w = ReceiptWriter(kolm_home / "receipts" / "kolm-prod", "w1")
    for i in range(40):
        version = "1.1" if i % 2 else "1.0"
        right = version == "1.0" or i % 4 == 1  # stable always right; the canary half the time
        w.append(Receipt(time=started + 1 + i * 0.1, request_id=f"r{i}", specialist="tldr", version=version,
                         artifact_sha256="0" * 64, route="canary" if i % 2 else "stable", status="ok",
                         input_sha256="i", output_sha256="o", latency_ms=1, prompt_tokens=1, completion_tokens=1,
                         t=None, c=100.0, l=None, k=100.0))
        w.append(AuditRecord(time=started + 2 + i * 0.1, request_id=f"r{i}", specialist="tldr", version=version,
                             artifact_sha256="0" * 64, route="canary" if i % 2 else "stable", status="ok",
                             k=100.0 if right else 0.0, passed=right, cost_usd=0.001))
    w.append(AuditRecord(time=started + 9, request_id="r99", specialist="tldr", version="1.1",
                         artifact_sha256="0" * 64, route="canary", status="failed", error="server: 500"))
    w.close()

    [e] = json.loads(RUNNER.invoke(cli, ["status", "--env", "prod", "--json"]).stdout)["specialists"]
    assert (e["stable_audited_k"], e["canary_audited_k"]) == (100.0, 50.0)
    assert e["audited_calls"] == {"stable": 20, "canary": 20} and e["audit_failed"]["canary"] == 1
    assert abs(e["audit_cost_usd"] - 0.04) < 1e-9
    assert e["bound"]["signal"] == "audited" and e["bound"]["hi"] < -5 and e["bound"]["tolerance"] == 5
    assert e["evidence"]["action"] == "rollback"  # what the controller will do on its next tick
    shown = RUNNER.invoke(cli, ["status", "--env", "prod"]).output
    assert "audited K 50.0, 20 audits" in shown and "1 failed (teacher)" in shown
    assert "evidence (audited K): rollback: audited K 50.0 is below stable's 100.0" in shown


def test_status_reads_a_format_2_receipt_log_on_the_0_to_100_scale(kolm_home, monkeypatch):
    """Receipts written before format 3 hold K on 0-1; status (and the controller) read them on
    0-100 beside new ones, not as K 1.0."""
    import shutil
    from pathlib import Path

    from kolm_ray.publish.release import AuditSettings
    from kolm_ray.serve.receipts import Receipt, ReceiptWriter

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def v(ver):
        return Version(version=ver, artifact=f"/a/t-{ver}.kolm", artifact_sha256="0" * 64)

    started = 1_780_000_000.0 - 60  # the asset's receipts start at 1_780_000_000
    first = add_version(None, "tldr", v("1.0"), now=started - 60, weight=0.5, hold_s=0, min_samples=4, tolerance=0.5)
    r = add_version(first, "tldr", v("1.1"), now=started, weight=0.5, hold_s=0, min_samples=4, tolerance=0.5,
                    audit=AuditSettings(rate=1.0, min_audits=4))
    ReleaseStore(kolm_home, "prod").update(lambda s: EnvState(env="prod", releases={"tldr": r}))
    logs = kolm_home / "receipts" / "kolm-prod"
    shutil.copytree(Path(__file__).parents[2] / "assets" / "receipts-format-2", logs)
    w = ReceiptWriter(logs, "format-3")  # a replica of the new format beside the old one
    w.append(Receipt(time=started + 100, request_id="new", specialist="tldr", version="1.1", artifact_sha256="0" * 64,
                     route="canary", status="ok", input_sha256="i", output_sha256="o", latency_ms=1, prompt_tokens=1,
                     completion_tokens=1, t=None, c=50.0, l=None, k=50.0))
    w.close()
    [e] = json.loads(RUNNER.invoke(cli, ["status", "--env", "prod", "--json"]).stdout)["specialists"]
    assert (e["stable_online_k"], e["canary_online_k"]) == (100.0, 50.0)
    assert (e["stable_audited_k"], e["canary_audited_k"]) == (100.0, 25.0)
    assert (e["stable_calls"], e["canary_calls"]) == (4, 5)


def test_a_release_state_written_before_audits_still_loads(kolm_home):
    _state(kolm_home)
    path = kolm_home / "envs" / "prod" / "release.json"
    data = json.loads(path.read_text())
    data["format_version"] = 1
    for r in data["releases"].values():
        r["canary"].pop("audit")
        if r.get("last_decision"):
            r["last_decision"].pop("signal", None)
            r["last_decision"].pop("bound", None)
    path.write_text(json.dumps(data))
    canary = ReleaseStore(kolm_home, "prod").load().releases["tldr"].canary
    assert canary.audit.rate == 0 and canary.version == "1.1"


def test_shadow_without_an_audit_rate_is_refused_at_the_edge(kolm_home, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = RUNNER.invoke(cli, ["publish", "any.kolm", "--to", "prod", "--shadow"])
    assert res.exit_code == 2 and "needs an audit rate (--audit-rate) above 0" in res.output


def test_a_nightly_spec_carries_the_canarys_audit_settings_and_refuses_bad_ones():
    import pytest
    from pydantic import ValidationError

    from kolm_ray.publish.nightly import NightlySpec

    spec = NightlySpec.model_validate({"name": "r", "env": "prod", "compile": [], "audit": {"rate": 0.2}})
    assert spec.audit.rate == 0.2 and not spec.audit.shadow
    with pytest.raises(ValidationError, match="audit rate"):
        NightlySpec.model_validate({"name": "r", "env": "prod", "compile": [], "audit": {"shadow": True}})


def test_publish_says_which_key_it_trusts_when_one_is_given(specialists, kolm_home, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = RUNNER.invoke(cli, ["publish", str(specialists["route"]), "--to", "prod", "--key",
                              str(specialists["public_key"])])
    assert res.exit_code == 0 and "first version in prod" in res.stdout, res.output
    [line] = [x for x in res.stderr.splitlines() if "trust" in x]
    assert str(specialists["public_key"]) in line


def test_status_counts_the_versions_errors_apart_from_the_serving_paths_503s(kolm_home, monkeypatch):
    """A receipt says what failed: a 503 (overloaded, unavailable) is the serving path's, a 500
    (server_error) or an older receipt without `error` the version's."""
    from kolm_ray.serve.receipts import Receipt, ReceiptWriter

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _state(kolm_home)
    w = ReceiptWriter(kolm_home / "receipts" / "kolm-prod", "w1")
    now = time.time()
    for i, (version, error) in enumerate([("1.1", "overloaded"), ("1.1", "unavailable"), ("1.1", "server_error"),
                                          ("1.0", "overloaded"), ("1.0", None)]):
        w.append(Receipt(time=now + i * 0.1, request_id=f"r{i}", specialist="tldr", version=version,
                         artifact_sha256="0" * 64, route="canary" if version == "1.1" else "stable", status="error",
                         error=error, input_sha256="i", output_sha256=None, latency_ms=1, prompt_tokens=0,
                         completion_tokens=0, t=None, c=None, l=None, k=None))
    w.close()
    [e] = json.loads(RUNNER.invoke(cli, ["status", "--env", "prod", "--json"]).stdout)["specialists"]
    assert (e["canary_calls"], e["canary_errors"], e["canary_unavailable"]) == (3, 1, 2)
    assert (e["stable_calls"], e["stable_errors"], e["stable_unavailable"]) == (2, 1, 1)
    shown = RUNNER.invoke(cli, ["status", "--env", "prod"]).output
    assert "3/10 calls, 1 errors, 2 unavailable (503)" in shown and "2 calls, 1 errors, 1 unavailable (503)" in shown
