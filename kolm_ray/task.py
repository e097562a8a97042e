"""The task instruction as the user gives it: inline text or the path of a UTF-8 file. Light
(no Ray, no pyarrow), so the CLI reads it before anything heavy loads; the compile config reads
it the same way."""

from __future__ import annotations

from pathlib import Path

from kolm_ray.errors import InputError

GIVE_IT = "give the task instruction as TASK or --task-file F"


def read_task(task: str | None, task_file: str | Path | None, *, missing: str = GIVE_IT) -> str:
    """``task``, or the text of ``task_file``, stripped.

    Raises:
        InputError: the file is missing or not UTF-8 (naming it), or no instruction was given
            (``missing`` says how to give one).
    """
    if task_file:
        p = Path(task_file)
        if not p.is_file():
            raise InputError("task file not found", path=str(task_file))
        try:
            task = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"task file is not UTF-8 text ({e.reason} at byte {e.start})", path=str(task_file)) from None
    if not task or not task.strip():
        raise InputError(missing)
    return task.strip()
