"""One generation path: the holdout outputs a compiled artifact's K was scored on (its eval.json)
are what `kolm serve` answers for the same inputs, through the OpenAI-compatible endpoint, with
the Specialist's own decoding (no max_tokens, temperature or stop sent), whether the requests
come one at a time or concurrently (so Serve batches them together)."""

import json
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from click.testing import CliRunner

from kolm_ray.cli import cli

APP = "parity"  # its own application and route prefix: other serving tests share this Serve instance


@pytest.fixture(scope="module")
def artifact(compiled):
    assert compiled["res"].exit_code == 0, compiled["res"].output
    return compiled["home"] / "artifacts" / "routing-1.0.kolm"


@pytest.fixture(scope="module")
def holdout(artifact) -> list[dict]:
    with tarfile.open(artifact) as t:
        rows = json.loads(t.extractfile("specialist/eval.json").read())["rows"]
    return [{"id": r["id"], "input": r["input"], "output": r["student"]["output"]} for r in rows]


@pytest.fixture(scope="module")
def client(ray_session, compiled, artifact, serve_port, tmp_path_factory):
    """`kolm serve --detach` of the compiled artifact, trusted by the key that signed it; the
    replica gets one torch thread (no CPUs reserved), the eval had the node's free cores."""
    from ray import serve

    home = tmp_path_factory.mktemp("parity-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOLM_HOME", str(home))
        res = CliRunner().invoke(cli, ["serve", str(artifact), "--port", str(serve_port), "--detach", "--num-cpus", "0",
                                       "--key", str(compiled["home"] / "keys" / "signing.pub"), "--app-name", APP,
                                       "--route-prefix", f"/{APP}"])
    assert res.exit_code == 0, res.output
    url = f"http://127.0.0.1:{serve_port}/{APP}"
    for _ in range(240):
        try:
            if requests.get(f"{url}/healthz/details", timeout=5).json().get("specialists") == ["routing@1.0"]:
                break
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    else:
        raise AssertionError(f"{url} never became healthy")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    serve.delete(APP)


def test_the_holdout_outputs_are_what_kolm_serve_answers(client, holdout):
    expected = [r["output"] for r in holdout]
    assert len(holdout) == 40 and len(set(expected)) > 1  # the student answers with several labels

    def chat(text: str) -> str:
        resp = client.chat.completions.create(model="routing", messages=[{"role": "user", "content": text}])
        assert resp.model == "routing@1.0"
        return resp.choices[0].message.content

    one_by_one = [chat(r["input"]) for r in holdout]
    assert [(r["id"], a) for r, a in zip(holdout, one_by_one)] == [(r["id"], r["output"]) for r in holdout]

    with ThreadPoolExecutor(8) as pool:  # 8 in flight: Serve batches them, mixed prompt lengths
        concurrent = list(pool.map(chat, [r["input"] for r in holdout]))
    assert concurrent == expected

    completions = [client.completions.create(model="routing@1.0", prompt=r["input"]).choices[0].text
                   for r in holdout[:10]]
    assert completions == expected[:10]
