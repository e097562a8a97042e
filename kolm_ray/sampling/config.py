"""Typed configs of the sampling stage; the CLI's flags map onto these fields."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class TeacherConfig(BaseModel):
    """How one teacher call is made. The SDK itself reads ANTHROPIC_API_KEY (or
    ANTHROPIC_AUTH_TOKEN) and ANTHROPIC_BASE_URL.

    The retry defaults ride out a provider outage (529 overloaded, 5xx, unreachable) of about
    four minutes: 10 attempts, waits of 1, 2, 4, 8, 16 and 32 s and then 60 s (243 s in all, each
    wait spread up to half again by jitter) before a sample counts as failed. A compile that
    died in the first minute of a provider's brown-out would cost its user a re-run, and a
    nightly job its night; a teacher down for longer fails the stage, and every answer received
    is cached for the re-run. (``max_attempts`` is operational: changing it changes no
    compile's recipe.)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field("claude-opus-4-7", description="Teacher model id.")
    max_tokens: int = Field(1024, ge=1, le=64000, description="Most output tokens per sample.")
    # None: the model's own default, which samples (k samples must differ for best-of-k to
    # choose among anything). Current SDKs have no parameter for it; it goes in extra_body.
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="Sampling temperature (default: the model's).")
    timeout_s: float = Field(120.0, gt=0, description="Seconds before one call is abandoned and retried.")
    max_attempts: int = Field(10, ge=1, description="Attempts per sample before it counts as failed.")
    backoff_base_s: float = Field(1.0, ge=0, description="First retry wait without retry-after; doubles per attempt.")
    backoff_max_s: float = Field(60.0, ge=0, description="Longest wait between attempts without retry-after.")
    few_shot: int = Field(4, ge=0, description="Labeled rows shown to the teacher as examples.")


class QuotaConfig(BaseModel):
    """One compile's claim on the organization's shared teacher quota.

    The organization's limits are the operator's (``kolm teacher-limits set``, a file in kolm's
    state dir), never a compile's: these caps only narrow this holder's share, min(org, cap).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    holder: str | None = Field(
        None, description="Compile or run id holding the calls (default: one made per run); its slots "
                          "are freed together when it ends or is cancelled.")
    tenant: str | None = Field(None, description="Tenant whose teacher budget pays for the calls.")
    # None: no cap of this compile's own; the operator's limits (and the limiter's adaptation
    # to 429s) still apply.
    max_in_flight: int | None = Field(
        None, ge=1, description="Most teacher calls this compile keeps in flight (under the organization's limit).")
    calls_per_minute: int | None = Field(
        None, ge=1, description="Most teacher calls this compile starts per minute (under the organization's limit).")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Most input+output tokens this compile sends per minute (under the organization's limit).")
    max_cost_usd: float | None = Field(
        None, ge=0, description="Refuse to start when the estimated cost of the uncached calls passes this, "
                                "and stop paying once this compile has spent it (US dollars).")


class SampleConfig(BaseModel):
    """The fan-out: how many samples, how wide, and when the stage gives up."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Named for what it counts: "k" alone is also the K-score. `k` still reads (older configs, `--k`).
    samples_per_input: int = Field(4, ge=1, le=64, validation_alias=AliasChoices("samples_per_input", "k"),
                                   description="Teacher samples per input row.")
    n: int | None = Field(None, ge=1, description="Use only the first N rows.")
    concurrency: int = Field(64, ge=1, description="Calls in flight from this compile (the quota may allow fewer).")
    actors: int = Field(2, ge=1, description="Ray Data async actors making the calls.")
    # 5%: a handful of rows lost to an outage is fine for distillation; more means a broken run.
    max_failed_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Fail the stage past this share of failed rows.")
    # 0.5: the chosen answer is backed by at least half of the row's samples (2 of 4); below
    # that it won a plurality or a tie-break, and the teacher is unsure of the row.
    min_agreement: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Share of a row's samples that should agree with the chosen one; rows below it are flagged.",
    )
    batch: bool = Field(False, description="Use the Message Batches API (half price, slower).")
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between polls of a submitted batch.")
    batch_max_requests: int = Field(10_000, ge=1, le=100_000, description="Requests per submitted batch.")
