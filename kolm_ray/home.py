"""Where kolm keeps its state: ``$KOLM_HOME`` (default ``~/.kolm``), in two parts.

* ``store_uri()``: ``KOLM_HOME`` as given, a folder or an object-storage URI
  (``s3://bucket/prefix``, ``gs://...``). What lives there may be in object storage: the teacher
  response cache (``cache/teacher``) and the artifacts (``artifacts/``).
* ``state_dir()``: a POSIX folder for what needs an exclusive lock, an atomic rename or private
  file modes: receipts, release state (``envs/``), signing keys (``keys/``), the batch journal.
  ``KOLM_HOME`` itself when it is a folder; else ``KOLM_STATE_DIR``; else ``~/.kolm``.

Must not create anything: callers create what they write.
"""

from __future__ import annotations

import os
from pathlib import Path

from kolm_ray.store import is_remote, join


def store_uri() -> str:
    """``KOLM_HOME``: a folder (``~`` expanded) or an object-storage URI, as given."""
    home = os.environ.get("KOLM_HOME") or str(Path.home() / ".kolm")
    return home if is_remote(home) else str(Path(home).expanduser())


def state_dir() -> Path:
    """The POSIX folder for receipts, release state, signing keys and the batch journal."""
    home = store_uri()
    if not is_remote(home):
        return Path(home)
    return Path(os.environ.get("KOLM_STATE_DIR") or Path.home() / ".kolm").expanduser()


def kolm_home() -> Path:
    """The POSIX part of ``KOLM_HOME``: ``state_dir()`` (the name callers used before stores)."""
    return state_dir()


def teacher_cache_dir() -> str:
    """The teacher response cache: ``KOLM_HOME/cache/teacher`` (a path or a URI)."""
    return join(store_uri(), "cache", "teacher")


def artifacts_uri() -> str:
    """Where ``kolm compile`` writes artifacts by default: ``KOLM_HOME/artifacts``."""
    return join(store_uri(), "artifacts")
