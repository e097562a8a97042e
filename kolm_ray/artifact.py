"""The ``.kolm`` artifact: one signed file per Specialist version.

Pipeline: ``stage_specialist`` lays out the content folder -> ``kolm_ray.signing`` hashes every
file into a manifest and signs it (OpenSSF model-signing over sigstore) -> ``pack`` writes one
uncompressed tar ``NAME-MAJOR.MINOR.kolm`` atomically -> ``open_verified`` unpacks into a
temporary folder, refuses unexpected entries, and verifies the signature before anything is
read.

In a store (a folder or an object-storage prefix, ``kolm_ray.store``) a version is allocated
atomically: ``reserve_version`` takes ``.reserved/NAME-X.Y`` by create-if-absent (the next minor
on a conflict), and ``put_artifact`` writes ``NAME-X.Y.kolm`` by create-if-absent too, so two
compiles of one name never get one version and an existing artifact is never overwritten.
``unpacked`` / ``open_verified`` also take an ``s3://`` or ``gs://`` artifact (downloaded first).

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
import socket
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from kolm_ray.durable import json_bytes
from kolm_ray.errors import InputError, KolmRuntimeError
from kolm_ray.store import Store, fetched, open_store

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
    """1.0 for a new name, else the highest MAJOR.MINOR in ``store`` with MINOR + 1.

    A peek, not an allocation: two compiles can get the same answer. ``reserve_version`` allocates.
    """
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
    return store / artifact_name(name, version)


def artifact_name(name: str, version: tuple[int, int]) -> str:
    return f"{name}-{version[0]}.{version[1]}.kolm"




# ----- versions in a store -----------------------------------------------------------------------

RESERVED = ".reserved"  # NAME-X.Y markers: a version handed out, whether or not its artifact exists


def _versions_taken(store: Store, name: str) -> set[tuple[int, int]]:
    files = store.list("", recursive=False)
    files += [key.rpartition("/")[2] + ".kolm" for key in store.list(RESERVED, recursive=False)]
    return {(int(m["major"]), int(m["minor"])) for f in files if (m := _FILE.match(f)) and m["name"] == name}


def reserve_version(store: str | Path | Store, name: str, *, max_tries: int = 1000) -> tuple[int, int]:
    """Allocate the next version of ``name`` in ``store`` (a folder or an object-storage URI):
    1.0 for a new name, else the highest MAJOR.MINOR among its artifacts and reservations with
    MINOR + 1. The version is taken by creating ``.reserved/NAME-X.Y`` if absent; when another
    compile got there first, the next minor is tried. A version once reserved is never handed out
    again (a compile that dies leaves a gap), except by ``release_version``.

    Raises:
        InputError: an invalid name, or a store without create-if-absent (``gs://``).
        KolmRuntimeError: ``max_tries`` versions in a row were taken by others.
    """
    check_name(name)
    s = open_store(store)
    taken = _versions_taken(s, name)
    major, minor = max(taken) if taken else (1, -1)
    marker = json_bytes({"reserved_at": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    for _ in range(max_tries):
        minor += 1
        version = (major, minor)
        if s.exists(artifact_name(name, version)):  # put there without a reservation (a copy by hand)
            continue
        if not s.put_if_absent(_reservation(name, version), marker):
            continue  # another compile holds it
        if s.exists(artifact_name(name, version)):  # appeared since the check: keep the marker, move on
            continue
        return version
    raise KolmRuntimeError(f"could not reserve a version of {name!r} in {s.uri} after {max_tries} tries")


def release_version(store: str | Path | Store, name: str, version: tuple[int, int]) -> bool:
    """Give back a reserved version whose artifact was never written (a compile below its gate),
    so the next compile gets it. True if released; an existing artifact keeps its reservation."""
    s = open_store(store)
    if s.exists(artifact_name(name, version)):
        return False
    s.delete(_reservation(name, version))
    return True


def put_artifact(store: str | Path | Store, packed: Path, name: str, version: tuple[int, int]) -> str:
    """Write the packed artifact ``packed`` as ``NAME-X.Y.kolm`` in ``store``, create-if-absent,
    and return its location (a path or a URI). It appears whole or not at all.

    Raises:
        KolmRuntimeError: ``NAME-X.Y.kolm`` already exists there: it is never overwritten.
    """
    s = open_store(store)
    key = artifact_name(name, version)
    if not s.put_if_absent(key, packed):
        raise KolmRuntimeError(f"{s.url(key)} already exists: an artifact is never overwritten "
                               f"(was version {version[0]}.{version[1]} reserved with reserve_version?)")
    return s.url(key)


def _reservation(name: str, version: tuple[int, int]) -> str:
    return f"{RESERVED}/{name}-{version[0]}.{version[1]}"


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
    ``artifact`` is a path or an ``s3://`` / ``gs://`` URI (downloaded first).

    Raises:
        InputError: not a readable .kolm file, or an entry outside specialist/ and its signature.
    """
    with fetched(artifact) as local, _unpacked(local, str(artifact)) as root:
        yield root


@contextlib.contextmanager
def _unpacked(p: Path, label: str) -> Iterator[Path]:
    if not p.is_file():
        raise InputError("artifact not found", path=label)
    tmp = Path(tempfile.mkdtemp(prefix="kolm-art-"))
    try:
        try:
            with tarfile.open(p, mode="r:") as tar:
                for m in tar.getmembers():
                    name = m.name
                    if not (name == SIGNATURE or name.startswith(f"{CONTENT_DIR}/")) or not (m.isfile() or m.isdir()):
                        raise InputError(f"unexpected entry {name!r} in artifact: refusing it", path=label)
                    # model-signing skips .git* paths when hashing, so such a file would ride along
                    # unsigned: refuse every dot-file outright.
                    if any(part.startswith(".") for part in name.split("/")):
                        raise InputError(f"unexpected hidden entry {name!r} in artifact: refusing it", path=label)
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            why = " ".join(str(e).split())
            raise InputError(f"not a readable .kolm artifact ({why}): a .kolm file is what `kolm compile` signs",
                             path=label) from None
        if not (tmp / SIGNATURE).is_file() or not (tmp / CONTENT_DIR / "manifest.json").is_file():
            raise InputError("artifact is missing its signature or manifest", path=label)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(root: Path) -> dict[str, Any]:
    """Raises: InputError for a manifest that is not JSON or of another format version."""
    try:
        data = json.loads((root / CONTENT_DIR / "manifest.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"the artifact's {CONTENT_DIR}/manifest.json is not JSON ({e})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != ARTIFACT_FORMAT_VERSION:
        raise InputError(f"artifact format_version {version!r} is not supported")
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
    with open_verified_with_digest(artifact, trust) as (content, manifest, _):
        yield content, manifest


@contextlib.contextmanager
def open_verified_with_digest(artifact: str | Path, trust: Any) -> Iterator[tuple[Path, dict[str, Any], str]]:
    """``open_verified``, also yielding the SHA-256 of the very bytes that were verified (an
    object is downloaded once, so what is digested is what was verified).

    Raises:
        InputError: unreadable or malformed artifact.
        ArtifactRejected: a changed, added or removed file, or a different signer.
    """
    from kolm_ray.signing import ArtifactRejected, verify_signature

    with fetched(artifact) as local, _unpacked(local, str(artifact)) as root:
        digest = file_digest(local)
        try:
            verify_signature(root / CONTENT_DIR, root / SIGNATURE, trust)
        except ArtifactRejected as e:  # name the artifact: a compare or a serve reads several
            raise ArtifactRejected(f"{artifact}: {e}") from None
        yield root / CONTENT_DIR, read_manifest(root), digest


def read_verified_text(artifact: str | Path, trust: Any, name: str) -> tuple[str, dict[str, Any]]:
    """The text of ``specialist/NAME`` in ``artifact`` (e.g. ``verifier.json``), read only after
    the signature verifies under ``trust``; and the manifest.

    Raises:
        InputError: unreadable artifact, or no such UTF-8 file in it.
        ArtifactRejected: a changed, added or removed file, or a different signer.
    """
    with open_verified(artifact, trust) as (content, manifest):
        path = content / name
        if not path.is_file():
            raise InputError(f"artifact has no {CONTENT_DIR}/{name}", path=str(artifact))
        try:
            return path.read_text(encoding="utf-8"), manifest
        except UnicodeDecodeError:
            raise InputError(f"{CONTENT_DIR}/{name} in the artifact is not UTF-8 text", path=str(artifact)) from None
