"""Provenance: what an artifact records of where it came from, and how that reads back.

At sign time ``package_versions`` notes the exact versions of the packages that made the
Specialist. The rest of its lineage is already in the manifest by then: the base (a hub base
pinned to its commit by ``train.base.pin_base``, or a local folder's content hash), the teacher
and the digest of its prompt (``sampling.prompt.prompt_digest``), the digests of the examples
and the holdout, and the parent version of a recompile (``artifact.parent_version``).
``lineage`` gathers those from a manifest of any readable format into one record for
``kolm inspect``; ``lineage_lines`` words it. Must not read anything but the manifest it is given.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Callable

# The packages whose versions decide what a compile computes: the fit (torch, transformers, peft,
# deepspeed), the cluster it ran on (ray), where a hub base came from (huggingface_hub), and kolm.
PACKAGES = ("kolm_ray", "torch", "transformers", "peft", "deepspeed", "ray", "huggingface_hub")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Each package's installed version in this process (the compile's driver), None where it is
    not installed (deepspeed is optional)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def parent_or_none(store: Any, name: str, version: tuple[int, int],
                   say: Callable[[str], None] = lambda line: None) -> str | None:
    """``artifact.parent_version``, or None with a note (``say``) when the store cannot be
    listed: the parent is lineage worth recording, not worth failing a compile that has paid
    its teacher and its fit (and holds a reserved version) for."""
    from kolm_ray.artifact import parent_version

    try:
        return parent_version(store, name, version)
    except Exception as e:  # noqa: BLE001 - a store's listing fails in its own types (OSError, botocore, ...)
        say(f"note        parent version not recorded: cannot list the store ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})")
        return None


def lineage(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the manifest says this Specialist was made from; a field an older format did not
    record is None (format 1: no packages, prompt digest or parent; a hub base not pinned)."""
    base = manifest.get("base") or {}
    teacher = manifest.get("teacher") or {}
    digests = manifest.get("digests") or {}
    hub = not base.get("sha256")
    return {
        "base": {"id": base.get("id"), "name": base.get("name"),
                 "revision": base.get("revision") if hub else None,
                 "requested": base.get("requested") if hub else None,
                 "sha256": base.get("sha256"),
                 "pinned": bool(base.get("sha256")) or _is_commit(base.get("revision"))},
        "teacher": {"model": teacher.get("model"), "prompt_sha256": teacher.get("prompt_sha256")},
        "examples_sha256": digests.get("examples"),
        "holdout_sha256": digests.get("holdout"),
        "parent": manifest.get("parent"),
        "packages": manifest.get("packages"),
    }


def lineage_lines(record: dict[str, Any], format_version: int | None = None) -> list[tuple[str, str]]:
    """``lineage``'s record as (label, text) rows, each saying what was not recorded and why."""
    old = f"not recorded (format {format_version})" if format_version == 1 else "not recorded"
    b, t = record["base"], record["teacher"]
    if b["sha256"]:
        base = f"{b['name']}  local folder, sha256 {b['sha256'][:16]}"
    elif b["pinned"]:
        asked = f" (pinned from {b['requested']})" if b.get("requested") else ""
        base = f"{b['id']}  commit {b['revision']}{asked}"
    else:
        base = f"{b['id']}  revision {b['revision'] or 'main'}, not pinned to a commit ({old})"
    packages = record["packages"]
    return [
        ("base", base),
        ("teacher", f"{t['model']}, prompt sha256 {_short(t['prompt_sha256'], old)}"),
        ("examples", f"sha256 {_short(record['examples_sha256'], old)}"),
        ("holdout", f"sha256 {_short(record['holdout_sha256'], old)}"),
        ("parent", record["parent"] or ("none (a first version)" if packages is not None else old)),
        ("packages", " · ".join(f"{k} {v or 'not installed'}" for k, v in packages.items()) if packages else old),
    ]


def _short(digest: str | None, missing: str) -> str:
    return digest[:16] if digest else missing


def _is_commit(revision: Any) -> bool:
    from kolm_ray.train.base import COMMIT

    return isinstance(revision, str) and bool(COMMIT.match(revision))
