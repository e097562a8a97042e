"""Writes that survive a crash: a reader sees the old file or the new one, never half of either.

``write_atomic`` writes a temp file beside the target, flushes and fsyncs it, renames it over the
target and fsyncs the folder, so the rename itself is on disk when the call returns (a record of
truth: a fit marker, a gate report, a release state). ``fsync=False`` keeps the atomic rename and
skips the two syncs for files rewritten often whose loss costs nothing (a quota actor's cache).
This module owns no format: callers bring the bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename or a create inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` at once. On any failure (ENOSPC included) the temp file is
    removed, the old file is untouched, and the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def json_bytes(data: Any) -> bytes:
    """The one JSON layout kolm writes to disk: indented, sorted keys, trailing newline."""
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()


def write_json(path: str | Path, data: Any, *, fsync: bool = True) -> None:
    """``json_bytes(data)`` written with ``write_atomic``."""
    write_atomic(path, json_bytes(data), fsync=fsync)
