"""The eval generates through serving's stack: its holdout outputs are what a serving host answers
for the same inputs, whatever else shares the serving batch (in-process, no Ray)."""

import random

import pytest

from kolm_ray.serve.catalog import adapter_name, open_specialist
from kolm_ray.serve.host import BASE_ADAPTER, AdapterHost, Decoding, Generation
from kolm_ray.signing import Trust
from kolm_ray.testing.corpus import routing_rows, tldr_rows
from kolm_ray.train.eval import HoldoutWorker, decoding_for
from kolm_ray.verifier import synthesize


@pytest.fixture(scope="module")
def opened(specialists, tmp_path_factory):
    trust = Trust(public_key=specialists["public_key"])
    return {k: open_specialist(specialists[k], trust, dest=tmp_path_factory.mktemp(k) / "adapter")
            for k in ("route", "route2", "tldr")}


def _holdout() -> list[str]:
    # Short and long inputs: a padded batch would mix very different prompt lengths.
    return [r.input for r in routing_rows(10, seed=5)] + [r.input[:400] for r in tldr_rows(4, seed=5)]


def _served(host: AdapterHost, requests: list[Generation], seed: int) -> list[str]:
    """Answers as a serving replica gives them: shuffled, mixed-adapter batches of up to 8
    (``@serve.batch``'s limit), non-strict as the deployment calls it."""
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    out: list[str] = [""] * len(requests)
    for k in range(0, len(order), 8):
        idx = order[k:k + 8]
        for i, c in zip(idx, host.generate([requests[i] for i in idx], strict=False)):
            out[i] = c.text
    return out


def _request(s, text: str) -> Generation:
    """What the ingress sends for a plain request to ``s`` (no max_tokens, temperature or stop)."""
    return Generation(adapter=adapter_name(s), system=s.system, input=text, max_new_tokens=s.max_new_tokens)


def test_holdout_outputs_equal_what_a_serving_host_answers_in_mixed_batches(opened, tiny_base):
    route, others = opened["route"], [opened["route2"], opened["tldr"]]
    inputs = _holdout()
    worker = HoldoutWorker(str(tiny_base), route.adapter_dir, route.system, route.decoding)
    eval_out = [o for i in range(0, len(inputs), 3) for o in worker.generate(inputs[i:i + 3])]
    udf_out = worker({"id": list(range(len(inputs))), "input": inputs})["output"]  # the Ray Data path

    host = AdapterHost(str(tiny_base))
    for s in opened.values():
        host.load_adapter(adapter_name(s), s.adapter_dir)
    requests = [_request(route, x) for x in inputs] + [_request(o, x) for o in others for x in inputs]
    for seed in (0, 1):
        served = _served(host, requests, seed)[: len(inputs)]
        assert served == eval_out
    alone = [host.generate([r])[0].text for r in requests[: len(inputs)]]
    assert eval_out == udf_out == alone
    assert len(set(eval_out)) > 3 and all(eval_out)  # real, varied answers, not one empty string
    assert _served(host, requests, 0)[len(inputs): 2 * len(inputs)] != eval_out  # the other adapters differ


def test_base_eval_equals_the_base_in_a_serving_batch(opened, tiny_base):
    route = opened["route"]
    inputs = _holdout()[:6]
    decoding = Decoding(max_new_tokens=10)
    base_out = HoldoutWorker(str(tiny_base), None, route.system, decoding).generate(inputs)
    host = AdapterHost(str(tiny_base))
    host.load_adapter(adapter_name(route), route.adapter_dir)
    requests = [decoding.request(BASE_ADAPTER, route.system, x) for x in inputs] + [_request(route, x) for x in inputs]
    assert _served(host, requests, 2)[: len(inputs)] == base_out


def test_the_eval_applies_stop_strings_and_limits_as_serving_does(opened, tiny_base):
    route = opened["route"]
    text = _holdout()[0]
    full = HoldoutWorker(str(tiny_base), route.adapter_dir, route.system, Decoding(max_new_tokens=16)).generate([text])[0]
    stop = full.split()[1]
    host = AdapterHost(str(tiny_base))  # a serving replica's host, separate from the eval's
    host.load_adapter(adapter_name(route), route.adapter_dir)
    for decoding in (Decoding(max_new_tokens=16, stop=(stop,)), Decoding(max_new_tokens=3)):
        worker = HoldoutWorker(str(tiny_base), route.adapter_dir, route.system, decoding)
        served = host.generate([decoding.request(adapter_name(route), route.system, text)])[0]
        assert worker.generate([text]) == [served.text]
        assert len(served.text) < len(full) and (stop not in served.text or not decoding.stop)


def test_the_manifest_carries_the_decoding_the_eval_used():
    label = synthesize("Route it.", ["billing", "bug", "account"] * 4)
    text = synthesize("Summarize in ten words.", ["a short summary of the whole message here",
                                                  "another summary of a different message", "the third summary"])
    assert (label.kind, text.kind) == ("label", "text")
    for v in (label, text):
        d = decoding_for(v)
        assert d.temperature is None and d.stop == ()  # greedy, cut only at the end token
        assert Decoding.from_manifest(d.manifest()) == d
    assert decoding_for(label).max_new_tokens < decoding_for(text).max_new_tokens
