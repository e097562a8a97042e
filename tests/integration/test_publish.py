"""`kolm publish` end to end on a local Ray instance: the bundled example's compile as stable,
a rebadged copy as a no-worse canary, an untrained compile (`--max-steps 0`) as a worse one, and a
compile distilled from a teacher that always says "billing" (every answer a valid label, most of
them wrong) as the canary only audits can catch; the canary split, sticky routing keys, the
rollout controller's promote and rollback on audited evidence, a teacher outage that costs no
served call, a Serve restart that keeps the routing, and no failed request through any of it."""

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli
from tests.conftest import cli_json

RUNNER = CliRunner()
ENV = "prod"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "routing"
HOLDOUT = [json.loads(line) for line in (EXAMPLE / "holdout.jsonl").read_text().splitlines()]


def _invoke(args, compiled, mp):
    for k, v in compiled["env"].items():
        mp.setenv(k, v)
    res = RUNNER.invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res


def _status(compiled, mp) -> dict:
    [entry] = cli_json(_invoke(["status", "--env", ENV, "--json"], compiled, mp))["specialists"]
    return entry


def _wait_for(pred, what: str, timeout_s: float = 120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


INPUTS = [r["input"] for r in HOLDOUT]


async def _fire(url: str, n: int, concurrency: int, user=lambda i: None, offset: int = 0,
                inputs: list[str] = INPUTS, failures: list | None = None) -> list[tuple[int | str, str | None]]:
    """``n`` calls over ``inputs`` (by default the holdout's: live traffic the teacher can answer
    for audits). A call that fails below HTTP (a reset connection) is reported by its error; a
    non-200's status, time and body go to ``failures`` (what a failed assertion shows)."""
    sem = asyncio.Semaphore(concurrency)
    # A fresh connection per call: a failure here is the server's, never a reused keep-alive
    # connection the server had already closed.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300), connector=connector) as c:
        async def one(i):
            async with sem:
                body = {"model": "routing", "prompt": inputs[(offset + i) % len(inputs)]}
                if user(i):
                    body["user"] = user(i)
                try:
                    async with c.post(f"{url}/v1/completions", json=body) as r:
                        got = await r.read()
                        if r.status != 200 and failures is not None:
                            failures.append((r.status, time.strftime("%H:%M:%S"), dict(r.headers),
                                             got[:400].decode(errors="replace")))
                        return r.status, r.headers.get("x-kolm-version")
                except aiohttp.ClientError as e:
                    return f"{type(e).__name__}: {e}", None
        return await asyncio.gather(*(one(i) for i in range(n)))


class Load:
    """Requests in the background while the release changes; every one must succeed."""

    def __init__(self, url: str, inputs: list[str] = INPUTS) -> None:
        self.url, self.inputs, self.codes, self._stop = url, inputs, [], threading.Event()
        self.failures: list = []  # (status, time, headers, body) of each non-200
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        offset = 0
        while not self._stop.is_set():
            self.codes += [c for c, _ in asyncio.run(_fire(self.url, 8, 4, offset=offset, inputs=self.inputs,
                                                            failures=self.failures))]
            offset += 8

    def stop(self) -> list[int]:
        self._stop.set()
        self._t.join(timeout=120)
        return self.codes


def _oracle():
    """The live teacher for audits: answers every example and holdout input correctly."""
    from kolm_ray.testing.messages_api import MessagesAPIServer, replay_responder

    answers = {r["input"]: r["output"] for r in HOLDOUT}
    for line in (EXAMPLE / "recorded-teacher.jsonl").read_text().splitlines():
        rec = json.loads(line)
        answers[rec["input"]] = rec["output"]
    return MessagesAPIServer(replay_responder(answers)).start()


def _compiled_artifact(result) -> Path:
    return Path(next(line.split()[1] for line in result.output.splitlines() if line.startswith("artifact ")))


@pytest.fixture(scope="module")
def env(compiled, ray_session, serve_port):
    from ray import serve

    from kolm_ray.testing.artifacts import rebadge
    from kolm_ray.testing.messages_api import MessagesAPIServer

    store = compiled["home"] / "artifacts"
    key = compiled["home"] / "keys" / "signing.pem"
    stable = store / "routing-1.0.kolm"
    port = serve_port
    oracle = _oracle()
    biased_teacher = MessagesAPIServer(lambda body, seen: "billing").start()
    with pytest.MonkeyPatch.context() as mp:
        # The worse canary: the same compile with no training steps (its adapter is a no-op).
        worse = _invoke([*compiled["args"], "--max-steps", "0", "--name", "routing-untrained"], compiled, mp)
        worse_art = rebadge(_compiled_artifact(worse), store, (7, 0), name="routing", private_key=key)
        # The canary only audits catch: distilled from a teacher that always answers "billing", it
        # answers every message with a valid label, so its reference-free online K is perfect.
        mp.setenv("ANTHROPIC_BASE_URL", biased_teacher.url)
        mp.setenv("ANTHROPIC_API_KEY", "biased")
        biased = RUNNER.invoke(cli, [*compiled["args"], "--max-steps", "40", "--name", "routing-biased"])
        assert biased.exit_code == 0, biased.output
        biased_art = rebadge(_compiled_artifact(biased), store, (8, 0), name="routing", private_key=key)
        _invoke(["publish", str(stable), "--to", ENV], compiled, mp)
        mp.setenv("ANTHROPIC_BASE_URL", oracle.url)  # the app's ingress asks the live teacher for audits
        mp.setenv("ANTHROPIC_API_KEY", "oracle")
        res = RUNNER.invoke(cli, ["serve", "--env", ENV, "--port", str(port), "--detach", "--num-cpus", "0",
                                  "--max-batch-size", "16", "--max-ongoing", "32", "--rollout-interval", "0.5"])
        assert res.exit_code == 0, res.output
    yield {"url": f"http://127.0.0.1:{port}", "store": store, "stable": stable, "worse": worse_art, "port": port,
           "key": key, "biased": biased_art, "oracle": oracle}
    from kolm_ray.publish import controller

    controller.stop(ENV)
    serve.delete(f"kolm-{ENV}")
    oracle.stop()
    biased_teacher.stop()


def test_canary_split_sticky_keys_and_a_serve_restart_keep_the_routing(env, compiled, monkeypatch):
    from ray import serve

    from kolm_ray.testing.artifacts import rebadge

    canary = rebadge(env["stable"], env["store"], (2, 0), private_key=env["key"])  # identical adapter: no worse than stable
    _invoke(["publish", str(canary), "--to", ENV, "--canary", "5", "--hold", "1h", "--min-samples", "20"],
            compiled, monkeypatch)
    st = _status(compiled, monkeypatch)
    assert (st["phase"], st["stable"], st["canary"], st["weight"]) == ("canary", "1.0", "2.0", 0.05)

    got = asyncio.run(_fire(env["url"], 2000, 32))
    assert {c for c, _ in got} == {200}
    share = sum(v == "routing@2.0" for _, v in got) / len(got)
    assert 0.028 <= share <= 0.072, share  # 5% +- 4.5 sigma of 2000 unkeyed (random) draws

    users = [f"user-{i}" for i in range(40)]
    first = dict(zip(users, (v for _, v in asyncio.run(_fire(env["url"], 40, 8, user=lambda i: users[i])))))
    again = dict(zip(users, (v for _, v in asyncio.run(_fire(env["url"], 40, 8, user=lambda i: users[i])))))
    assert first == again

    serve.delete(f"kolm-{ENV}")  # Serve goes away; the release state stays on disk
    _invoke(["serve", "--env", ENV, "--port", str(env["port"]), "--detach", "--num-cpus", "0",
             "--rollout-interval", "0.5"], {"env": {**compiled["env"], "ANTHROPIC_BASE_URL": env["oracle"].url,
                                                    "ANTHROPIC_API_KEY": "oracle"}}, monkeypatch)
    after = dict(zip(users, (v for _, v in asyncio.run(_fire(env["url"], 40, 8, user=lambda i: users[i])))))
    assert after == first
    assert _status(compiled, monkeypatch)["canary"] == "2.0"


def test_a_canary_identical_to_stable_is_promoted_once_the_audited_evidence_suffices(env, compiled, monkeypatch):
    from kolm_ray.serve.receipts import read_receipts
    from kolm_ray.testing.artifacts import rebadge

    canary = rebadge(env["stable"], env["store"], (3, 0), private_key=env["key"])
    load = Load(env["url"])
    # --force: replaces the canary the test before left; a 10-point tolerance needs ~50 audits each
    _invoke(["publish", str(canary), "--to", ENV, "--canary", "50", "--hold", "2s", "--min-samples", "10",
             "--audit-rate", "1", "--audit-tolerance", "10", "--force"], compiled, monkeypatch)
    st = _wait_for(lambda: (s := _status(compiled, monkeypatch))["phase"] == "promoted" and s, "promotion", 240)
    codes = load.stop()
    assert st["stable"] == "3.0" and st["previous"] == "1.0" and st["canary"] is None
    reason = st["last_transition"]["reason"]
    assert reason.startswith("audited K") and "not worse by more than 10" in reason, reason
    assert codes and set(codes) == {200}, (codes, load.failures[:3])
    _wait_for(lambda: {v for _, v in asyncio.run(_fire(env["url"], 20, 8))} == {"routing@3.0"},
              "the controller to apply the promotion")
    # Every audit is in the receipts, linked to the call it audited, and costed.
    receipts = read_receipts(compiled["home"] / "receipts" / f"kolm-{ENV}")
    calls = {r["request_id"]: r for r in receipts if r.get("kind", "call") == "call"}
    audits = [r for r in receipts if r.get("kind") == "audit" and r["status"] == "ok"]
    assert len(audits) >= 20 and all(a["request_id"] in calls for a in audits)
    assert all(calls[a["request_id"]]["output_sha256"] == a["output_sha256"] for a in audits)
    assert sum(a["cost_usd"] for a in audits) > 0
    # Paid once per input: a repeated input's audit is answered from the cache.
    paid = Counter(calls[a["request_id"]]["input_sha256"] for a in audits if not a["cached"])
    assert paid and max(paid.values()) == 1, paid.most_common(3)


def test_a_canary_that_answers_valid_but_wrong_labels_is_rolled_back_on_audited_k(env, compiled, monkeypatch):
    load = Load(env["url"])
    _invoke(["publish", str(env["biased"]), "--to", ENV, "--canary", "50", "--hold", "1h", "--min-samples", "10",
             "--audit-rate", "1", "--force"], compiled, monkeypatch)
    st = _wait_for(lambda: (s := _status(compiled, monkeypatch))["phase"] == "rolled_back" and s, "rollback", 240)
    codes = load.stop()
    reason = st["last_transition"]["reason"]
    assert st["stable"] == "3.0" and st["canary"] is None
    assert reason.startswith("audited K") and "is below stable's 100.0 by more than 5" in reason, reason
    assert codes and set(codes) == {200}, (codes, load.failures[:3])


def test_with_the_teacher_down_every_call_succeeds_and_status_counts_the_missing_audits(env, compiled, monkeypatch):
    from kolm_ray.testing.artifacts import rebadge
    from kolm_ray.testing.messages_api import FaultPlan

    canary = rebadge(env["stable"], env["store"], (4, 0), private_key=env["key"])
    env["oracle"].faults = FaultPlan(server_error=1.0)  # the teacher is down from here on
    try:
        _invoke(["publish", str(canary), "--to", ENV, "--canary", "50", "--hold", "1h", "--min-samples", "10",
                 "--audit-rate", "1", "--force"], compiled, monkeypatch)
        # Messages never seen before: their references are not in the teacher cache either.
        load = Load(env["url"], inputs=[f"{x} (ticket {i})" for i, x in enumerate(INPUTS)])
        st = _wait_for(lambda: (s := _status(compiled, monkeypatch))["audit_failed"]["canary"] >= 3 and s,
                       "failed audits to be recorded", 120)
        codes = load.stop()
    finally:
        env["oracle"].faults = FaultPlan()
    assert codes and set(codes) == {200}, (codes, load.failures[:3])
    assert st["phase"] == "canary" and st["canary_calls"] >= 3
    assert st["evidence"]["action"] == "wait"  # no reference, no audited K: never promoted on no data
    assert st["audited_calls"]["canary"] == 0 and st["canary_audited_k"] is None and st["bound"] is None
    shown = _invoke(["status", "--env", ENV], compiled, monkeypatch).stdout
    assert "failed (teacher)" in shown
    _invoke(["rollback", "routing", "--env", ENV], compiled, monkeypatch)


def test_in_shadow_mode_the_canary_is_judged_on_stable_traffic_its_users_never_see(env, compiled, monkeypatch):
    from kolm_ray.serve.receipts import read_receipts
    from kolm_ray.testing.artifacts import rebadge

    biased = rebadge(env["biased"], env["store"], (9, 0), private_key=env["key"])
    started = time.time()
    load = Load(env["url"])
    _invoke(["publish", str(biased), "--to", ENV, "--canary", "10", "--hold", "1h", "--min-samples", "5",
             "--audit-rate", "1", "--shadow", "--force"], compiled, monkeypatch)
    st = _wait_for(lambda: (s := _status(compiled, monkeypatch))["phase"] == "rolled_back" and s, "rollback", 240)
    codes = load.stop()
    assert "audited K" in st["last_transition"]["reason"], st["last_transition"]
    assert codes and set(codes) == {200}, (codes, load.failures[:3])
    audits = [r for r in read_receipts(compiled["home"] / "receipts" / f"kolm-{ENV}", since=started)
              if r.get("kind") == "audit" and r["status"] == "ok"]
    shadow = [a for a in audits if a["route"] == "shadow"]
    assert shadow and all(a["version"] == "9.0" for a in shadow)
    stable_ids = {a["request_id"] for a in audits if a["route"] == "stable"}
    assert {a["request_id"] for a in shadow} <= stable_ids  # a copy of stable's audited calls, one reference each


def test_a_worse_canary_is_rolled_back_and_stable_keeps_serving(env, compiled, monkeypatch):
    for k, v in compiled["env"].items():
        monkeypatch.setenv(k, v)
    refused = RUNNER.invoke(cli, ["publish", str(env["worse"]), "--to", ENV])
    assert refused.exit_code == 3 and "refusing to publish routing@7.0" in refused.output  # the compare rejects it
    load = Load(env["url"])
    _invoke(["publish", str(env["worse"]), "--to", ENV, "--canary", "50", "--hold", "1h", "--min-samples", "10",
             "--force"], compiled, monkeypatch)
    st = _wait_for(lambda: (s := _status(compiled, monkeypatch))["phase"] == "rolled_back" and s, "rollback")
    codes = load.stop()
    assert st["stable"] == "3.0" and st["canary"] is None
    assert "online K" in st["last_transition"]["reason"] and "is below stable's" in st["last_transition"]["reason"]
    assert codes and set(codes) == {200}, (codes, load.failures[:3])
    _wait_for(lambda: {v for _, v in asyncio.run(_fire(env["url"], 20, 8))} == {"routing@3.0"},
              "the controller to apply the rollback")
