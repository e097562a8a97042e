import math

from kolm_ray.sampling.config import QuotaConfig
from kolm_ray.sampling.quota import QuotaState, admit, quota_name, refill

LIMITS = QuotaConfig(max_in_flight=2, calls_per_minute=60, tokens_per_minute=6000)


def full(now=0.0):
    return QuotaState(call_tokens=60, token_tokens=6000, updated_at=now)


def test_admits_when_under_every_limit():
    assert admit(full(), 0.0, 100, LIMITS) == 0.0


def test_in_flight_limit_waits_for_a_release():
    s = QuotaState(in_flight=2, call_tokens=60, token_tokens=6000)
    assert math.isinf(admit(s, 0.0, 100, LIMITS))


def test_calls_per_minute_bucket_refills_tick_by_tick():
    s = QuotaState(call_tokens=0.0, token_tokens=6000, updated_at=0.0)
    assert admit(s, 0.0, 10, LIMITS) == 1.0  # 60/min: one call a second
    s = refill(s, 0.5, LIMITS)
    assert abs(admit(s, 0.5, 10, LIMITS) - 0.5) < 1e-9
    s = refill(s, 1.0, LIMITS)
    assert admit(s, 1.0, 10, LIMITS) == 0.0


def test_tokens_per_minute_bucket():
    s = QuotaState(call_tokens=60, token_tokens=100, updated_at=0.0)
    # 6000/min = 100 tokens a second; 300 tokens need 2 more seconds of refill
    assert abs(admit(s, 0.0, 300, LIMITS) - 2.0) < 1e-9


def test_a_call_bigger_than_the_bucket_is_throttled_not_starved():
    s = full()
    assert admit(s, 0.0, 10**9, LIMITS) == 0.0


def test_rate_limit_pause_blocks_everyone_until_it_passes():
    s = QuotaState(call_tokens=60, token_tokens=6000, paused_until=5.0)
    assert admit(s, 2.0, 1, LIMITS) == 3.0
    assert admit(s, 5.0, 1, LIMITS) == 0.0


def test_refill_caps_at_the_bucket_size():
    s = refill(QuotaState(call_tokens=0, token_tokens=0, updated_at=0.0), 3600.0, LIMITS)
    assert s.call_tokens == 60 and s.token_tokens == 6000


def test_quota_is_per_key_and_endpoint():
    assert quota_name("k1", None) != quota_name("k2", None)
    assert quota_name("k1", "http://a") != quota_name("k1", "http://b")
    assert quota_name("k1", None) == quota_name("k1", None)
