import asyncio
import time

import pytest

from kolm_ray.sampling.cache import ResponseCache, request_key
from kolm_ray.sampling.config import TeacherConfig
from kolm_ray.sampling.prompt import message_params, sdk_kwargs, system_blocks
from kolm_ray.sampling.teacher import AnthropicTeacher, Failure, decide_retry
from kolm_ray.testing.messages_api import FaultPlan, replay_responder

CFG = TeacherConfig(max_attempts=4, backoff_base_s=1.0, backoff_max_s=8.0)


def test_retry_after_is_the_wait():
    assert decide_retry(1, Failure("rate_limited", "429", retry_after_s=7.5), CFG) == 7.5


def test_backoff_doubles_and_caps():
    waits = [decide_retry(a, Failure("overloaded", "529"), CFG) for a in (1, 2, 3)]
    assert waits == [1.0, 2.0, 4.0]
    big = TeacherConfig(max_attempts=20, backoff_base_s=1.0, backoff_max_s=8.0)
    assert decide_retry(10, Failure("server", "500"), big) == 8.0


def test_gives_up_after_max_attempts_and_on_client_errors():
    assert decide_retry(4, Failure("overloaded", "529"), CFG) is None
    assert decide_retry(1, Failure("client", "400 bad request"), CFG) is None


def test_jitter_spreads_backoff_by_at_most_half():
    assert decide_retry(1, Failure("timeout", "t"), CFG, jitter=1.0) == 1.5


def _params(text="hello there", temperature=None):
    system = system_blocks("Reply.", None, [])
    return message_params(model="claude-opus-4-7", system=system, user_input=text, max_tokens=64,
                          temperature=temperature)


def test_cache_key_covers_what_decides_an_answer():
    base = request_key(_params(), 0)
    assert request_key(_params(), 0) == base
    assert request_key(_params(), 1) != base
    assert request_key(_params("other"), 0) != base
    assert request_key(_params(temperature=0.5), 0) != base


def test_system_prompt_is_marked_for_prompt_caching():
    assert _params()["system"][-1]["cache_control"] == {"type": "ephemeral"}


def test_temperature_travels_as_extra_body():
    assert sdk_kwargs(_params(temperature=0.3))["extra_body"] == {"temperature": 0.3}
    assert "extra_body" not in sdk_kwargs(_params())


def _run(coro):
    return asyncio.run(coro)


def _many(teacher, n):
    async def go():
        return await asyncio.gather(*(teacher.sample(_params(), request_key(_params(), i)) for i in range(n)))

    return asyncio.run(go())


def test_retries_through_429_529_500_and_malformed_then_caches(messages_api, tmp_path):
    srv = messages_api(
        replay_responder({"hello there": "general kenobi"}),
        faults=FaultPlan(rate_limit=0.2, overloaded=0.2, server_error=0.1, malformed=0.1, seed=7, retry_after_s=0.01),
    )
    cfg = TeacherConfig(max_attempts=30, backoff_base_s=0.001, backoff_max_s=0.01)
    teacher = AnthropicTeacher(cfg, ResponseCache(tmp_path))
    results = _many(teacher, 20)
    assert all(r.text == "general kenobi" for r in results)
    assert srv.stats.succeeded == 20
    faults = sum(srv.stats.faults.values())
    assert faults > 0 and sum(r.retries for r in results) == faults
    assert {"rate_limited", "overloaded", "server", "malformed"} <= {f for r in results for f in r.failures}
    # Same requests again: every answer from the cache, no call made.
    again = AnthropicTeacher(cfg, ResponseCache(tmp_path))
    before = srv.stats.requests
    results = _many(again, 20)
    assert all(r.cached and r.text == "general kenobi" for r in results)
    assert srv.stats.requests == before


def test_slow_reply_times_out_and_is_retried(messages_api, tmp_path):
    srv = messages_api(replay_responder({"hello there": "hi"}), faults=FaultPlan(slow=0.5, slow_s=2.0, seed=3))
    teacher = AnthropicTeacher(TeacherConfig(timeout_s=0.3, max_attempts=20, backoff_base_s=0.001), ResponseCache(tmp_path))
    results = _many(teacher, 6)
    assert all(r.text == "hi" for r in results)
    assert "timeout" in {f for r in results for f in r.failures}
    assert srv.stats.faults["slow"] > 0


def test_all_attempts_failing_gives_an_error_not_an_exception(messages_api, tmp_path):
    messages_api(replay_responder({}), faults=FaultPlan(overloaded=1.0))
    teacher = AnthropicTeacher(TeacherConfig(max_attempts=3, backoff_base_s=0.001), ResponseCache(tmp_path))
    r = _run(teacher.sample(_params(), "k" * 64))
    assert r.text is None and r.attempts == 3 and r.error.startswith("overloaded")
    assert ResponseCache(tmp_path).get("k" * 64) is None


def test_usage_records_cache_reads_after_the_first_call(messages_api, tmp_path):
    messages_api(replay_responder({"hello there": "hi"}))
    teacher = AnthropicTeacher(TeacherConfig(), ResponseCache(tmp_path))
    first = _run(teacher.sample(_params(), request_key(_params(), 0)))
    second = _run(teacher.sample(_params(), request_key(_params(), 1)))
    assert first.usage.cache_write_tokens > 0 and first.usage.cache_read_tokens == 0
    assert second.usage.cache_read_tokens > 0 and second.usage.cache_write_tokens == 0


def test_local_server_streams_to_the_sdk(messages_api):
    import anthropic

    messages_api(replay_responder({"hello there": "a streamed answer that spans several deltas"}))
    client = anthropic.Anthropic(max_retries=0)
    with client.messages.stream(**sdk_kwargs(_params())) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "a streamed answer that spans several deltas"
    assert final.usage.output_tokens > 0


# ----- the teacher's leases on the shared quota --------------------------------------------------


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _BookQuota:
    """A quota handle over an in-process QuotaBook: the actor's own books and waiting, minus Ray."""

    def __init__(self, book):
        from kolm_ray.sampling.quota import Grant

        self.book, self.released = book, []

        async def acquire(tokens, claim=None, lease_s=150.0, alive=None):  # the actor's signature
            while not isinstance(got := book.try_acquire(time.monotonic(), tokens, claim, lease_s), Grant):
                await asyncio.sleep(min(got, 0.01))
            return got

        async def release(lease, **kw):
            self.released.append(kw)
            return book.release(time.monotonic(), lease, **kw)

        async def claim_key(key, owner, ttl_s, alive=None):  # one process: no other payer to wait for
            return True

        async def release_key(key, owner):
            return None

        self.acquire, self.release = _Remote(acquire), _Remote(release)
        self.claim_key, self.release_key = _Remote(claim_key), _Remote(release_key)


def _book(**tenants):
    from kolm_ray.sampling.limits import RateLimits, ResolvedLimits
    from kolm_ray.sampling.quota import QuotaBook

    return QuotaBook(ResolvedLimits(org=RateLimits(), tenants=tenants), time.monotonic())


def test_each_attempt_holds_a_lease_and_books_its_outcome_and_cost(messages_api, tmp_path):
    from kolm_ray.sampling.config import QuotaConfig
    from kolm_ray.sampling.limits import TenantBudget
    from kolm_ray.sampling.pricing import DEFAULT_PRICES, cost_usd

    messages_api(replay_responder({"hello there": "hi"}), faults=FaultPlan(rate_limit=0.5, seed=2, retry_after_s=0.01))
    quota = _BookQuota(_book(acme=TenantBudget(usd=10.0)))
    price = DEFAULT_PRICES["claude-opus-4-7"]
    teacher = AnthropicTeacher(TeacherConfig(max_attempts=20, timeout_s=30.0), ResponseCache(tmp_path), quota,
                               claim=QuotaConfig(holder="run-1", tenant="acme"), prices=price)
    results = _many(teacher, 8)
    assert all(r.text == "hi" for r in results)
    outcomes = [r["outcome"] for r in quota.released]
    assert outcomes.count("ok") == 8 and outcomes.count("rate_limited") == sum(r.retries for r in results) > 0
    assert all(r["retry_after_s"] == 0.01 and r["billed_tokens"] == 0 for r in quota.released
               if r["outcome"] == "rate_limited")
    book = quota.book
    assert book.state.in_flight == 0 and not book.leases  # every lease came back
    paid = sum(cost_usd(r.usage, price) for r in results)
    assert book.tenant_view("acme")[1].usd == pytest.approx(paid) and book.tenant_view("acme")[1].calls == 8
    assert book.stats("run-1")["holder"]["rate_limited"] == outcomes.count("rate_limited")


def test_a_refused_budget_makes_no_call_and_is_not_retried(messages_api, tmp_path):
    from kolm_ray.sampling.config import QuotaConfig
    from kolm_ray.sampling.limits import Spend, TenantBudget

    srv = messages_api(replay_responder({"hello there": "hi"}))
    book = _book(acme=TenantBudget(usd=1.0))
    book.spend["acme"] = Spend(usd=1.0)
    teacher = AnthropicTeacher(TeacherConfig(), ResponseCache(tmp_path), _BookQuota(book),
                               claim=QuotaConfig(holder="run-2", tenant="acme"))
    r = _run(teacher.sample(_params(), "k" * 64))
    assert r.text is None and r.failures == ["budget"] and r.attempts == 1
    assert r.error.startswith("budget: tenant 'acme' has spent its teacher budget")
    assert srv.stats.requests == 0 and book.state.in_flight == 0


def test_a_teacher_without_a_holder_gets_one_of_its_own(tmp_path):
    from kolm_ray.sampling.config import QuotaConfig

    a = AnthropicTeacher(TeacherConfig(), ResponseCache(tmp_path), None, sdk_env={"ANTHROPIC_API_KEY": "x"})
    b = AnthropicTeacher(TeacherConfig(), ResponseCache(tmp_path), None, sdk_env={"ANTHROPIC_API_KEY": "x"},
                         claim=QuotaConfig(tenant="acme"))
    assert a.claim.holder and b.claim.holder and a.claim.holder != b.claim.holder and b.claim.tenant == "acme"


# ----- the stand-in server's concurrency limit ----------------------------------------------------


def _concurrent_posts(url, n):
    import aiohttp

    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hello there"}]}

    async def go():
        async with aiohttp.ClientSession() as s:
            async def one():
                async with s.post(f"{url}/v1/messages", json=body) as r:
                    return r.status, r.headers.get("retry-after")

            return await asyncio.gather(*(one() for _ in range(n)))

    return asyncio.run(go())


def test_stand_in_answers_429_past_its_concurrency_limit(messages_api):
    srv = messages_api(replay_responder({"hello there": "hi"}), latency_s=0.3, max_in_flight=3,
                       faults=FaultPlan(retry_after_s=0.25))
    got = _concurrent_posts(srv.url, 8)
    assert sorted(s for s, _ in got).count(200) == 3
    assert [ra for s, ra in got if s == 429] == ["0.25"] * 5
    assert (srv.stats.rate_limited, srv.stats.concurrency_rejected, srv.stats.succeeded) == (5, 5, 3)
    # Counted as they arrive, rejected ones included: the 3 held open and the one being turned away.
    assert srv.stats.max_in_flight == 4


def test_stand_in_without_a_limit_takes_everything(messages_api):
    srv = messages_api(replay_responder({"hello there": "hi"}), latency_s=0.2)
    got = _concurrent_posts(srv.url, 8)
    assert [s for s, _ in got] == [200] * 8 and srv.stats.rate_limited == 0


# ----- the retry policy rides out a provider outage --------------------------------------------


def test_the_default_retry_policy_rides_out_a_two_minute_outage():
    cfg = TeacherConfig()
    waits = [decide_retry(a, Failure("overloaded", "529"), cfg) for a in range(1, cfg.max_attempts)]
    assert None not in waits and decide_retry(cfg.max_attempts, Failure("overloaded", "529"), cfg) is None
    assert sum(waits) >= 240  # no jitter: the shortest the policy waits before a sample fails
    assert max(waits) == cfg.backoff_max_s == 60  # never more than a minute between attempts


def test_the_cli_default_is_the_configs():
    from kolm_ray.cli.sampling import sample

    (opt,) = [p for p in sample.params if p.name == "max_attempts"]
    assert opt.default == TeacherConfig().max_attempts


# ----- the cache is per endpoint -----------------------------------------------------------------


def test_endpoints_are_normalized():
    from kolm_ray.sampling.cache import DEFAULT_ENDPOINT, normalize_endpoint

    assert normalize_endpoint(None) == normalize_endpoint("") == DEFAULT_ENDPOINT == "https://api.anthropic.com"
    for same in ("https://api.anthropic.com/", "HTTPS://API.Anthropic.com:443", "https://api.anthropic.com?x=1"):
        assert normalize_endpoint(same) == DEFAULT_ENDPOINT
    assert normalize_endpoint("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert normalize_endpoint("http://127.0.0.1:80/proxy/") == "http://127.0.0.1/proxy"
    assert normalize_endpoint("https://user:secret@gw.example.com/a") == "https://gw.example.com/a"  # no credential
    assert normalize_endpoint("https://gw.example.com/a") != normalize_endpoint("https://gw.example.com/b")


def test_answers_from_one_endpoint_are_not_reused_against_another(messages_api, tmp_path, monkeypatch):
    recorded = messages_api(replay_responder({"hello there": "recorded answer"}))
    live = messages_api(replay_responder({"hello there": "live answer"}))
    monkeypatch.delenv("ANTHROPIC_BASE_URL")
    cfg = TeacherConfig(max_attempts=2, backoff_base_s=0.001)

    def ask(srv):
        t = AnthropicTeacher(cfg, ResponseCache(tmp_path), sdk_env={"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": srv.url})
        return _run(t.sample(_params(), request_key(_params(), 0)))

    assert ask(recorded).text == "recorded answer"
    second = ask(live)
    assert second.text == "live answer" and not second.cached and live.stats.requests == 1
    # Each endpoint reads its own again, for free; the same endpoint spelled otherwise is one endpoint.
    again = AnthropicTeacher(cfg, ResponseCache(tmp_path), sdk_env={"ANTHROPIC_API_KEY": "k",
                                                                    "ANTHROPIC_BASE_URL": recorded.url + "/"})
    hit = _run(again.sample(_params(), request_key(_params(), 0)))
    assert hit.cached and hit.text == "recorded answer" and recorded.stats.requests == 1
    assert ResponseCache(tmp_path, endpoint=live.url).get(request_key(_params(), 0))["endpoint"] == live.url


def test_entries_written_before_endpoints_are_read_only_for_the_default_endpoint(tmp_path):
    import json

    from kolm_ray.sampling.cache import CACHE_FORMAT_VERSION

    key, recorded_key = "ab" + "c" * 62, "cd" + "e" * 62
    for k, model in ((key, "claude-opus-4-7"), (recorded_key, "recorded:claude-opus-4-7")):
        (tmp_path / k[:2]).mkdir()
        (tmp_path / k[:2] / f"{k}.json").write_text(json.dumps({"v": CACHE_FORMAT_VERSION, "text": "old",
                                                                "model": model, "usage": {}}))
    default = ResponseCache(tmp_path, endpoint=None)
    default = default.for_endpoint(None)
    assert default.get(key)["text"] == "old"
    assert default.get(recorded_key) is None  # a recorded stand-in's answer is not the live API's
    assert ResponseCache(tmp_path, endpoint="http://127.0.0.1:9").get(key) is None  # who answered it is unknown
    # What is written now names its endpoint; the default endpoint keeps the layout it had.
    default.put("ef" + "0" * 62, {"text": "new", "usage": {}})
    assert json.loads((tmp_path / "ef" / ("ef" + "0" * 62 + ".json")).read_text())["endpoint"] == default.endpoint


# ----- ANTHROPIC_AUTH_TOKEN ------------------------------------------------------------------------


def test_the_auth_token_reaches_a_teacher_whose_process_lacks_it(messages_api, tmp_path, monkeypatch):
    from kolm_ray.sampling.teacher import sdk_env

    srv = messages_api(replay_responder({"hello there": "hi"}), auth_token="secret-token")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "secret-token")
    env = sdk_env()  # what the driver hands its Ray workers
    assert env == {"ANTHROPIC_AUTH_TOKEN": "secret-token", "ANTHROPIC_BASE_URL": srv.url}
    for var in ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):  # a worker that did not inherit them
        monkeypatch.delenv(var)
    teacher = AnthropicTeacher(TeacherConfig(max_attempts=1), ResponseCache(tmp_path), sdk_env=env)
    r = _run(teacher.sample(_params(), request_key(_params(), 0)))
    assert r.text == "hi", r.error
    assert srv.stats.auth == {"bearer": 1} and srv.stats.unauthorized == 0


def test_the_stand_in_refuses_a_wrong_or_missing_credential(messages_api, tmp_path, monkeypatch):
    srv = messages_api(replay_responder({"hello there": "hi"}), auth_token="secret-token")
    teacher = AnthropicTeacher(TeacherConfig(max_attempts=1), ResponseCache(tmp_path))  # x-api-key: the test key
    r = _run(teacher.sample(_params(), request_key(_params(), 0)))
    assert r.text is None and r.failures == ["client"] and "401" in r.error and srv.stats.unauthorized == 1
