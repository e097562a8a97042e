"""A fit's checkpoints on disk: what each one holds, whether it can be loaded, and which one a
re-run resumes from.

Every checkpoint folder (``step-NNNNNN`` under the run's storage, ``STORAGE/RUN_NAME/``) holds,
beside the DeepSpeed engine state, the adapter and ``state.json``, one manifest per worker rank
(``kolm-manifest.rank-RRRRR.json``): the size and SHA-256 of every file that rank wrote, the
step, and how many ranks saved it. A checkpoint is usable only when every rank's manifest is
there and every file matches it (``check``); one cut off while being saved, truncated or
zeroed on disk, or saved before checkpoints carried manifests, is not.

Ray Train resumes from the latest checkpoint of its run snapshot (``ray.train.get_checkpoint()``),
whatever that folder now holds. So before a fit starts, the driver checks the run's checkpoints
newest first and picks the newest usable one (``choose``, pure given the checks); the unusable
ones newer than it are deleted, and Ray's snapshot with them when it names a checkpoint that is
gone or cannot be read (Ray refuses to start from such a snapshot), so Ray never hands the
workers garbage; the chosen one is handed to the workers by path (``prepare_resume``).

Must not import torch or DeepSpeed: the driver runs this before any worker exists.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

MANIFEST_FORMAT = 1
MANIFEST_PREFIX = "kolm-manifest.rank-"
# Ray Train v2's record of the run's reported checkpoints, in the run's folder (ray 2.60).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
_STEP = re.compile(r"step-(\d+)")
_CHUNK = 8 << 20


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder named ``step-NNNNNN``; None for any other name."""
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank:05d}.json"


def _sha256(read: Callable[[int], bytes]) -> str:
    h = hashlib.sha256()
    while chunk := read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path, *, step: int, rank: int, world: int) -> dict[str, Any]:
    """Describe every file in ``folder`` (what this rank saved) in its rank's manifest, written
    last. Returns the manifest."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith(MANIFEST_PREFIX):
            with p.open("rb") as f:
                files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(f.read)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "rank": rank, "world": world, "files": files}
    (folder / manifest_name(rank)).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _fs(fs: Any):
    import pyarrow.fs as pafs

    return fs if fs is not None else pafs.LocalFileSystem()


def check(fs: Any, path: str, *, step: int | None = None, world: int | None = None) -> str | None:
    """None when the checkpoint at ``path`` (on the pyarrow filesystem ``fs``; None: local)
    can be loaded: every rank's manifest present and of ``step`` and ``world`` (when given),
    every file it lists there with its size and SHA-256. Otherwise why not, in a few words.
    Sizes are compared for every file before any is hashed."""
    import pyarrow.fs as pafs

    fs = _fs(fs)
    path = path.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as e:
        return f"cannot be listed: {e}"
    sizes = {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}
    if not sizes:
        return "empty"
    if manifest_name(0) not in sizes:
        return "no manifest: cut off while being saved, or saved before checkpoints carried one"

    def manifest(rank: int) -> dict[str, Any] | str:
        name = manifest_name(rank)
        if name not in sizes:
            return f"the manifest of rank {rank} is missing"
        try:
            with fs.open_input_stream(f"{path}/{name}") as f:
                m = json.loads(f.read())
            assert isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT and isinstance(m.get("files"), dict)
            return m
        except (OSError, ValueError, AssertionError):
            return f"the manifest of rank {rank} is unreadable"

    first = manifest(0)
    if isinstance(first, str):
        return first
    saved_by = first.get("world")
    if not isinstance(saved_by, int) or saved_by < 1:
        return "the manifest of rank 0 is unreadable"
    if world is not None and saved_by != world:
        return f"saved by {saved_by} worker(s), this fit has {world}"
    if step is not None and first.get("step") != step:
        return f"its manifest is of step {first.get('step')}"
    listed: dict[str, dict[str, Any]] = {}
    for rank in range(saved_by):
        m = first if rank == 0 else manifest(rank)
        if isinstance(m, str):
            return m
        if m.get("step") != first.get("step") or m.get("world") != saved_by:
            return f"the manifest of rank {rank} is of another save"
        listed.update(m["files"])
    if not all(isinstance(w, dict) and isinstance(w.get("size"), int) and isinstance(w.get("sha256"), str)
               for w in listed.values()):
        return "a manifest lists a file without its size and SHA-256"
    for rel, want in listed.items():
        have = sizes.get(rel)
        if have is None:
            return f"{rel}: missing"
        if have != want.get("size"):
            return f"{rel}: {have:,} bytes, its manifest says {want.get('size'):,}"
    for rel, want in listed.items():
        try:
            with fs.open_input_stream(f"{path}/{rel}") as f:
                digest = _sha256(f.read)
        except OSError as e:
            return f"{rel}: cannot be read ({e})"
        if digest != want.get("sha256"):
            return f"{rel}: its content does not match its manifest (SHA-256)"
    return None


@dataclass(frozen=True)
class Resume:
    """Where a fit starts: the newest usable checkpoint (``name`` None: step 0), and the newer
    ones that could not be used, newest first, each with why."""

    name: str | None
    step: int
    unusable: tuple[tuple[str, str], ...] = ()

    def line(self) -> str | None:
        """What the fit says before it starts; None for a fresh fit with nothing to report."""
        if not self.unusable:
            return f"resuming from checkpoint {self.name}" if self.name else None
        if len(self.unusable) == 1:
            (name, why), = self.unusable
            bad = f"checkpoint {name} is unreadable ({why})"
        else:
            bad = "checkpoints " + ", ".join(f"{n} ({why})" for n, why in self.unusable) + " are unreadable"
        then = f"resuming from {self.name}" if self.name else "no usable checkpoint: the fit starts over from step 0"
        return f"{bad}; {then}"


def choose(names: Iterable[str], usable: Callable[[str], str | None]) -> Resume:
    """The checkpoint to resume from among the folders ``names`` (those not named
    ``step-NNNNNN`` are ignored): the one of the highest step whose check passes. ``usable(name)``
    is None for a usable checkpoint, else why not; it is asked newest first and not at all
    for checkpoints older than the one chosen."""
    found = sorted(((s, n) for n in set(names) if (s := step_of(n)) is not None), reverse=True)
    unusable: list[tuple[str, str]] = []
    for step, name in found:
        try:
            why = usable(name)
        except Exception as e:  # noqa: BLE001 - a check that trips on a damaged checkpoint rules it out, it never wedges the fit
            why = f"cannot be checked ({type(e).__name__}: {e})"
        if why is None:
            return Resume(name=name, step=step, unusable=tuple(unusable))
        unusable.append((name, why))
    return Resume(name=None, step=0, unusable=tuple(unusable))


def _named_checkpoints(data: Any) -> set[str]:
    """Every ``checkpoint_dir_name`` in Ray's snapshot, wherever it sits in the JSON."""
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            if k == "checkpoint_dir_name" and isinstance(v, str):
                out.add(v)
            else:
                out |= _named_checkpoints(v)
    elif isinstance(data, list):
        for v in data:
            out |= _named_checkpoints(v)
    return out


def _set_aside(fs: Any, src: str, dest: str) -> None:
    """Rename a checkpoint folder; object stores that cannot rename a folder (S3) get a copy, then
    the original removed."""
    import pyarrow.fs as pafs

    try:
        fs.move(src, dest)
    except (OSError, NotImplementedError):
        pafs.copy_files(src, dest, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)


def prepare_resume(fs: Any, run_dir: str, *, world: int | None = None) -> tuple[Resume, list[str]]:
    """Choose the checkpoint a fit at ``run_dir`` (on ``fs``; None: local) resumes from, and
    clear the way to it: move the unusable checkpoints newer than it aside (renamed
    ``step-NNNNNN.unusable-T``, which no later save of that step can merge into and which is kept
    for whoever wants to look: one saved by an older kolm without a manifest, say), and Ray's snapshot
    when it is unreadable or names a checkpoint that is gone (Ray then starts its list afresh
    and the workers load the chosen checkpoint by path). Returns the choice and the lines to
    say about it."""
    import pyarrow.fs as pafs

    fs = _fs(fs)
    run_dir = run_dir.rstrip("/")
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return Resume(name=None, step=0), []
    entries = fs.get_file_info(pafs.FileSelector(run_dir, recursive=False))
    folders = {e.base_name for e in entries if e.type == pafs.FileType.Directory}
    resume = choose(folders, lambda n: check(fs, f"{run_dir}/{n}", step=step_of(n), world=world))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name, _ in resume.unusable:
        _set_aside(fs, f"{run_dir}/{name}", f"{run_dir}/{name}.unusable-{stamp}")
        folders.discard(name)
    lines = [line] if (line := resume.line()) else []
    if resume.unusable:
        lines.append(f"the unusable checkpoint(s) are kept aside as "
                     f"{', '.join(f'{n}.unusable-{stamp}' for n, _ in resume.unusable)} under {run_dir} "
                     "(delete them when no longer wanted)")
    snapshot = f"{run_dir}/{RAY_SNAPSHOT}"
    if fs.get_file_info(snapshot).type == pafs.FileType.File:
        try:
            with fs.open_input_stream(snapshot) as f:
                gone = _named_checkpoints(json.loads(f.read())) - folders
            problem = None if not gone else ("" if gone <= {n for n, _ in resume.unusable} else
                                             f"names {', '.join(sorted(gone))}, which is gone")
        except (OSError, ValueError) as e:
            problem = f"unreadable: {type(e).__name__}"
        if problem is not None:
            fs.delete_file(snapshot)
            if problem:  # the deleted unusable checkpoints were said already
                lines.append(f"Ray's list of this run's checkpoints ({RAY_SNAPSHOT}) {problem}: removed; "
                             f"{'resuming from ' + resume.name if resume.name else 'the fit starts from step 0'}")
    return resume, lines
