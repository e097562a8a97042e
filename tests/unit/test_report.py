"""`kolm report`'s arithmetic, checked against figures worked out by hand from the fixture
receipts below: frontier cost with prompt caching and batch discounts, self-hosted cost (measured
and by GPU share), compile cost, monthly savings, payback; --since; a Specialist with no calls;
the price file (defaults agree with the teacher's table, errors name file and line)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kolm_ray.cli import cli
from kolm_ray.errors import InputError
from kolm_ray.publish.release import EnvState, ReleaseStore, Version, add_version
from kolm_ray.report.compute import ArtifactFacts, batched, build_report
from kolm_ray.report.prices import load_price_book
from kolm_ray.sampling.pricing import DEFAULT_PRICES

DAY = 86400.0
NOW = 1_800_000_000.0
T0 = NOW - 5 * DAY  # the environment's first release: the window is 5 days

# Round prices so the sums below can be done by hand: $/MTok.
PRICES = """\
default_frontier: m
frontier:
  m: {input: 10, output: 20, cache_write: 12.5, cache_read: 1}
cache: {min_tokens: 100, ttl_s: 300}
batch: {factor: 0.5, min_calls: 3, window_s: 10}
lease: {gpu_hour: 2, cpu_hour: 0.1, gpu_share: null}
"""


@pytest.fixture
def book(tmp_path: Path):
    f = tmp_path / "prices.yaml"
    f.write_text(PRICES)
    return load_price_book(f)


def call(t: float, prompt: int, completion: int, name: str = "a", version: str = "1.0", k: float | None = 80.0,
         latency_ms: float = 360.0, status: str = "ok") -> dict:
    return {"kind": "call", "time": T0 + t, "specialist": name, "version": version, "prompt_tokens": prompt,
            "completion_tokens": completion, "latency_ms": latency_ms, "status": status, "k": k}


def audit(t: float, cost: float | None, k: float = 70.0) -> dict:
    return {"kind": "audit", "time": T0 + t, "specialist": "a", "version": "1.0", "status": "ok", "k": k,
            "cost_usd": cost}


CALLS = [
    call(0, 200, 50),  # cache write 150 (the shortest prompt) + 50 input + 50 output: 1875+500+1000 = 3375e-6
    call(100, 150, 10),  # within the TTL: read 150 + 10 output: 150+200 = 350e-6
    call(1000, 300, 0),  # 900 s later: the cache expired, and no call reads it within the TTL of this one:
    # a write would be paid for nothing, so the best case is plain input: 300 input = 3000e-6
    call(2000, 150, 100),  # a burst of 3 in 2 s: batched at half. write 150 + 100 out: (1875+2000)/2
    call(2001, 150, 100),  # read: (150+2000)/2
    call(2002, 150, 100, k=None, status="error"),  # read: (150+2000)/2
]
FRONTIER = (3375 + 350 + 3000 + 3875 / 2 + 2150 / 2 + 2150 / 2) / 1e6  # 0.0108125
AUDITS = [audit(50, 0.001), audit(60, None), audit(70, 0.0)]  # one paid, one uncosted, one from the cache
MEASURED = 5 * 0.36 / 3600 * 2  # the five ok calls of 360 ms at $2/GPU-hour (the error is left out): 0.001
COMPILE = 1.0 + 1800 / 3600 * 2 + 3600 / 3600 * 0.1  # teacher $1, 1800 GPU-s at $2/h, 3600 CPU-s at $0.1/h


def state() -> EnvState:
    v = lambda n, ver: Version(version=ver, artifact=f"/nowhere/{n}-{ver}.kolm", artifact_sha256="0" * 64)
    a = add_version(None, "a", v("a", "1.0"), now=T0, weight=0.05, hold_s=0, min_samples=1, tolerance=0.5)
    b = add_version(None, "b", v("b", "1.0"), now=T0 + 10, weight=0.05, hold_s=0, min_samples=1, tolerance=0.5)
    return EnvState(env="prod", releases={"a": a, "b": b})


FACTS = {("a", "1.0"): ArtifactFacts(name="a", version="1.0", teacher_usd=1.0, gpu_seconds=1800, cpu_seconds=3600)}


def report(book, **kw):
    return build_report("prod", state(), CALLS + AUDITS, FACTS, book, since_s=30 * DAY, now=NOW, **kw)


def test_frontier_cost_applies_prompt_caching_and_batch_discounts(book):
    a = report(book).specialists[0]
    assert a.name == "a" and a.calls == 6 and a.errors == 1
    assert (a.prompt_tokens, a.completion_tokens) == (1100, 360)
    assert a.frontier.usd == pytest.approx(FRONTIER)
    assert a.frontier.cached_prefix_tokens == 150 and a.frontier.cache_reads == 3 and a.frontier.batched_calls == 3
    assert (a.frontier.cache_write_tokens, a.frontier.cache_read_tokens) == (300, 450)
    assert a.frontier.input_tokens + a.frontier.cache_write_tokens + a.frontier.cache_read_tokens == a.prompt_tokens


def test_no_caching_below_the_models_minimum_prefix(book, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("cache: {min_tokens: 151, ttl_s: 300}\nbatch: {min_calls: null}\n")
    plain = load_price_book(f, None)
    a = build_report("prod", state(), CALLS, FACTS, plain.model_copy(update={"frontier": book.frontier,
                     "default_frontier": "m"}), since_s=30 * DAY, now=NOW).specialists[0]
    assert a.frontier.cached_prefix_tokens == 0 and a.frontier.batched_calls == 0
    assert a.frontier.usd == pytest.approx((1100 * 10 + 360 * 20) / 1e6)


def test_self_hosted_compile_savings_and_payback(book):
    r = report(book)
    a = r.specialists[0]
    assert r.days == pytest.approx(5) and r.basis == "measured"
    assert a.serving_usd == pytest.approx(MEASURED)
    assert a.audit_usd == pytest.approx(0.001) and a.audits_uncosted == 1
    assert a.self_hosted_usd == pytest.approx(MEASURED + 0.001)
    assert a.compile_usd == pytest.approx(COMPILE) == pytest.approx(2.1)
    assert a.frontier_monthly_usd == pytest.approx(FRONTIER * 6)  # 30 days / 5
    assert a.self_hosted_monthly_usd == pytest.approx((MEASURED + 0.001) * 6)
    savings = FRONTIER - MEASURED - 0.001
    assert a.savings_monthly_usd == pytest.approx(savings * 6)
    assert a.payback_days == pytest.approx(COMPILE / (savings / 5))
    assert r.total.payback_days == pytest.approx(COMPILE / (savings / 5))  # b adds no cost: no artifact found
    assert sum(d.frontier_usd for d in r.daily) == pytest.approx(FRONTIER)
    assert sum(d.self_hosted_usd for d in r.daily) == pytest.approx(r.total.self_hosted_usd)
    assert [e.action for e in r.events] == ["publish", "publish"]


def test_a_specialist_with_no_calls(book):
    b = report(book).specialists[1]
    assert (b.name, b.calls, b.prompt_tokens, b.frontier.usd, b.self_hosted_usd) == ("b", 0, 0, 0.0, 0.0)
    assert b.payback_days is None and b.savings_monthly_usd == 0.0
    assert [(v.version, v.found, v.usd) for v in b.versions] == [("1.0", False, 0.0)]


def test_gpu_share_prices_the_lease_for_the_whole_window_split_by_tokens(book):
    r = report(book, gpu_share=0.25, gpu_hour=4.0)
    a, b = r.specialists
    assert r.basis == "gpu_share"
    assert a.serving_usd == pytest.approx(4.0 * 0.25 * 5 * 24)  # a served every token
    assert b.serving_usd == 0.0
    assert a.compile_usd == pytest.approx(1.0 + 0.5 * 4.0 + 1 * 0.1)  # the lease override prices compiles too
    assert sum(d.self_hosted_usd for d in r.daily) == pytest.approx(120 + 0.001)
    assert a.payback_days is None  # $120 of lease against 1 cent of frontier calls: never pays back


def test_batched_bursts():
    assert batched([0, 1, 2, 50, 51], 3, 10) == [True, True, True, False, False]
    assert batched([0, 5, 10, 15], 3, 10) == [True] * 4  # 0-10 is a burst of 3, and so is 5-15
    assert batched([0, 1, 2], None, 10) == [False] * 3


def test_the_default_price_file_agrees_with_the_teachers_table():
    b = load_price_book()
    assert b.default_frontier in b.frontier
    for model, prices in b.frontier.items():
        if model in DEFAULT_PRICES:
            assert prices == DEFAULT_PRICES[model], model
    assert b.lease.gpu_hour > 0 and b.batch.factor == 0.5


def test_a_bad_price_file_is_named_with_its_line(tmp_path):
    f = tmp_path / "prices.yaml"
    f.write_text("lease:\n  gpu_hour: 2\n  cpu_hour: -1\n")
    with pytest.raises(InputError, match=r"prices.yaml:3: bad price entry lease.cpu_hour"):
        load_price_book(f)
    f.write_text("frontier:\n  m: {input: 1, output: 2}\n")
    with pytest.raises(InputError, match=r"prices.yaml:2: bad price entry frontier.m.cache_write"):
        load_price_book(f)
    f.write_text("lease: [1, 2\n")
    with pytest.raises(InputError, match=r"prices.yaml:2: malformed YAML"):
        load_price_book(f)


# ----- each Specialist's own window; caching only where it pays; what a compile paid ---------


def _state_at(**released: float) -> EnvState:
    v = lambda n: Version(version="1.0", artifact=f"/nowhere/{n}.kolm", artifact_sha256="0" * 64)
    return EnvState(env="prod", releases={n: add_version(None, n, v(n), now=t, weight=0.05, hold_s=0, min_samples=1,
                                                         tolerance=0.5) for n, t in released.items()})


def test_each_specialist_is_scaled_over_its_own_window(book):
    # a released 60 days ago, b a day ago with 100 calls: b's month is 30 of its days, not 30/60 of one.
    st = _state_at(a=NOW - 60 * DAY, b=NOW - DAY)
    calls = [call(NOW - T0 - DAY + 600 * i, 50, 10, name="b") for i in range(100)]  # 700e-6 each, no cache/batch
    facts = {("b", "1.0"): ArtifactFacts(name="b", version="1.0", teacher_usd=1.0)}
    r = build_report("prod", st, calls, facts, book, since_s=90 * DAY, now=NOW)
    a, b = r.specialists
    assert r.days == pytest.approx(60) and (a.days, b.days) == (pytest.approx(60), pytest.approx(1))
    assert b.frontier.usd == pytest.approx(0.07)
    assert b.frontier_monthly_usd == pytest.approx(0.07 * 30)
    measured = 100 * 0.36 / 3600 * 2
    assert b.payback_days == pytest.approx(1.0 / (0.07 - measured))  # a dollar of compile at (0.07 - measured)/day
    assert r.total.frontier_monthly_usd == pytest.approx(a.frontier_monthly_usd + b.frontier_monthly_usd)
    assert r.total.savings_monthly_usd == pytest.approx(a.savings_monthly_usd + b.savings_monthly_usd)
    assert r.total.payback_days == pytest.approx(1.0 / (r.total.savings_monthly_usd / 30))
    # The lease by GPU share: a alone holds it for 59 days; the last day goes to b, which served every token.
    r = build_report("prod", st, calls, facts, book, since_s=90 * DAY, now=NOW, gpu_share=1.0, gpu_hour=1.0)
    a, b = r.specialists
    assert (a.serving_usd, b.serving_usd) == (pytest.approx(59 * 24), pytest.approx(24))
    assert b.self_hosted_monthly_usd == pytest.approx(24 * 30)
    assert sum(d.self_hosted_usd for d in r.daily) == pytest.approx(r.total.self_hosted_usd) == pytest.approx(60 * 24)


def _one(book, calls):
    return build_report("prod", _state_at(a=T0), calls, {}, book, since_s=30 * DAY, now=NOW).specialists[0].frontier


def test_sparse_traffic_never_costs_more_than_no_caching():
    opus = load_price_book()  # 10 calls 600 s apart, 2000-token prompts: no call is within the TTL of another
    p = opus.frontier_prices(opus.default_frontier)
    fc = _one(opus, [call(600 * i, 2000, 100) for i in range(10)])
    assert fc.cache_write_tokens == fc.cache_read_tokens == 0 and fc.cached_prefix_tokens == 2000
    assert fc.usd == pytest.approx(10 * (2000 * p.input + 100 * p.output) / 1e6)
    # Two calls a minute apart: the first writes what the second reads.
    fc = _one(opus, [call(0, 2000, 100), call(60, 2000, 100)])
    assert (fc.cache_write_tokens, fc.cache_read_tokens, fc.input_tokens) == (2000, 2000, 0)


def test_a_call_that_sent_no_prompt_does_not_keep_the_cache_alive(book):
    fc = _one(book, [call(0, 200, 0), call(250, 0, 0, status="error"), call(500, 200, 0)])
    assert fc.cache_reads == 0 and fc.cache_write_tokens == 0  # 500 s between the two cached calls: > TTL
    assert fc.usd == pytest.approx(400 * 10 / 1e6)


def test_one_short_prompt_does_not_switch_caching_off(book):
    fc = _one(book, [call(60 * i, 2000, 0) for i in range(20)] + [call(1300, 50, 0)])
    assert fc.cached_prefix_tokens == 2000 and fc.cache_reads == 19
    assert fc.input_tokens == 50  # the short call is billed uncached


def test_gpu_share_zero_means_the_measured_basis(book):
    over = book.model_copy(update={"lease": book.lease.model_copy(update={"gpu_share": 0.25})})
    assert report(over).basis == "gpu_share"
    r = report(over, gpu_share=0)
    assert r.basis == "measured" and r.gpu_share is None and r.specialists[0].serving_usd == pytest.approx(MEASURED)


def test_an_empty_environment_bills_no_lease(book):
    r = build_report("prod", EnvState(env="prod", releases={}), [], {}, book, since_s=3 * DAY, now=NOW,
                     gpu_share=0.5)
    assert r.total.self_hosted_usd == 0 and sum(d.self_hosted_usd for d in r.daily) == 0


def test_a_window_under_a_day_says_its_monthly_figures_are_extrapolated(book):
    from kolm_ray.report.render import html_page, text

    r = build_report("prod", _state_at(a=NOW - 7200), [call(NOW - T0 - 60, 200, 10)], {}, book,
                     since_s=30 * DAY, now=NOW)
    a = r.specialists[0]
    assert a.frontier_monthly_usd == pytest.approx(a.frontier.usd * 30 * 12)  # the arithmetic is unchanged
    assert a.notes == ["monthly figures extrapolated from 2.0 hours of use (under a day)"]
    assert text(r).splitlines()[-1] == "note: a: monthly figures extrapolated from 2.0 hours of use (under a day)"
    assert "<li>a: monthly figures extrapolated from 2.0 hours of use (under a day)</li>" in html_page(r)
    assert not report(book).specialists[0].notes


def test_cpu_seconds_are_priced_per_core_each_worker_held(book):
    facts = {("a", "1.0"): ArtifactFacts(name="a", version="1.0", cpu_seconds=3600, cpus_per_worker=4)}
    a = build_report("prod", state(), [], facts, book, since_s=30 * DAY, now=NOW).specialists[0]
    assert a.compile_usd == pytest.approx(4 * 0.1)


def _artifact(tmp_path: Path, teacher: dict, config: dict | None = None) -> str:
    import io
    import tarfile

    path = tmp_path / f"art-{len(list(tmp_path.iterdir()))}.kolm"
    with tarfile.open(path, "w") as tar:
        members = {"manifest.json": {"teacher": teacher, "compute": {"fit_cpu_seconds": 3600, "eval_cpu_seconds": 0}}}
        if config is not None:
            members["train.json"] = {"config": config}
        for name, data in members.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"specialist/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def test_a_compile_costs_what_it_paid_the_teacher_not_the_datasets_list_price(tmp_path):
    from kolm_ray.report.load import manifest_facts

    # A recompile from the same teacher cache: the dataset is $3 at list price, this run paid $0.5.
    f = manifest_facts(_artifact(tmp_path, {"model": "m", "cost_usd": 3.0, "paid_this_run_usd": 0.5},
                                 {"cpus_per_worker": 2}), "a", "1.1")
    assert (f.teacher_usd, f.cpus_per_worker, f.note) == (0.5, 2.0, None)
    f = manifest_facts(_artifact(tmp_path, {"model": "m", "cost_usd": 3.0, "paid_this_run_usd": 2.0,
                                            "recorded": True}, {"cpus_per_worker": 2}), "a", "1.0")
    assert f.teacher_usd == 0.0 and f.teacher_recorded and f.note == "recorded stand-in teacher: $0 paid"
    f = manifest_facts(_artifact(tmp_path, {"model": "m", "cost_usd": 3.0}), "a", "0.9")  # an older manifest
    assert f.teacher_usd == 3.0 and f.cpus_per_worker is None
    assert "list price for the whole dataset" in f.note and "one core per worker" in f.note


# ----- through the real writers and the command ---------------------------------------------


def _release(home: Path, now: float) -> None:
    ReleaseStore(home, "prod").update(lambda s: s.model_copy(update={"releases": {"a": add_version(
        None, "a", Version(version="1.0", artifact=str(home / "missing.kolm"), artifact_sha256="0" * 64),
        now=now - 60 * DAY, weight=0.05, hold_s=0, min_samples=1, tolerance=0.5)}}))


def _write_receipts(home: Path, times: list[float]) -> None:
    from kolm_ray.serve.receipts import Receipt, ReceiptWriter

    w = ReceiptWriter(home / "receipts" / "kolm-prod", "w1", flush_interval_s=3600)
    for i, t in enumerate(times):
        w.append(Receipt(time=t, request_id=f"r{i}", specialist="a", version="1.0", artifact_sha256="0" * 64,
                         route="stable", status="ok", input_sha256="0" * 64, output_sha256="0" * 64,
                         latency_ms=1000.0, prompt_tokens=100, completion_tokens=10, t=None, c=100.0, l=None, k=90.0))
    w.close()


def test_since_keeps_only_the_window(kolm_home: Path, tmp_path: Path):
    now = time.time()
    _release(kolm_home, now)
    _write_receipts(kolm_home, [now - 40 * DAY, now - 31 * DAY, now - 2 * DAY, now - DAY])
    prices = tmp_path / "p.yaml"
    prices.write_text("lease: {gpu_hour: 3.6}\n")
    res = CliRunner().invoke(cli, ["report", "--env", "prod", "--json", "--prices", str(prices)])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["total"]["calls"] == 2 and r["days"] == pytest.approx(30, abs=1e-3)
    assert r["total"]["serving_usd"] == pytest.approx(2 * 1.0 / 3600 * 3.6)
    assert r["specialists"][0]["versions"][0]["found"] is False
    res = CliRunner().invoke(cli, ["report", "--env", "prod", "--json", "--since", "36d"])
    assert json.loads(res.stdout)["total"]["calls"] == 3
    prices.write_text("lease: {gpu_hour: 3.6, gpu_share: 0.5}\n")  # a share in the price file ...
    for args, basis in (([], "gpu_share"), (["--gpu-share", "0"], "measured")):  # ... undone from the command
        res = CliRunner().invoke(cli, ["report", "--env", "prod", "--json", "--prices", str(prices), *args])
        assert res.exit_code == 0 and json.loads(res.stdout)["basis"] == basis, res.output
    res = CliRunner().invoke(cli, ["report", "--env", "prod"])
    lines = res.stdout.splitlines()
    assert res.exit_code == 0 and "savings/mo" in lines[2] and lines[-2].startswith("total")
    assert lines[-1] == f"note: a 1.0: no artifact at {kolm_home / 'missing.kolm'}"


@pytest.mark.parametrize("args, message", [
    (["--env", "nope"], "no environment 'nope'"),
    (["--env", "prod", "--since", "soon"], "invalid duration"),
    (["--env", "prod", "--since", "0d"], "above 0"),
    (["--env", "prod", "--frontier", "gpt-9"], "no price for frontier model 'gpt-9'"),
    (["--env", "prod", "--prices", "PRICES"], "p.yaml:1: bad price entry lease.gpu_hour"),
])
def test_bad_input_exits_2(kolm_home: Path, tmp_path: Path, args, message):
    _release(kolm_home, time.time())
    bad = tmp_path / "p.yaml"
    bad.write_text("lease: {gpu_hour: cheap}\n")
    res = CliRunner().invoke(cli, ["report", *[str(bad) if a == "PRICES" else a for a in args]])
    assert res.exit_code == 2, res.output
    assert message in res.stderr
