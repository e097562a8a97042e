"""What a compile's teacher calls will cost, stated before any is made, and whether it may.

``estimate_cost`` prices the calls a run would pay for: every (row, sample) whose answer is not
already in the response cache (a cached answer was paid for once and costs nothing again).
``check_budget`` (pure) decides from that estimate, what the tenant has spent, the tenant's
budget and the compile's own ``--max-cost`` whether the run may start. Must not call the
teacher or admit calls (``quota.py`` does, and refuses a tenant whose budget is spent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.sampling.cache import ResponseCache, request_key
from kolm_ray.sampling.config import QuotaConfig, TeacherConfig
from kolm_ray.sampling.limits import Spend, TenantBudget
from kolm_ray.sampling.pricing import Prices, Usage, cost_usd
from kolm_ray.sampling.prompt import message_params

CHARS_PER_TOKEN = 4  # the same rough rate as prompt.estimate_tokens
# A row with no reference output gives no evidence of the answer's length: assume half the cap.
# It errs high on purpose (the figure gates spending); a short-answer task without references
# is overestimated most.
UNREFERENCED_OUTPUT_FRACTION = 0.5
# Prompt caching only applies to a prefix of at least this many tokens (1,024 for Opus and
# Sonnet models; Haiku needs 2,048, so its short prompts are, again, overestimated).
PROMPT_CACHE_MIN_TOKENS = 1024


def _tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


class CostEstimate(BaseModel):
    """The calls a run would pay for and their estimated cost."""

    model_config = ConfigDict(frozen=True)
    samples: int = Field(description="(row, sample) pairs the run asks for.")
    calls: int = Field(description="Of them, the calls to pay for (not in the response cache).")
    cached: int = Field(description="Answers already in the response cache: paid once, free now.")
    usage: Usage = Field(description="Estimated tokens of the calls to pay for.")
    usd: float
    output_basis: str = Field(description="Where the output-token figure comes from.")

    @property
    def tokens(self) -> int:
        u = self.usage
        return u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens

    def line(self) -> str:
        return (f"estimate    {self.calls} calls to pay for ({self.cached} cached) · ~{self.tokens:,} tokens · "
                f"~${self.usd:.4f} (output {self.output_basis})")


def estimate_cost(
    rows: pa.Table,
    k: int,
    teacher_cfg: TeacherConfig,
    prices: Prices,
    *,
    system: Sequence[dict[str, Any]],
    cache: ResponseCache | None = None,
    batch: bool = False,
    output_fraction: float = UNREFERENCED_OUTPUT_FRACTION,
) -> CostEstimate:
    """Estimated cost of sampling ``rows`` ``k`` times each with ``teacher_cfg``.

    Input tokens: the system prompt (task, rules and few-shot examples, ``system``) and each
    row's input, at 4 characters a token; a system prompt long enough to be cached is billed as
    one cache write and then cache reads, a shorter one at the input price on every call.
    Output tokens: the row's reference output where it has one (capped at ``max_tokens``),
    else ``output_fraction`` of ``max_tokens``. Calls whose answer is in ``cache`` (keys as the
    fan-out builds them) cost nothing. ``batch``: at the Message Batches discount.
    """
    system_list = list(system)
    system_tokens = sum(len(b.get("text", "")) for b in system_list) // CHARS_PER_TOKEN
    cacheable = system_tokens >= PROMPT_CACHE_MIN_TOKENS
    unreferenced = int(output_fraction * teacher_cfg.max_tokens)
    calls = cached = referenced = 0
    inp = out = 0
    for row in rows.select(["input", "output"]).to_pylist():
        for j in range(k):
            if cache is not None:
                params = message_params(model=teacher_cfg.model, system=system_list, user_input=row["input"],
                                        max_tokens=teacher_cfg.max_tokens, temperature=teacher_cfg.temperature)
                if cache.get(request_key(params, j)) is not None:
                    cached += 1
                    continue
            calls += 1
            inp += _tokens(row["input"]) + (0 if cacheable else system_tokens)
            if row["output"]:
                referenced += 1
                out += min(_tokens(row["output"]), teacher_cfg.max_tokens)
            else:
                out += unreferenced
    writes = system_tokens if cacheable and calls else 0
    reads = system_tokens * (calls - 1) if cacheable and calls else 0
    usage = Usage(input_tokens=inp, output_tokens=out, cache_write_tokens=writes, cache_read_tokens=reads)
    if referenced == calls:
        basis = "from the references"
    elif referenced == 0:
        basis = f"at {output_fraction:.0%} of max_tokens"
    else:
        basis = f"from the references, {output_fraction:.0%} of max_tokens for {calls - referenced} calls without one"
    return CostEstimate(samples=rows.num_rows * k, calls=calls, cached=cached, usage=usage,
                        usd=round(cost_usd(usage, prices, batch=batch), 6), output_basis=basis)


@dataclass(frozen=True)
class BudgetDecision:
    ok: bool
    message: str


def check_budget(
    estimate: CostEstimate, spent: Spend, budget: TenantBudget | None, max_cost_usd: float | None,
    tenant: str | None = None,
) -> BudgetDecision:
    """May a run with this estimate start? Refused when the estimate alone passes the compile's
    ``max_cost_usd``, or the tenant's spend plus the estimate passes its budget in dollars or
    tokens. A run with nothing to pay for is always allowed."""
    who = f"tenant {tenant!r}" if tenant else "the tenant"
    if estimate.calls == 0:
        return BudgetDecision(True, "nothing to pay for: every answer is in the response cache")
    if max_cost_usd is not None and estimate.usd > max_cost_usd:
        return BudgetDecision(False, f"estimated cost ${estimate.usd:.4f} for {estimate.calls} calls passes "
                                     f"--max-cost ${max_cost_usd:.4f}; raise it, or sample fewer rows (--n) or "
                                     f"samples (--k)")
    if budget is not None and budget.usd is not None and spent.usd + estimate.usd > budget.usd:
        return BudgetDecision(False, f"{who} has spent ${spent.usd:.4f} of its ${budget.usd:.4f} teacher budget; "
                                     f"this run's estimated ${estimate.usd:.4f} would pass it "
                                     f"(the operator raises it with `kolm teacher-limits set --tenant ... --budget-usd`)")
    if budget is not None and budget.tokens is not None and spent.tokens + estimate.tokens > budget.tokens:
        return BudgetDecision(False, f"{who} has spent {spent.tokens:,} of its {budget.tokens:,} teacher tokens; "
                                     f"this run's estimated {estimate.tokens:,} would pass it "
                                     f"(the operator raises it with `kolm teacher-limits set --tenant ... "
                                     f"--budget-tokens`)")
    room = []
    if max_cost_usd is not None:
        room.append(f"--max-cost ${max_cost_usd:.4f}")
    if budget is not None and budget.usd is not None:
        room.append(f"{who} ${budget.usd - spent.usd:.4f} left")
    if budget is not None and budget.tokens is not None:
        room.append(f"{who} {budget.tokens - spent.tokens:,} tokens left")
    return BudgetDecision(True, "within " + ", ".join(room) if room else "no budget set")


@dataclass(frozen=True)
class BudgetCheck:
    """The estimate a run states before sampling, what the tenant has spent, and the decision."""

    estimate: CostEstimate
    spent: Spend
    budget: TenantBudget | None
    max_cost_usd: float | None
    decision: BudgetDecision

    def lines(self) -> list[str]:
        return [self.estimate.line(), f"budget      {'ok' if self.decision.ok else 'refused'}: {self.decision.message}"]


def budget_check(
    rows: pa.Table, k: int, teacher_cfg: TeacherConfig, prices: Prices, *, system: Sequence[dict[str, Any]],
    cache: ResponseCache | None, batch: bool, claim: QuotaConfig, budget: TenantBudget | None, spent: Spend,
) -> BudgetCheck:
    """``estimate_cost`` and ``check_budget`` for one run's claim, with the tenant's budget and
    spend as its quota actor keeps them (``TeacherQuota.tenant_view``)."""
    estimate = estimate_cost(rows, k, teacher_cfg, prices, system=system, cache=cache, batch=batch)
    decision = check_budget(estimate, spent, budget, claim.max_cost_usd, claim.tenant)
    return BudgetCheck(estimate=estimate, spent=spent, budget=budget, max_cost_usd=claim.max_cost_usd,
                       decision=decision)
