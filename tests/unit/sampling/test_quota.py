"""The shared quota's decisions, tick by tick: admission, holder caps, AIMD, leases, budgets."""

import math

import pytest

from kolm_ray.errors import BudgetExceeded
from kolm_ray.sampling.config import QuotaConfig
from kolm_ray.sampling.limits import RateLimits, ResolvedLimits, TenantBudget, quota_name
from kolm_ray.sampling.quota import (
    Aimd, Grant, QuotaBook, QuotaState, admit, aimd_rate_limited, aimd_success, effective_limits, holder_limits,
    refill,
)

LIMITS = RateLimits(max_in_flight=2, calls_per_minute=60, tokens_per_minute=6000)
BIG = RateLimits(max_in_flight=4, calls_per_minute=10**6, tokens_per_minute=10**9)


def full(now=0.0):
    return QuotaState(call_tokens=60, token_tokens=6000, updated_at=now)


def book(org=BIG, tenants=None, now=0.0):
    return QuotaBook(ResolvedLimits(org=org, stated=True, tenants=tenants or {}), now)


def claim(holder, **kw):
    return QuotaConfig(holder=holder, **kw)


def waits_for_a_slot(b, now, got):
    """Refused for want of a slot: told to come back when a release wakes it, at the latest when
    the next lease expires."""
    return not isinstance(got, Grant) and got == pytest.approx(b.next_expiry() - now)


# ----- admission (pure) -----------------------------------------------------------------------


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
    assert admit(full(), 0.0, 10**9, LIMITS) == 0.0


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
    assert "k1" not in quota_name("k1", None)  # the name never carries the key itself


def test_auth_token_users_do_not_share_one_quota():
    from kolm_ray.sampling.limits import teacher_identity

    url = {"ANTHROPIC_BASE_URL": "http://gw"}
    one = quota_name(*teacher_identity({**url, "ANTHROPIC_AUTH_TOKEN": "token-one"}))
    two = quota_name(*teacher_identity({**url, "ANTHROPIC_AUTH_TOKEN": "token-two"}))
    assert one != two and one != quota_name(None, "http://gw")  # not the one everyone without a key had
    assert "token-one" not in one
    # An API key names its quota as it always did (the operator's limits are keyed by its digest),
    # with or without a token beside it.
    key = quota_name("sk-1", "http://gw")
    assert quota_name(*teacher_identity({**url, "ANTHROPIC_API_KEY": "sk-1"})) == key
    assert quota_name(*teacher_identity({**url, "ANTHROPIC_API_KEY": "sk-1", "ANTHROPIC_AUTH_TOKEN": "t"})) == key


# ----- a holder's caps narrow, never widen --------------------------------------------------


def test_holder_caps_are_the_minimum_of_org_and_cap():
    org = RateLimits(max_in_flight=16, calls_per_minute=4000, tokens_per_minute=2_000_000)
    assert holder_limits(org, QuotaConfig(max_in_flight=4)).max_in_flight == 4
    wide = holder_limits(org, QuotaConfig(max_in_flight=64, calls_per_minute=10**6, tokens_per_minute=10**9))
    assert wide == org  # a compile asking for more than the organization has gets the organization's
    assert holder_limits(org, QuotaConfig()) == org
    assert holder_limits(org, None) == org


def test_a_holders_cap_limits_it_but_not_the_others():
    b = book(BIG)
    a1 = b.try_acquire(0.0, 10, claim("a", max_in_flight=2))
    a2 = b.try_acquire(0.0, 10, claim("a", max_in_flight=2))
    assert isinstance(a1, Grant) and isinstance(a2, Grant)
    assert waits_for_a_slot(b, 0.0, b.try_acquire(0.0, 10, claim("a", max_in_flight=2)))  # "a" is at its cap
    assert isinstance(b.try_acquire(0.0, 10, claim("b")), Grant)  # "b" is not
    assert isinstance(b.try_acquire(0.0, 10, claim("b")), Grant)
    assert waits_for_a_slot(b, 0.0, b.try_acquire(0.0, 10, claim("b")))  # now the org's 4 are taken
    assert b.limits.org == BIG  # nobody's caps changed the organization's limits


def test_a_holders_calls_per_minute_cap_has_its_own_bucket():
    b = book(RateLimits(max_in_flight=100, calls_per_minute=600, tokens_per_minute=10**9))
    c = claim("slow", calls_per_minute=60)  # one a second, under the org's ten a second
    grants = [b.try_acquire(0.0, 1, c) for _ in range(60)]
    assert all(isinstance(g, Grant) for g in grants)  # its bucket starts full: a minute's worth
    wait = b.try_acquire(0.0, 1, c)
    assert wait == pytest.approx(1.0)
    assert isinstance(b.try_acquire(0.0, 1, claim("fast")), Grant)  # the org still has room
    assert isinstance(b.try_acquire(1.0, 1, c), Grant)


# ----- AIMD (pure) ------------------------------------------------------------------------------


def test_a_429_halves_the_limit_and_never_below_one():
    a = Aimd(limit=64)
    a = aimd_rate_limited(a, lease_epoch=0)
    assert a.limit == 32 and a.epoch == 1
    for epoch in range(1, 8):
        a = aimd_rate_limited(a, lease_epoch=epoch)
    assert a.limit == 1
    assert aimd_rate_limited(a, lease_epoch=a.epoch).limit == 1


def test_429s_of_calls_sent_before_the_cut_do_not_cut_again():
    a = aimd_rate_limited(Aimd(limit=64), lease_epoch=0)
    # The rest of the burst admitted at epoch 0 comes back 429 too: one cut per burst.
    for _ in range(47):
        a = aimd_rate_limited(a, lease_epoch=0)
    assert a.limit == 32 and a.epoch == 1


def test_a_window_of_successes_adds_one_up_to_the_ceiling():
    a = Aimd(limit=4)
    for tick in range(3):
        a = aimd_success(a, ceiling=6, in_flight=4)
        assert a.limit == 4 and a.successes == tick + 1
    a = aimd_success(a, ceiling=6, in_flight=4)  # the 4th success closes a window of 4
    assert a.limit == 5 and a.successes == 0
    for _ in range(5):
        a = aimd_success(a, ceiling=6, in_flight=5)
    assert a.limit == 6
    for _ in range(100):
        a = aimd_success(a, ceiling=6, in_flight=6)
    assert a.limit == 6  # the organization's limit is the ceiling


def test_a_success_while_the_limit_was_not_in_use_does_not_raise_it():
    """A run's tail (or a quiet hour) sends fewer calls than the limit allows: their successes
    say nothing about the server at a higher limit, so they do not count (RFC 7661)."""
    a = Aimd(limit=8)
    for _ in range(100):
        a = aimd_success(a, ceiling=64, in_flight=7)
    assert a == Aimd(limit=8)
    for _ in range(8):
        a = aimd_success(a, ceiling=64, in_flight=8)
    assert a.limit == 9


def test_the_book_counts_only_successes_of_a_full_window():
    b = book(RateLimits(max_in_flight=4, calls_per_minute=10**6, tokens_per_minute=10**9))
    b.aimd = Aimd(limit=2.0)
    # Two out at a time (the limit in use): each success counts, two make a window.
    for _ in range(2):
        g1, g2 = b.try_acquire(0.0, 10, claim("a")), b.try_acquire(0.0, 10, claim("a"))
        b.release(0.0, g1.lease, estimated=10, actual=10)
        b.release(0.0, g2.lease, estimated=10, actual=10)
    assert b.aimd.limit == 3
    # One at a time under a limit of 3 (a run's tail): a hundred successes raise nothing.
    for _ in range(100):
        g = b.try_acquire(0.0, 10, claim("a"))
        b.release(0.0, g.lease, estimated=10, actual=10)
    assert b.aimd.limit == 3 and b.stats()["effective_limit"] == 3


def test_effective_limit_is_the_learned_one_under_the_orgs():
    assert effective_limits(BIG, Aimd(limit=2.0)).max_in_flight == 2
    assert effective_limits(BIG, Aimd(limit=100.0)).max_in_flight == BIG.max_in_flight


def test_aimd_converges_under_a_server_limit_instead_of_hammering_it():
    """Rounds of a saturated client against a server that takes 16 at once, starting at the
    default 64: after the opening burst, 429s are rare and the limit stays near the real one."""
    server_limit, ceiling = 16, 64
    a = Aimd(limit=ceiling)
    rejected, paid, limits = 0, 0, []
    for _ in range(60):
        n = int(a.limit)
        epoch = a.epoch
        ok, rejected_now = min(n, server_limit), max(0, n - server_limit)
        for _ in range(ok):
            a = aimd_success(a, ceiling, in_flight=n)
        for _ in range(rejected_now):
            a = aimd_rate_limited(a, epoch)
        rejected, paid = rejected + rejected_now, paid + ok
        limits.append(int(a.limit))
    assert max(limits[5:]) <= server_limit + 1 and min(limits[5:]) >= server_limit // 2
    assert rejected / paid < 0.1  # main's limiter (no adaptation) drew 1.35 per paid call
    opening = 48 + 16  # 64 sent into 16, then 32 into 16
    assert (rejected - opening) / paid < 0.02


# ----- leases ---------------------------------------------------------------------------------


def test_a_holder_that_never_releases_loses_its_slot_at_expiry():
    b = book(RateLimits(max_in_flight=1, calls_per_minute=10**6, tokens_per_minute=10**9))
    dead = b.try_acquire(0.0, 10, claim("dead"), lease_s=150.0)
    assert isinstance(dead, Grant) and dead.expires_at == 150.0
    wait = b.try_acquire(10.0, 10, claim("alive"), lease_s=150.0)
    assert wait == pytest.approx(140.0)  # not forever: until the dead holder's lease expires
    assert b.try_acquire(149.9, 10, claim("alive")) == pytest.approx(0.1)
    g = b.try_acquire(150.0, 10, claim("alive"), lease_s=150.0)
    assert isinstance(g, Grant)
    assert b.stats()["expired_leases"] == 1 and b.state.in_flight == 1
    # The dead holder's release arrives after all: its slot is not freed a second time.
    assert b.release(151.0, dead.lease, estimated=10, actual=10) is False
    assert b.state.in_flight == 1 and b.stats()["late_releases"] == 1


def test_release_holder_frees_everything_a_cancelled_compile_held():
    b = book(BIG)
    mine = [b.try_acquire(0.0, 10, claim("cancelled")) for _ in range(3)]
    other = b.try_acquire(0.0, 10, claim("other"))
    assert all(isinstance(g, Grant) for g in [*mine, other])
    assert waits_for_a_slot(b, 0.0, b.try_acquire(0.0, 10, claim("next")))
    assert b.release_holder(1.0, "cancelled") == 3
    assert b.state.in_flight == 1
    assert isinstance(b.try_acquire(1.0, 10, claim("next")), Grant)
    assert "cancelled" not in b.holders


def test_a_dead_processs_leases_end_at_once_and_its_holders_others_stand():
    b = book(BIG)
    dead = [b.try_acquire(0.0, 10, claim("run"), lease_s=150.0, owner="actor-1") for _ in range(2)]
    alive = b.try_acquire(0.0, 10, claim("run"), lease_s=150.0, owner="actor-2")
    other = b.try_acquire(0.0, 10, claim("other"), lease_s=150.0)
    assert all(isinstance(g, Grant) for g in [*dead, alive, other]) and b.owners() == {"actor-1", "actor-2"}
    assert waits_for_a_slot(b, 1.0, b.try_acquire(1.0, 10, claim("next")))
    assert b.release_owner(1.0, "actor-1") == 2  # long before the leases' expiry
    assert b.state.in_flight == 2 and b.holders["run"].state.in_flight == 1 and b.owners() == {"actor-2"}
    assert b.stats()["dead_owner_leases"] == 2 and b.stats()["expired_leases"] == 0
    assert isinstance(b.try_acquire(1.0, 10, claim("next")), Grant)
    # The dead process's releases, should they come after all, free nothing twice.
    assert b.release(2.0, dead[0].lease, estimated=10, actual=10) is False and b.state.in_flight == 3


def test_a_snapshot_keeps_each_leases_owner(tmp_path):
    b = book(BIG)
    b.try_acquire(0.0, 10, claim("run"), owner="actor-1")
    again = book(BIG)
    again.restore(b.snapshot(), 1.0, restarted=True)
    assert again.owners() == {"actor-1"} and again.release_owner(1.0, "actor-1") == 1


def test_a_429_pauses_everyone_for_its_retry_after_and_cuts_the_limit_once_per_burst():
    b = book(BIG)
    grants = [b.try_acquire(0.0, 10, claim("c")) for _ in range(4)]
    b.release(1.0, grants[0].lease, estimated=10, actual=0, outcome="rate_limited", retry_after_s=2.0)
    b.release(1.0, grants[1].lease, estimated=10, actual=0, outcome="rate_limited", retry_after_s=2.0)
    s = b.stats()
    assert s["rate_limited"] == 2 and s["effective_limit"] == 2  # 4 -> 2, not 4 -> 2 -> 1
    assert b.try_acquire(1.5, 10, claim("c")) == pytest.approx(1.5)  # paused until 3.0
    assert waits_for_a_slot(b, 3.0, b.try_acquire(3.0, 10, claim("c")))  # 2 still in flight, limit now 2
    b.release(3.0, grants[2].lease, estimated=10, actual=20)
    assert isinstance(b.try_acquire(3.0, 10, claim("c")), Grant)


def test_successes_of_calls_sent_before_a_cut_do_not_raise_the_new_limit():
    """A cut from 4 to 2 with the other 3 calls still out: their successes (at 3, 2, 1 in
    flight) are of calls sent under the old limit, and say nothing about the new one."""
    b = book(RateLimits(max_in_flight=4, calls_per_minute=10**6, tokens_per_minute=10**9))
    grants = [b.try_acquire(0.0, 10, claim("c")) for _ in range(4)]
    b.release(0.0, grants[0].lease, estimated=10, actual=0, outcome="rate_limited", retry_after_s=0.0)
    assert b.aimd.limit == 2
    for g in grants[1:]:
        b.release(0.0, g.lease, estimated=10, actual=10)
    assert b.aimd == Aimd(limit=2.0, epoch=1, successes=0)


def test_successes_grow_the_limit_back_to_the_orgs():
    b = book(BIG)
    g = b.try_acquire(0.0, 10, claim("c"))
    b.release(0.0, g.lease, estimated=10, actual=0, outcome="rate_limited", retry_after_s=0.0)
    assert b.stats()["effective_limit"] == 2
    now, out = 0.0, []

    def saturated(calls):
        """A caller with more work than slots: every free slot is taken again at once."""
        for _ in range(calls):
            while isinstance(g := b.try_acquire(now, 10, claim("c")), Grant):
                out.append(g)
            b.release(now, out.pop(0).lease, estimated=10, actual=10, outcome="ok")

    saturated(2 + 3)  # a window of 2 successes, then one of 3
    assert b.stats()["effective_limit"] == 4
    saturated(40)
    assert b.stats()["effective_limit"] == 4 and b.stats()["max_in_flight_seen"] <= 4


def test_stats_expose_the_limit_the_peak_and_the_counts():
    b = book(BIG)
    grants = [b.try_acquire(0.0, 10, claim("h")) for _ in range(3)]
    for g in grants:
        b.release(0.0, g.lease, estimated=10, actual=10)
    s = b.stats("h")
    assert (s["admitted"], s["max_in_flight_seen"], s["effective_limit"], s["rate_limited"]) == (3, 3, 4, 0)
    assert s["holder"]["admitted"] == 3 and s["holder"]["max_in_flight_seen"] == 3


def test_lowering_the_orgs_limit_applies_to_the_next_admission():
    b = book(BIG)
    for _ in range(3):
        b.try_acquire(0.0, 10, claim("c"))
    b.set_limits(ResolvedLimits(org=BIG.model_copy(update={"max_in_flight": 2}), stated=True), 1.0)
    assert waits_for_a_slot(b, 1.0, b.try_acquire(1.0, 10, claim("c")))
    assert b.stats()["effective_limit"] == 2


# ----- budgets --------------------------------------------------------------------------------


def test_a_tenant_whose_budget_is_spent_is_refused_before_the_call():
    b = book(BIG, tenants={"acme": TenantBudget(usd=0.05)})
    g = b.try_acquire(0.0, 10, claim("c1", tenant="acme"))
    b.release(0.0, g.lease, estimated=10, actual=1000, cost_usd=0.03, billed_tokens=1000)
    g = b.try_acquire(0.0, 10, claim("c1", tenant="acme"))  # $0.03 of $0.05: still allowed
    b.release(0.0, g.lease, estimated=10, actual=1000, cost_usd=0.03, billed_tokens=1000)
    with pytest.raises(BudgetExceeded, match="tenant 'acme' has spent its teacher budget"):
        b.try_acquire(0.0, 10, claim("c2", tenant="acme"))  # another compile of the same tenant
    assert isinstance(b.try_acquire(0.0, 10, claim("c3", tenant="globex")), Grant)
    assert b.tenant_view("acme")[1].usd == pytest.approx(0.06) and b.stats()["refused_budget"] == 1
    assert b.state.in_flight == 1  # the refusal took no slot


def test_a_token_budget_counts_billed_tokens():
    b = book(BIG, tenants={"acme": TenantBudget(tokens=1500)})
    g = b.try_acquire(0.0, 10, claim("c", tenant="acme"))
    b.release(0.0, g.lease, estimated=10, actual=0, outcome="rate_limited")  # a 429 is not billed
    g = b.try_acquire(0.0, 10, claim("c", tenant="acme"))
    b.release(0.0, g.lease, estimated=10, actual=1600, billed_tokens=1600)
    with pytest.raises(BudgetExceeded):
        b.try_acquire(0.0, 10, claim("c", tenant="acme"))


def test_a_compile_stops_paying_at_its_max_cost():
    b = book(BIG)
    c = claim("c", max_cost_usd=0.01)
    g = b.try_acquire(0.0, 10, c)
    b.release(0.0, g.lease, estimated=10, actual=10, cost_usd=0.02, billed_tokens=10)
    with pytest.raises(BudgetExceeded, match="max-cost"):
        b.try_acquire(0.0, 10, c)
    assert isinstance(b.try_acquire(0.0, 10, claim("other")), Grant)


def test_a_late_release_still_books_its_spend():
    b = book(RateLimits(max_in_flight=1, calls_per_minute=10**6, tokens_per_minute=10**9),
             tenants={"acme": TenantBudget(usd=1.0)})
    g = b.try_acquire(0.0, 10, claim("c", tenant="acme"), lease_s=5.0)
    b.reclaim(6.0)
    assert b.release(7.0, g.lease, estimated=10, actual=10, cost_usd=0.5, billed_tokens=10) is False
    assert b.tenant_view("acme")[1].usd == pytest.approx(0.5)


# ----- the durable state -----------------------------------------------------------------------


def test_a_restarted_actor_takes_back_its_leases_spend_and_learned_limit():
    b = book(BIG, tenants={"acme": TenantBudget(usd=1.0)})
    g = b.try_acquire(0.0, 10, claim("c", tenant="acme"))
    b.release(0.0, g.lease, estimated=10, actual=0, outcome="rate_limited")
    g = b.try_acquire(0.0, 10, claim("c", tenant="acme"))
    b.release(0.0, g.lease, estimated=10, actual=10, cost_usd=0.25, billed_tokens=10)
    held = b.try_acquire(0.0, 10, claim("c", tenant="acme"), lease_s=100.0)
    snap = b.snapshot()

    restarted = book(BIG, tenants={"acme": TenantBudget(usd=1.0)}, now=5.0)
    restarted.restore(snap, 5.0, restarted=True)
    assert restarted.state.in_flight == 1 and restarted.stats()["effective_limit"] == 2
    assert restarted.tenant_view("acme")[1].usd == pytest.approx(0.25)
    assert restarted.release(6.0, held.lease, estimated=10, actual=10) is True
    assert restarted.state.in_flight == 0

    fresh = book(BIG, tenants={"acme": TenantBudget(usd=1.0)}, now=5.0)
    fresh.restore(snap, 5.0, restarted=False)  # a new actor: the ledger only
    assert fresh.state.in_flight == 0 and fresh.stats()["effective_limit"] == 4
    assert fresh.tenant_view("acme")[1].usd == pytest.approx(0.25)


def test_records_another_version_wrote_restore_as_far_as_they_go():
    """A lease without ``owner`` (v2 wrote none) and fields this version does not know (a later
    one's) restore instead of stopping the actor with a TypeError."""
    b = book(BIG)
    held = b.try_acquire(0.0, 10, claim("c", tenant="acme"), lease_s=100.0, owner="tok")
    snap = b.snapshot()
    for lease in snap["leases"]:
        del lease["owner"]
        lease["priority"] = 3
    snap["aimd"]["window"] = 9
    snap["spend"] = {"acme": {"usd": 0.5, "tokens": 7, "calls": 1, "cache_usd": 0.1}}
    snap["holders"]["c"]["caps"]["lane"] = "fast"

    restarted = book(BIG, now=5.0)
    restarted.restore(snap, 5.0, restarted=True)
    assert restarted.state.in_flight == 1 and restarted.owners() == set()
    assert restarted.tenant_view("acme")[1].usd == pytest.approx(0.5)
    assert restarted.release(6.0, held.lease, estimated=10, actual=10) is True


def test_the_retired_actors_ledger_is_taken_over_and_only_its_new_spend_added_after():
    from kolm_ray.sampling.limits import Spend

    b = book(BIG)
    g = b.try_acquire(0.0, 10, claim("c", tenant="acme"))
    b.release(0.0, g.lease, estimated=10, actual=10, cost_usd=1.0, billed_tokens=10)
    assert b.take_over({"acme": Spend(usd=2.0, tokens=20, calls=2), "zed": Spend(usd=0.5, calls=1)}) is True
    assert b.tenant_view("acme")[1] == Spend(usd=3.0, tokens=30, calls=3)
    assert b.take_over({"acme": Spend(usd=2.0, tokens=20, calls=2), "zed": Spend(usd=0.5, calls=1)}) is False
    assert b.take_over({"acme": Spend(usd=2.5, tokens=25, calls=3), "zed": Spend(usd=0.5, calls=1)}) is True
    assert b.tenant_view("acme")[1] == Spend(usd=3.5, tokens=35, calls=4)  # only what it booked since
    # What it has taken over survives this actor's own restart: nothing is added twice.
    again = book(BIG, now=5.0)
    again.restore(b.snapshot(), 5.0, restarted=False)
    assert again.take_over({"acme": Spend(usd=2.5, tokens=25, calls=3), "zed": Spend(usd=0.5, calls=1)}) is False
    assert again.tenant_view("acme")[1] == Spend(usd=3.5, tokens=35, calls=4)
    assert again.tenant_view("zed")[1] == Spend(usd=0.5, calls=1)


def test_housekeeping_goes_on_after_a_step_raises(tmp_path, caplog):
    """An unexpected exception in one step (here injected into the dead-owner check) is
    logged and counted; persisting and reclaiming go on (before, the task ended with it)."""
    import asyncio
    import json
    import time

    from kolm_ray.sampling.quota import _TeacherQuota

    state = tmp_path / "state.json"

    async def scenario():
        actor = _TeacherQuota("d" * 12, str(tmp_path / "limits.json"), str(state))
        failures = []

        async def broken():
            failures.append(1)
            raise RuntimeError("injected")

        actor._free_dead_owners = broken
        g = await actor.acquire(10, claim("h", tenant="acme"), 0.2)  # starts the housekeeping
        await actor.release(g.lease, estimated=10, actual=10, cost_usd=0.75, billed_tokens=10)
        held = await actor.acquire(10, claim("h"), 0.2)  # never released: reclaimed at its expiry
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = await actor.stats()
            if (len(failures) >= 2 and stats["expired_leases"] == 1 and state.exists()
                    and json.loads(state.read_text())["spend"].get("acme", {}).get("usd") == 0.75):
                break
            await asyncio.sleep(0.05)
        actor._housekeeper.cancel()
        return stats, held

    stats, _ = asyncio.run(scenario())
    assert stats["housekeeping_errors"]["free_dead_owners"] >= 2  # tried again at the next check
    assert stats["expired_leases"] == 1 and stats["in_flight"] == 0  # reclaimed after the fault
    assert json.loads(state.read_text())["spend"]["acme"]["usd"] == 0.75  # persisted after the fault
    assert "free_dead_owners failed" in caplog.text and "injected" in caplog.text


def test_only_a_dead_owner_frees_leases_not_a_fetch_that_timed_out_under_load(monkeypatch):
    """A fetch that times out on a busy cluster (also an ObjectLostError) says nothing about the
    caller: freeing its live leases would let more calls out than the organization's limit."""
    import ray.exceptions

    from kolm_ray.sampling import quota

    def raising(exc):
        def get(ref, timeout=None):
            raise exc
        return get

    monkeypatch.setattr(quota.ray, "get", raising(ray.exceptions.ObjectFetchTimedOutError("x", "", "")))
    assert quota._owner_died(object()) is False
    monkeypatch.setattr(quota.ray, "get", raising(ray.exceptions.OwnerDiedError("x", "", "")))
    assert quota._owner_died(object()) is True
