"""The teacher response cache: a paid answer is stored before it is used, so a re-run or a
resumed compile never pays for the same sample twice.

Keyed by ``request_key`` over everything that decides an answer (model, system prompt, messages,
temperature, max tokens, sample index). One JSON file per answer, ``KEY[:2]/KEY.json`` under the
cache root (``$KOLM_HOME/cache/teacher`` by default): a folder, or an object-storage prefix
(``s3://...``, through ``kolm_ray.store``), written atomically (temp + rename in a folder, an
object that appears whole in a bucket). On a multi-node cluster put ``KOLM_HOME`` on shared
storage or in a bucket so every node sees every answer. Must not call the teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kolm_ray.store import Store, open_store

CACHE_FORMAT_VERSION = 1


def request_key(params: dict[str, Any], sample_index: int) -> str:
    """SHA-256 over the canonical JSON of the call's parameters and the sample index."""
    blob = json.dumps({"v": CACHE_FORMAT_VERSION, "params": params, "sample": sample_index}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Paid answers by ``request_key``; the root is a folder, an ``s3://``/``gs://`` URI or a ``Store``."""

    def __init__(self, root: str | Path | Store):
        self.store = open_store(root)

    @staticmethod
    def _key(key: str) -> str:
        return f"{key[:2]}/{key}.json"  # the layout caches written before stores use: they still hit

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached answer, or None (none stored, or unreadable, or of another format version).

        Raises:
            KolmRuntimeError: the store itself failed (no credentials, unreachable).
        """
        try:
            data = json.loads(self.store.read_bytes(self._key(key)))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) and data.get("v") == CACHE_FORMAT_VERSION else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.store.write_bytes(self._key(key), json.dumps({"v": CACHE_FORMAT_VERSION, **value}).encode())
