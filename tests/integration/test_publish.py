"""`kolm publish` end to end on a local Ray instance: the bundled example's compile as stable,
a rebadged copy as a no-worse canary, an untrained compile (`--max-steps 0`) as a worse one;
the canary split, sticky routing keys, the rollout controller's promote and rollback, a Serve
restart that keeps the routing, and no failed request through any of it."""

import asyncio
import json
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli

RUNNER = CliRunner()
ENV = "prod"


def _invoke(args, compiled, mp):
    for k, v in compiled["env"].items():
        mp.setenv(k, v)
    res = RUNNER.invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res


def _status(compiled, mp) -> dict:
    [entry] = json.loads(_invoke(["status", "--env", ENV, "--json"], compiled, mp).stdout)["specialists"]
    return entry


def _wait_for(pred, what: str, timeout_s: float = 120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


async def _fire(url: str, n: int, concurrency: int, user=lambda i: None) -> list[tuple[int, str | None]]:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as c:
        async def one(i):
            async with sem:
                body = {"model": "routing", "prompt": "I was charged twice for my subscription", "max_tokens": 1}
                if user(i):
                    body["user"] = user(i)
                async with c.post(f"{url}/v1/completions", json=body) as r:
                    await r.read()
                    return r.status, r.headers.get("x-kolm-version")
        return await asyncio.gather(*(one(i) for i in range(n)))


class Load:
    """Requests in the background while the release changes; every one must succeed."""

    def __init__(self, url: str) -> None:
        self.url, self.codes, self._stop = url, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.codes += [c for c, _ in asyncio.run(_fire(self.url, 8, 4))]

    def stop(self) -> list[int]:
        self._stop.set()
        self._t.join(timeout=120)
        return self.codes


@pytest.fixture(scope="module")
def env(compiled, ray_session, serve_port):
    from ray import serve

    from kolm_ray.testing.artifacts import rebadge

    store = compiled["home"] / "artifacts"
    key = compiled["home"] / "keys" / "signing.pem"
    stable = store / "routing-1.0.kolm"
    port = serve_port
    with pytest.MonkeyPatch.context() as mp:
        # The worse canary: the same compile with no training steps (its adapter is a no-op).
        worse = _invoke([*compiled["args"], "--max-steps", "0", "--name", "routing-untrained"], compiled, mp)
        worse_art = next(line.split()[1] for line in worse.output.splitlines() if line.startswith("artifact "))
        worse_art = rebadge(Path(worse_art), store, (7, 0), name="routing", private_key=key)
        _invoke(["publish", str(stable), "--to", ENV], compiled, mp)
        _invoke(["serve", "--env", ENV, "--port", str(port), "--detach", "--num-cpus", "0", "--max-batch-size", "16",
                 "--max-ongoing", "32", "--rollout-interval", "0.5"], compiled, mp)
    yield {"url": f"http://127.0.0.1:{port}", "store": store, "stable": stable, "worse": worse_art, "port": port,
           "key": key}
    from kolm_ray.publish import controller

    controller.stop(ENV)
    serve.delete(f"kolm-{ENV}")


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
    assert 0.035 <= share <= 0.065, share

    users = [f"user-{i}" for i in range(40)]
    first = dict(zip(users, (v for _, v in asyncio.run(_fire(env["url"], 40, 8, user=lambda i: users[i])))))
    again = dict(zip(users, (v for _, v in asyncio.run(_fire(env["url"], 40, 8, user=lambda i: users[i])))))
    assert first == again

    serve.delete(f"kolm-{ENV}")  # Serve goes away; the release state stays on disk
    _invoke(["serve", "--env", ENV, "--port", str(env["port"]), "--detach", "--num-cpus", "0",
             "--rollout-interval", "0.5"], compiled, monkeypatch)
    after = dict(zip(users, (v for _, v in asyncio.run(_fire(env["url"], 40, 8, user=lambda i: users[i])))))
    assert after == first
    assert _status(compiled, monkeypatch)["canary"] == "2.0"


def test_a_canary_no_worse_than_stable_is_promoted_after_a_short_hold(env, compiled, monkeypatch):
    from kolm_ray.testing.artifacts import rebadge

    canary = rebadge(env["stable"], env["store"], (3, 0), private_key=env["key"])
    load = Load(env["url"])
    _invoke(["publish", str(canary), "--to", ENV, "--canary", "50", "--hold", "2s", "--min-samples", "10",
             "--force"], compiled, monkeypatch)  # --force: replaces the canary the test before left running
    st = _wait_for(lambda: (s := _status(compiled, monkeypatch))["phase"] == "promoted" and s, "promotion")
    codes = load.stop()
    assert st["stable"] == "3.0" and st["previous"] == "1.0" and st["canary"] is None
    assert "online K" in st["last_transition"]["reason"]
    assert codes and set(codes) == {200}, codes
    _wait_for(lambda: {v for _, v in asyncio.run(_fire(env["url"], 20, 8))} == {"routing@3.0"},
              "the controller to apply the promotion")


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
    assert "trails stable's" in st["last_transition"]["reason"]
    assert codes and set(codes) == {200}, codes
    _wait_for(lambda: {v for _, v in asyncio.run(_fire(env["url"], 20, 8))} == {"routing@3.0"},
              "the controller to apply the rollback")
