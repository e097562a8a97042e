"""A compile's cost stated before sampling, and the decision to start or refuse."""

import pyarrow as pa
import pytest

from kolm_ray.sampling.budget import (
    PROMPT_CACHE_MIN_TOKENS, UNREFERENCED_OUTPUT_FRACTION, check_budget, estimate_cost,
)
from kolm_ray.sampling.cache import ResponseCache, request_key
from kolm_ray.sampling.config import TeacherConfig
from kolm_ray.sampling.limits import Spend, TenantBudget
from kolm_ray.sampling.pricing import Prices, Usage
from kolm_ray.sampling.prompt import message_params, system_blocks

PRICES = Prices(input=5.0, output=25.0, cache_write=6.25, cache_read=0.5)
CFG = TeacherConfig(max_tokens=100)


def rows(*pairs):
    return pa.table({"id": [str(i) for i in range(len(pairs))], "input": [p[0] for p in pairs],
                     "output": [p[1] for p in pairs]})


SHORT_SYSTEM = system_blocks("Route the message.", None, [])
SYS_TOKENS = len(SHORT_SYSTEM[0]["text"]) // 4


def test_outputs_come_from_references_else_a_stated_share_of_max_tokens():
    est = estimate_cost(rows(("a" * 40, "b" * 80), ("c" * 40, None)), 2, CFG, PRICES, system=SHORT_SYSTEM)
    assert est.samples == est.calls == 4 and est.cached == 0
    assert est.usage.output_tokens == 2 * 20 + 2 * int(UNREFERENCED_OUTPUT_FRACTION * 100)
    assert est.usage.input_tokens == 4 * (10 + SYS_TOKENS)  # a short system prompt is not cached
    assert est.usd == pytest.approx((est.usage.input_tokens * 5.0 + est.usage.output_tokens * 25.0) / 1e6)
    assert "for 2 calls without one" in est.output_basis


def test_a_reference_longer_than_max_tokens_is_capped():
    est = estimate_cost(rows(("a", "b" * 4000)), 1, CFG, PRICES, system=SHORT_SYSTEM)
    assert est.usage.output_tokens == 100 and est.output_basis == "from the references"


def test_a_long_system_prompt_is_one_cache_write_then_cache_reads():
    shots = [(f"input {i} " * 50, f"output {i}") for i in range(20)]  # few-shot examples make it long
    system = system_blocks("Route the message.", None, shots)
    tokens = len(system[0]["text"]) // 4
    assert tokens >= PROMPT_CACHE_MIN_TOKENS
    est = estimate_cost(rows(("a" * 40, "b" * 40)), 4, CFG, PRICES, system=system)
    assert est.usage.cache_write_tokens == tokens and est.usage.cache_read_tokens == 3 * tokens
    assert est.usage.input_tokens == 4 * 10


def test_cached_answers_cost_nothing(tmp_path):
    r = rows(("a" * 40, "b" * 40), ("c" * 40, "d" * 40))
    cache = ResponseCache(tmp_path)
    # Keys exactly as the fan-out builds them: these two answers were paid for already.
    for text, j in (("a" * 40, 0), ("c" * 40, 1)):
        params = message_params(model=CFG.model, system=SHORT_SYSTEM, user_input=text,
                                max_tokens=CFG.max_tokens, temperature=CFG.temperature)
        cache.put(request_key(params, j), {"text": "x", "usage": Usage().model_dump()})
    est = estimate_cost(r, 2, CFG, PRICES, system=SHORT_SYSTEM, cache=cache)
    assert (est.samples, est.calls, est.cached) == (4, 2, 2)
    full = estimate_cost(r, 2, CFG, PRICES, system=SHORT_SYSTEM)
    assert est.usd == pytest.approx(full.usd / 2)


def test_batch_is_estimated_at_half_price():
    r = rows(("a" * 40, "b" * 40))
    online = estimate_cost(r, 4, CFG, PRICES, system=SHORT_SYSTEM)
    assert estimate_cost(r, 4, CFG, PRICES, system=SHORT_SYSTEM, batch=True).usd == pytest.approx(online.usd / 2)


def _estimate(usd=1.0, tokens=1000, calls=10):
    return estimate_cost(rows(("a", "b")), 1, CFG, PRICES, system=SHORT_SYSTEM).model_copy(
        update={"usd": usd, "calls": calls, "usage": Usage(input_tokens=tokens)})


def test_within_every_budget_the_run_starts_and_says_what_is_left():
    d = check_budget(_estimate(1.0), Spend(usd=2.0), TenantBudget(usd=5.0), max_cost_usd=3.0, tenant="acme")
    assert d.ok and "tenant 'acme' $3.0000 left" in d.message and "--max-cost $3.0000" in d.message
    assert check_budget(_estimate(1.0), Spend(), None, None).ok


def test_an_estimate_over_max_cost_is_refused():
    d = check_budget(_estimate(3.5), Spend(), None, max_cost_usd=3.0)
    assert not d.ok and "estimated cost $3.5000" in d.message and "--max-cost $3.0000" in d.message


def test_a_tenant_with_too_little_left_is_refused():
    d = check_budget(_estimate(1.0), Spend(usd=4.5), TenantBudget(usd=5.0), None, tenant="acme")
    assert not d.ok and "tenant 'acme' has spent $4.5000 of its $5.0000" in d.message
    d = check_budget(_estimate(tokens=600), Spend(tokens=500), TenantBudget(tokens=1000), None, tenant="acme")
    assert not d.ok and "500 of its 1,000 teacher tokens" in d.message


def test_a_spent_budget_refuses_even_a_cheap_run():
    assert not check_budget(_estimate(0.0001), Spend(usd=5.0), TenantBudget(usd=5.0), None).ok


def test_nothing_to_pay_for_always_starts():
    d = check_budget(_estimate(0.0, calls=0), Spend(usd=9.0), TenantBudget(usd=5.0), 0.0)
    assert d.ok and "every answer is in the response cache" in d.message
