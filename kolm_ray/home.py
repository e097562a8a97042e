"""Where kolm keeps its state: ``$KOLM_HOME`` (default ``~/.kolm``)."""

from __future__ import annotations

import os
from pathlib import Path


def kolm_home() -> Path:
    return Path(os.environ.get("KOLM_HOME") or Path.home() / ".kolm").expanduser()


def teacher_cache_dir() -> Path:
    return kolm_home() / "cache" / "teacher"
