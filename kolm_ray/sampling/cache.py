"""The teacher response cache: a paid answer is stored before it is used, so a re-run or a
resumed compile never pays for the same sample twice.

Keyed by ``request_key`` over everything that decides an answer (model, system prompt, messages,
temperature, max tokens, sample index). One JSON file per answer under the cache root
(``$KOLM_HOME/cache/teacher`` by default), written atomically; on a multi-node cluster put
``KOLM_HOME`` on shared storage so every node sees every answer. Must not call the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_FORMAT_VERSION = 1


def request_key(params: dict[str, Any], sample_index: int) -> str:
    """SHA-256 over the canonical JSON of the call's parameters and the sample index."""
    blob = json.dumps({"v": CACHE_FORMAT_VERSION, "params": params, "sample": sample_index}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if data.get("v") == CACHE_FORMAT_VERSION else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"v": CACHE_FORMAT_VERSION, **value}, f)
        os.replace(tmp, path)
