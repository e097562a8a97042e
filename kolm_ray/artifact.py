"""The ``.kolm`` artifact: one signed file per Specialist version.

Pipeline: ``stage_specialist`` lays out the content folder -> ``kolm_ray.signing`` hashes every
file into a manifest and signs it (OpenSSF model-signing over sigstore) -> ``pack`` writes one
uncompressed tar ``NAME-MAJOR.MINOR.kolm`` atomically -> ``open_verified`` unpacks into a
temporary folder, refuses unexpected entries, and verifies the signature before anything is
read.

Layout inside the tar::

    specialist/manifest.json     what this Specialist is (format_version, name, version, base, ...)
    specialist/adapter/          the LoRA adapter, standard PEFT format
    specialist/verifier.json     the verifier that scored it (and will score live traffic)
    specialist/eval.json         holdout outputs and scores, student and base side by side
    specialist/train.json        fit config, loss curve, timings
    specialist.sig               the signature bundle over every file in specialist/
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

from kolm_ray.errors import InputError

ARTIFACT_FORMAT_VERSION = 1
CONTENT_DIR = "specialist"
SIGNATURE = "specialist.sig"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_FILE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9-]*)-(?P<major>\d+)\.(?P<minor>\d+)\.kolm$")


def check_name(name: str) -> str:
    """Raises: InputError for a name that is not lower-case letters, digits and dashes."""
    if not _NAME.match(name):
        raise InputError(f"invalid Specialist name {name!r}: use lower-case letters, digits and dashes (max 63)")
    return name


def next_version(store: Path, name: str) -> tuple[int, int]:
    """1.0 for a new name, else the highest MAJOR.MINOR in ``store`` with MINOR + 1."""
    found = [
        (int(m["major"]), int(m["minor"]))
        for p in (store.iterdir() if store.is_dir() else [])
        if (m := _FILE.match(p.name)) and m["name"] == name
    ]
    if not found:
        return (1, 0)
    major, minor = max(found)
    return (major, minor + 1)


def artifact_path(store: Path, name: str, version: tuple[int, int]) -> Path:
    return store / f"{name}-{version[0]}.{version[1]}.kolm"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def pack(content: Path, signature: Path, dest: Path) -> Path:
    """Write ``dest`` (a tar of ``content`` as specialist/ and the signature) atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(content.rglob("*")):
                if path.is_file():
                    _add(tar, path, f"{CONTENT_DIR}/{path.relative_to(content).as_posix()}")
            _add(tar, signature, SIGNATURE)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    # Fixed metadata: the same content always packs to the same bytes.
    info = tarfile.TarInfo(arcname)
    info.size = path.stat().st_size
    info.mode = 0o644
    info.mtime = 0
    with path.open("rb") as f:
        tar.addfile(info, f)


@contextlib.contextmanager
def unpacked(artifact: str | Path) -> Iterator[Path]:
    """Unpack into a temporary folder (removed afterwards). Does NOT verify: see ``open_verified``.

    Raises:
        InputError: not a readable .kolm file, or an entry outside specialist/ and its signature.
    """
    p = Path(artifact)
    if not p.is_file():
        raise InputError("artifact not found", path=str(p))
    tmp = Path(tempfile.mkdtemp(prefix="kolm-art-"))
    try:
        try:
            with tarfile.open(p, mode="r:") as tar:
                for m in tar.getmembers():
                    name = m.name
                    if not (name == SIGNATURE or name.startswith(f"{CONTENT_DIR}/")) or not (m.isfile() or m.isdir()):
                        raise InputError(f"unexpected entry {name!r} in artifact: refusing it", path=str(p))
                    # model-signing skips .git* paths when hashing, so such a file would ride along
                    # unsigned: refuse every dot-file outright.
                    if any(part.startswith(".") for part in name.split("/")):
                        raise InputError(f"unexpected hidden entry {name!r} in artifact: refusing it", path=str(p))
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InputError(f"not a readable .kolm artifact ({e})", path=str(p)) from None
        if not (tmp / SIGNATURE).is_file() or not (tmp / CONTENT_DIR / "manifest.json").is_file():
            raise InputError("artifact is missing its signature or manifest", path=str(p))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(root: Path) -> dict[str, Any]:
    data = json.loads((root / CONTENT_DIR / "manifest.json").read_text())
    if data.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise InputError(f"artifact format_version {data.get('format_version')!r} is not supported")
    return data


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def open_verified(artifact: str | Path, trust: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Unpack, verify the signature under ``trust`` (a ``signing.Trust``), then yield the
    content folder and its manifest. Nothing inside is read before the signature checks out.

    Raises:
        InputError: unreadable or malformed artifact.
        ArtifactRejected: a changed, added or removed file, or a different signer.
    """
    from kolm_ray.signing import verify_signature

    with unpacked(artifact) as root:
        verify_signature(root / CONTENT_DIR, root / SIGNATURE, trust)
        yield root / CONTENT_DIR, read_manifest(root)
