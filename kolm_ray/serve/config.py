"""Typed configuration of a serving application: which artifacts, whom to trust, how big.

One ``ServeConfig`` is what ``kolm serve`` builds from its flags and what a generated Serve
config file (``serve deploy``) carries as the application's arguments. Must not start Ray.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from kolm_ray.serve.audit import AuditOptions


class ModelDeploymentOptions(BaseModel):
    """One deployment per base model; every Specialist on that base shares its replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas: int = Field(1, ge=1, description="Replicas of each base model's deployment.")
    num_gpus: float = Field(0.0, ge=0, description="GPU share per replica (0.25 fits four on one GPU).")
    num_cpus: float = Field(1.0, ge=0, description="CPU cores per replica (torch uses this many threads).")
    max_batch_size: int = Field(8, ge=1, description="Requests generated together, across adapters.")
    batch_wait_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    # A replica works on up to this many requests; past max_queued_requests more wait in the
    # callers' queues, and past that they get 503: never an unbounded backlog.
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one replica holds at once.")
    max_queued_requests: int = Field(64, ge=0, description="Requests queued for a deployment before 503s.")
    dtype: str | None = Field(None, description="torch dtype of the base (bfloat16 on GPU, float32 on CPU).")
    # Off by default: a greedy request is decoded alone, so it gets exactly the tokens the
    # holdout eval got (the K the gate passed is the K served). On: greedy requests share padded
    # batches for throughput, and a row's tokens may change with its batch-mates at near-ties.
    batch_greedy: bool = Field(False, description="Batch greedy requests together: more throughput, no longer "
                               "bitwise what the holdout eval produced.")


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: int = 1
    artifacts: list[str] = Field(description="The .kolm files to host.")
    trust_key: str | None = Field(None, description="Public key (PEM) artifacts must be signed with.")
    trust_identity: str | None = Field(None, description="Sigstore identity artifacts must be signed by.")
    trust_issuer: str | None = Field(None, description="OIDC issuer of that identity.")
    # Named `store` before: configs written then (`--emit-config`, a RayService's serveConfigV2) still load.
    home: str = Field(validation_alias=AliasChoices("home", "store"),
                      description="kolm's home (KOLM_HOME): receipts go under receipts/APP/.")
    app_name: str = Field("kolm", pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Serve application name.")
    route_prefix: str = Field("/", description="Where the application's HTTP routes live.")
    base_paths: dict[str, str] = Field(default_factory=dict,
                                       description="Base model id or sha256 -> folder on the serving hosts.")
    model: ModelDeploymentOptions = ModelDeploymentOptions()
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress.")
    api_key_digests: dict[str, str] = Field(default_factory=dict,
                                            description="Key name -> SHA-256 of its bearer token; empty: no auth.")
    max_tokens_cap: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    max_input_chars: int = Field(32_000, ge=1, description="Longest input text a request may send.")
    # A request's one large part is its input (max_input_chars: 32,000 characters by default, at
    # most ~192 KB even as JSON \uXXXX escapes), but OpenAI clients resend the whole chat history
    # with every call and the Specialist reads only the last user message. 4 MiB leaves room for
    # long histories while bounding what one request makes Serve's HTTP proxy and the ingress hold
    # (both buffer a body as it arrives, until the ingress answers): a declared Content-Length over
    # it is refused before any of the body is read, a chunked body as soon as it passes it.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024,
                                description="Largest request body accepted, in bytes (413 past it).")
    receipts_flush_s: float = Field(0.5, gt=0, description="How often receipts are flushed to disk.")
    # A request waits in Serve's router until a model replica takes it: queued behind others, or
    # while Serve restarts a replica that died (minutes, forever if it crash-loops). Past this it
    # gets a 503 with Retry-After, which OpenAI's clients wait out and retry; the generation
    # itself, once a replica has the request, is not bounded by it.
    replica_wait_s: float = Field(30.0, gt=0, description="Longest wait for a model replica to take a request "
                                  "before a 503 (seconds).")
    audit: AuditOptions = Field(default_factory=AuditOptions, description="Audits of served calls against the teacher.")
    pins: dict[str, str] = Field(default_factory=dict, description="Specialist -> version a bare name resolves to.")
    routes: dict[str, dict] = Field(default_factory=dict, description="Specialist -> {stable, canary, weight}: "
                                    "the canary split a release sets (see kolm_ray.publish).")

    @model_validator(mode="after")
    def _trust_given(self) -> "ServeConfig":
        if not self.trust_key and not (self.trust_identity and self.trust_issuer):
            raise ValueError("serving needs a trust: trust_key, or trust_identity with trust_issuer")
        return self

    def trust(self):
        from kolm_ray.signing import Trust

        return Trust(public_key=Path(self.trust_key) if self.trust_key else None,
                     identity=self.trust_identity, issuer=self.trust_issuer)

    @property
    def receipts_dir(self) -> Path:
        return Path(self.home) / "receipts" / self.app_name


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
