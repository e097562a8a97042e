"""The teacher response cache: a paid answer is stored before it is used, so a re-run or a
resumed compile never pays for the same sample twice.

Keyed by ``request_key`` over everything that decides an answer (model, system prompt, messages,
temperature, max tokens, sample index) and scoped by the endpoint that answered it
(``ANTHROPIC_BASE_URL``, normalized by ``normalize_endpoint``; the Anthropic API when unset): an
answer recorded against one endpoint (a recorded teacher, a proxy) is never reused against
another. One JSON file per answer under the cache root (``$KOLM_HOME/cache/teacher`` by
default): ``KEY[:2]/KEY.json`` for the default endpoint (the layout every cache has used), and
``endpoints/<endpoint digest>/KEY[:2]/KEY.json`` for any other. The root is a folder, or an
object-storage prefix (``s3://...``, through ``kolm_ray.store``), written atomically (temp +
rename in a folder, an object that appears whole in a bucket). On a multi-node cluster put
``KOLM_HOME`` on shared storage or in a bucket so every node sees every answer. Must not call
the teacher.

Entries written before the cache was scoped name no endpoint. They sit in the default
endpoint's layout and are read there only, except those a recorded stand-in answered (their
model is ``recorded:...``), which are never taken for the live API's answers. They are never
read for another endpoint: which endpoint answered them is not known.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kolm_ray.sampling.prompt import RECORDED_MODEL_PREFIX
from kolm_ray.store import Store, open_store

CACHE_FORMAT_VERSION = 1
# What the SDK calls when ANTHROPIC_BASE_URL is unset.
DEFAULT_ENDPOINT = "https://api.anthropic.com"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def request_key(params: dict[str, Any], sample_index: int) -> str:
    """SHA-256 over the canonical JSON of the call's parameters and the sample index."""
    blob = json.dumps({"v": CACHE_FORMAT_VERSION, "params": params, "sample": sample_index}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def normalize_endpoint(url: str | None) -> str:
    """One spelling per endpoint: ``DEFAULT_ENDPOINT`` when unset; otherwise scheme and host in
    lower case, no default port, no credentials, no trailing slash, no query or fragment
    (``HTTPS://API.anthropic.com:443/`` is ``https://api.anthropic.com``)."""
    url = (url or "").strip()
    if not url:
        return DEFAULT_ENDPOINT
    parts = urlsplit(url if "://" in url else f"https://{url}")
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    # No user or password: one server is one endpoint, and no credential is written to the cache.
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))


def current_endpoint() -> str:
    """The endpoint this process's environment points the SDK at (normalized)."""
    return normalize_endpoint(os.environ.get("ANTHROPIC_BASE_URL"))


def endpoint_digest(endpoint: str) -> str:
    return hashlib.sha256(normalize_endpoint(endpoint).encode()).hexdigest()[:16]


class ResponseCache:
    """Paid answers by ``request_key``, for one endpoint; the root is a folder, an
    ``s3://``/``gs://`` URI or a ``Store``.

    ``endpoint``: the endpoint whose answers these are (default: ``ANTHROPIC_BASE_URL`` of this
    process's environment). A teacher scopes the cache it is given to where its client sends
    requests (``for_endpoint``).
    """

    def __init__(self, root: str | Path | Store, endpoint: str | None = None):
        self.store = open_store(root)
        self.endpoint = normalize_endpoint(endpoint) if endpoint is not None else current_endpoint()

    def for_endpoint(self, endpoint: str | None) -> "ResponseCache":
        """The same cache root, scoped to ``endpoint`` (None: the default endpoint)."""
        other = object.__new__(ResponseCache)
        other.store, other.endpoint = self.store, normalize_endpoint(endpoint)
        return other

    @property
    def default_endpoint(self) -> bool:
        return self.endpoint == DEFAULT_ENDPOINT

    def _key(self, key: str) -> str:
        if self.default_endpoint:
            return f"{key[:2]}/{key}.json"  # the layout caches written before endpoints use
        return f"endpoints/{endpoint_digest(self.endpoint)}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached answer, or None (none stored for this endpoint, unreadable, of another
        format version, or an unscoped entry this endpoint may not take: see the module).

        Raises:
            KolmRuntimeError: the store itself failed (no credentials, unreachable).
        """
        try:
            data = json.loads(self.store.read_bytes(self._key(key)))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or data.get("v") != CACHE_FORMAT_VERSION:
            return None
        recorded_for = data.get("endpoint")
        if recorded_for is not None:
            return data if normalize_endpoint(recorded_for) == self.endpoint else None
        # Written before entries named their endpoint: only here, and never a recorded answer.
        if str(data.get("model") or "").startswith(RECORDED_MODEL_PREFIX):
            return None
        return data

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.store.write_bytes(self._key(key), json.dumps(
            {"v": CACHE_FORMAT_VERSION, **value, "endpoint": self.endpoint}).encode())
