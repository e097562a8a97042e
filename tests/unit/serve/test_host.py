"""Many adapters on one base: a mixed batch answers each request as its own adapter would alone;
greedy requests are decoded alone; the artifact's decoding settings survive the round trip."""

import pytest

from kolm_ray.errors import InputError
from kolm_ray.serve.catalog import Specialist, adapter_name, open_specialist
from kolm_ray.serve.host import BASE_ADAPTER, AdapterHost, Completion, Decoding, Generation
from kolm_ray.signing import Trust


@pytest.fixture(scope="module")
def host(specialists, tiny_base, tmp_path_factory):
    trust = Trust(public_key=specialists["public_key"])
    h = AdapterHost(str(tiny_base))
    loaded = {}
    for key in ("route", "tldr"):
        s = open_specialist(specialists[key], trust, dest=tmp_path_factory.mktemp(key) / "adapter")
        h.load_adapter(adapter_name(s), s.adapter_dir)
        loaded[key] = s
    return h, loaded


def _gen(s, text, n=10, **kw):
    return Generation(adapter=adapter_name(s), system=s.system, input=text, max_new_tokens=n, **kw)


def test_mixed_adapter_batch_matches_each_adapter_alone(host):
    h, sp = host
    gens = [_gen(sp["route"], "I was charged twice"), _gen(sp["tldr"], "I was charged twice"),
            _gen(sp["route"], "the app crashes", n=4),
            Generation(adapter=BASE_ADAPTER, system="x", input="I was charged twice", max_new_tokens=10)]
    together = h.generate(gens)
    alone = [h.generate([g])[0] for g in gens]
    assert [c.text for c in together] == [c.text for c in alone]
    assert together[0].text != together[1].text != together[3].text  # the adapters really differ
    assert together[2].completion_tokens <= 4


def test_stream_yields_the_same_text_as_a_batch(host):
    h, sp = host
    g = _gen(sp["tldr"], "summarize this message please", n=12)
    items = list(h.stream(g))
    final = items[-1]
    assert isinstance(final, Completion)
    assert "".join(items[:-1]).strip() == final.text == h.generate([g])[0].text


def test_stop_strings_cut_the_output(host):
    h, sp = host
    full = h.generate([_gen(sp["route"], "hello", n=12)])[0].text
    stop = full.split()[1] if len(full.split()) > 1 else full[-2:]
    cut = h.generate([_gen(sp["route"], "hello", n=12, stop=(stop,))])[0]
    assert stop not in cut.text and cut.finish_reason == "stop"


def test_a_stream_reports_the_same_usage_and_text_as_the_plain_request_with_a_stop_string(host):
    """A stream halts at a stop string a few tokens late (its halt is seen after the streamer
    decodes), and used to count those tokens: 3 to 9 where the plain request counted 40. And a
    stop string split across two streamed pieces ("contain" then "\x18") must not leak its start."""
    h, sp = host
    for key, text in (("route", "hello"), ("route", "I was charged twice"), ("tldr", "please sum this up")):
        words = h.generate([_gen(sp[key], text, n=40)])[0].text.split()
        g = _gen(sp[key], text, n=40, stop=(words[1],))
        plain, items = h.generate([g])[0], list(h.stream(g))
        streamed = items[-1]
        assert (streamed.text, streamed.completion_tokens, streamed.finish_reason) == \
            (plain.text, plain.completion_tokens, "stop")
        assert "".join(items[:-1]).strip() == plain.text == words[0]  # what the client saw
        assert 1 <= plain.completion_tokens < 40


def test_the_end_of_sequence_token_is_not_counted_as_a_completion_token(host):
    h, sp = host
    g = _gen(sp["route"], "hi", n=10)
    a, b = h.tok.convert_tokens_to_ids(["a", "b"])
    eos = h.tok.eos_token_id
    ended = h._completion([a, b, eos, a], g, prompt_tokens=5)
    assert (ended.completion_tokens, ended.finish_reason, ended.text) == (2, "stop", "ab")
    assert h._completion([a] * 10, g, prompt_tokens=5).finish_reason == "length"


def test_unknown_adapter_is_a_key_error_or_a_gap_in_a_lenient_batch(host):
    h, sp = host
    with pytest.raises(KeyError, match="not loaded"):
        h.generate([Generation(adapter="nope", system="x", input="y", max_new_tokens=2)])
    got = h.generate([Generation(adapter="nope", system="x", input="y", max_new_tokens=2), _gen(sp["route"], "hi", n=2)],
                     strict=False)
    assert got[0] is None and got[1].completion_tokens <= 2


def test_unloading_the_last_adapter_returns_to_the_base(specialists, tiny_base, tmp_path):
    trust = Trust(public_key=specialists["public_key"])
    h = AdapterHost(str(tiny_base))
    s = open_specialist(specialists["route"], trust, dest=tmp_path / "a")
    base_out = h.generate([Generation(adapter=BASE_ADAPTER, system="x", input="hi", max_new_tokens=6)])[0].text
    h.load_adapter(adapter_name(s), s.adapter_dir)
    h.unload_adapter(adapter_name(s))
    assert h.generate([Generation(adapter=BASE_ADAPTER, system="x", input="hi", max_new_tokens=6)])[0].text == base_out


def test_greedy_requests_never_share_a_forward_pass_but_sampled_ones_do(host, monkeypatch):
    """In a padded batch a row's logits move with its batch-mates (~1e-5 on the tiny base), enough to
    flip a near-tie: a greedy row is generated alone, so it gets the tokens the eval got."""
    h, sp = host
    sizes = []
    real = h.model.generate

    def counting(**kw):
        sizes.append(kw["input_ids"].shape[0])
        return real(**kw)

    monkeypatch.setattr(h.model, "generate", counting)
    greedy = [_gen(sp["route"], "I was charged twice", n=4), _gen(sp["tldr"], "the app crashes", n=4),
              _gen(sp["route"], "hi", n=4, temperature=0.0)]
    sampled = [_gen(sp["route"], "hello there", n=4, temperature=0.7), _gen(sp["tldr"], "hi", n=4, temperature=0.7)]
    h.generate(greedy + sampled)
    assert sorted(sizes) == [1, 1, 1, 2]
    sizes.clear()
    monkeypatch.setattr(h, "batch_greedy", True)  # throughput over parity: greedy rows share a batch
    h.generate(greedy + sampled)
    assert sorted(sizes) == [2, 3]


def test_an_older_manifest_gets_the_default_decoding_and_a_broken_one_is_refused():
    assert Decoding.from_manifest({"max_new_tokens": 16}) == Decoding(max_new_tokens=16, temperature=None, stop=())
    assert Decoding.from_manifest({"max_new_tokens": 8, "from_a_newer_kolm": 1}).max_new_tokens == 8
    with pytest.raises(InputError, match="generation"):
        Decoding.from_manifest(None)
    with pytest.raises(InputError, match="generation.max_new_tokens"):
        Decoding.from_manifest({"max_new_tokens": 0})
    with pytest.raises(InputError, match="generation.max_new_tokens"):
        Decoding.from_manifest({"stop": ["\n"]})


def test_a_specialists_decoding_survives_the_serve_config_round_trip(host):
    _, sp = host
    s = sp["tldr"]
    again = Specialist.model_validate(s.model_dump(mode="json"))  # how user_config carries it to replicas
    assert again == s and again.decoding == Decoding(max_new_tokens=12) and again.max_new_tokens == 12


def test_a_temperature_near_zero_decodes_greedily_instead_of_failing(host):
    """5e-324 is a valid temperature (OpenAI allows any in [0, 2]): dividing the logits by it
    overflowed them into NaNs that torch refused to sample, a 500 the ingress's fuzzing found
    (and, batched, the batch-mates' 500 too). Under GREEDY_BELOW it decodes greedily."""
    h, sp = host
    [greedy] = h.generate([_gen(sp["route"], "I was charged twice")])
    for t in (5e-324, 1e-40, 1e-4):
        assert h.generate([_gen(sp["route"], "I was charged twice", temperature=t, top_p=5e-324)]) == [greedy]
    *_, done = h.stream(_gen(sp["route"], "I was charged twice", temperature=5e-324))
    assert done == greedy


def test_a_batch_is_generated_between_a_streams_steps_and_neither_answer_changes(host, monkeypatch):
    """A stream gives the model up between decoding steps while a batch waits for it: the batch
    (another adapter: PEFT's per-call adapter hooks must not leak between the two) completes while
    the stream is still generating, and both answers are the tokens each gets alone."""
    import threading

    from kolm_ray.serve import host as host_mod

    h, sp = host
    long = _gen(sp["tldr"], "summarize this message please", n=24)
    short = _gen(sp["route"], "I was charged twice", n=6)
    alone_stream, alone_batch = h.generate([long])[0], h.generate([short])[0]
    assert alone_stream.completion_tokens >= 3  # steps left after the batch has gone

    events: list[str] = []
    batch: list = []
    real_step = host_mod._Step.__call__

    def step(self, input_ids, scores, **kw):
        if not batch and "step" not in events:  # the first step: a batch arrives and queues for the model
            def run() -> None:
                batch.append(h.generate([short])[0])
                events.append("batch done")

            threading.Thread(target=run, daemon=True).start()
            for _ in range(10_000):  # until it waits for the model (the stream holds it now)
                if h._lock.waiting():
                    break
                threading.Event().wait(0.001)
        events.append("step")
        return real_step(self, input_ids, scores, **kw)

    monkeypatch.setattr(host_mod._Step, "__call__", step)
    items = list(h.stream(long))
    assert "batch done" in events
    assert "step" in events[events.index("batch done"):]  # the stream went on after the batch finished
    assert batch == [alone_batch]
    assert items[-1] == alone_stream and "".join(items[:-1]).strip() == alone_stream.text


def test_generation_halts_at_a_stop_string_instead_of_running_to_max_tokens(host, monkeypatch):
    """A plain request used to decode to max_new_tokens and cut the text afterwards; it now halts
    at the token that completes a stop string, with the same answer and usage."""
    h, sp = host
    words = h.generate([_gen(sp["tldr"], "please sum this up", n=40)])[0].text.split()
    g = _gen(sp["tldr"], "please sum this up", n=40, stop=(words[1],))
    lengths = []
    real = h.model.generate

    def counting(**kw):
        out = real(**kw)
        lengths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(h.model, "generate", counting)
    done = h.generate([g])[0]
    assert done.text == words[0] and done.finish_reason == "stop"
    assert lengths == [done.completion_tokens] and done.completion_tokens < 40


def test_a_stop_string_straddling_the_prompts_end_does_not_end_the_answer(host):
    """transformers' StopStringCriteria matches across the prompt's end; the answer's own text
    decides (the prompt ends in a newline: a stop string of two would otherwise match at once)."""
    h, sp = host
    g = _gen(sp["route"], "hello", n=12)
    plain = h.generate([g])[0]
    # The prompt's last character and the answer's first ones: matched only across the boundary.
    stop = "\n" + plain.text[:3]
    assert len(plain.text) > 3 and stop not in plain.text, plain.text
    with_stop = h.generate([_gen(sp["route"], "hello", n=12, stop=(stop,))])[0]
    assert with_stop == plain
