"""The ``.kolm`` artifact: one signed file per Specialist version.

Pipeline: ``stage_specialist`` lays out the content folder -> ``kolm_ray.signing`` hashes every
file into a manifest and signs it (OpenSSF model-signing over sigstore) -> ``pack`` writes one
uncompressed tar ``NAME-MAJOR.MINOR.kolm`` atomically -> ``open_verified`` reads the file once
into a private copy (hashing it on the way: the digest it reports is of the bytes it verified),
checks every tar header before it writes anything (only regular files under specialist/ and the
signature; at most ``MAX_MEMBERS`` entries and ``MAX_UNPACKED_BYTES``), unpacks into a temporary
folder, and verifies the signature before anything inside is read.

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
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from kolm_ray.durable import json_bytes
from kolm_ray.errors import InputError, KolmError, KolmRuntimeError
from kolm_ray.store import Store, fetched, is_remote, open_store

# 2: the manifest records provenance: a hub base's commit (``base.revision``, and the branch
#    asked for as ``base.requested``), ``packages``, ``teacher.prompt_sha256`` and ``parent``.
#    Format 1 artifacts (a hub base recorded as ``revision: main``) are still read.
ARTIFACT_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
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


def parent_version(store: str | Path | Store, name: str, version: tuple[int, int]) -> str | None:
    """The version a compile of ``name`` as ``version`` follows: the highest ``MAJOR.MINOR``
    below it whose artifact is in ``store`` (a reservation without one does not count); None
    for the first compile of a name."""
    s = open_store(store)
    found = [(int(m["major"]), int(m["minor"])) for f in s.list("", recursive=False)
             if (m := _FILE.match(f)) and m["name"] == name]
    below = [v for v in found if v < version]
    return f"{max(below)[0]}.{max(below)[1]}" if below else None


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
    and return its location (a path or a URI). It appears whole or not at all; when it cannot be
    written, its reservation is released too, so nothing of this version is left.

    Raises:
        KolmRuntimeError: ``NAME-X.Y.kolm`` already exists there: it is never overwritten; or the
            store refused the write (a full disk: the message names the path).
    """
    s = open_store(store)
    key = artifact_name(name, version)
    try:
        created = s.put_if_absent(key, packed)
    except KolmRuntimeError as e:  # a full disk, a refused write: put_if_absent left no part of it
        with contextlib.suppress(KolmError, OSError):  # the re-run takes the version again
            release_version(s, name, version)
        raise KolmRuntimeError(f"could not write the artifact: {e}; nothing of it is left in the store "
                               f"(version {version[0]}.{version[1]} was given back)") from None
    if not created:
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


# ----- unpacking, bounded ------------------------------------------------------------------------

# An artifact is unpacked before its signature can be checked (model-signing hashes a folder), so
# what an unverified tar may make this host write is bounded from its headers, before any write.
# A real artifact holds a PEFT adapter (adapter_model.safetensors, adapter_config.json, a README)
# and four JSON files: about ten entries. 1,000 leaves a hundredfold margin (a sharded adapter,
# tokenizer files) and bounds the files an unverified artifact can create and make us hash.
MAX_MEMBERS = 1_000
# The adapter of a 3B-8B base is tens to hundreds of MB: rank 64 on every linear layer of an 8B
# model is about 0.7 GB in fp32, rank 256 about 2.7 GB. 4 GiB holds that with its JSON files and
# bounds the temporary disk an unverified artifact can fill.
MAX_UNPACKED_BYTES = 4 << 30
# Tar's own bytes around each entry (a header block, a PAX header and its data, the padding to
# a block) and at the end (two zero blocks, padded to a 10 KiB record): what a file within the
# limits may weigh beyond what it unpacks to.
_TAR_OVERHEAD = 4 * tarfile.BLOCKSIZE
_TAR_END = 2 * tarfile.RECORDSIZE


@dataclass(frozen=True)
class UnpackLimits:
    """What one artifact may unpack to; checked from its tar headers before anything is written."""

    max_members: int = MAX_MEMBERS
    max_bytes: int = MAX_UNPACKED_BYTES

    def max_file_bytes(self) -> int:
        """The largest .kolm file that can stay within these limits."""
        return self.max_bytes + (self.max_members + 1) * _TAR_OVERHEAD + _TAR_END


def check_within_limits(content: Path, limits: UnpackLimits = UnpackLimits()) -> None:
    """Refuse, before signing, a Specialist that every reader would refuse to unpack (a very high
    LoRA rank on a very large base): better one clear failure at compile time than an artifact
    that signs and then cannot be served, compared or published.

    Raises:
        KolmRuntimeError: more files or more bytes under ``content`` than ``limits`` allow.
    """
    files = [f for f in content.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    if len(files) + 1 > limits.max_members or total > limits.max_bytes:
        raise KolmRuntimeError(
            f"the Specialist would be {len(files)} files and {total:,} bytes, past what an artifact may unpack to "
            f"({limits.max_members:,} entries, {limits.max_bytes:,} bytes), so no reader would open it: "
            "lower --lora-r or target fewer modules")


@contextlib.contextmanager
def unpacked(artifact: str | Path, limits: UnpackLimits = UnpackLimits()) -> Iterator[Path]:
    """Unpack into a temporary folder (removed afterwards). Does NOT verify: see ``open_verified``.
    ``artifact`` is a path or an ``s3://`` / ``gs://`` URI (downloaded first).

    Raises:
        InputError: not a readable .kolm file; an entry outside specialist/ and its signature, a
            link, device, fifo or sparse file, an absolute or ``..`` path; more entries or more
            bytes than ``limits``.
        KolmRuntimeError: the temporary folder cannot take the files (a full disk).
    """
    with fetched(artifact) as local, _unpacked(local, str(artifact), limits) as root:
        yield root


@contextlib.contextmanager
def _unpacked(p: Path, label: str, limits: UnpackLimits = UnpackLimits()) -> Iterator[Path]:
    """Read every header of the tar at ``p`` and refuse the artifact on the first bad one, then
    (nothing written until then) extract the checked entries, from the same open file."""
    f = _open_artifact(p, label)
    tmp = Path(tempfile.mkdtemp(prefix="kolm-art-"))
    try:
        with f:
            _check_file_size(os.fstat(f.fileno()).st_size, label, limits)
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    members = _checked_members(tar, label, limits)
                    try:
                        tar.extractall(tmp, members=members, filter="data")
                    except OSError as e:  # the write side: the temporary folder is full or unwritable
                        raise KolmRuntimeError(f"cannot unpack {label} into {tmp}: {e.strerror or e}") from None
            except (tarfile.TarError, EOFError, OSError) as e:
                why = " ".join(str(e).split())
                raise InputError(f"not a readable .kolm artifact ({why}): a .kolm file is what `kolm compile` signs",
                                 path=label) from None
        if not (tmp / SIGNATURE).is_file() or not (tmp / CONTENT_DIR / "manifest.json").is_file():
            raise InputError("artifact is missing its signature or manifest", path=label)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_artifact(p: Path, label: str) -> BinaryIO:
    """``p`` open for reading; a regular file (a fifo or a device is never read from).

    Raises:
        InputError: no such file, not a regular file, or unreadable.
    """
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a fifo given as the artifact can't hang us
    except (FileNotFoundError, NotADirectoryError):
        raise InputError("artifact not found", path=label) from None
    except OSError as e:
        raise InputError(f"cannot read the artifact ({e.strerror})", path=label) from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise InputError("artifact is not a regular file", path=label)
    return f


def _check_file_size(size: int, label: str, limits: UnpackLimits) -> None:
    if size > limits.max_file_bytes():
        raise InputError(f"artifact is {_bytes(size)}, more than an artifact that unpacks to at most "
                         f"{_bytes(limits.max_bytes)} can be: refusing it", path=label)


def _checked_members(tar: tarfile.TarFile, label: str, limits: UnpackLimits) -> list[tarfile.TarInfo]:
    """Every entry's header, checked; reading them skips the entries' data and writes nothing.

    Raises:
        InputError: the first entry refused, named with the artifact.
    """
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    for m in tar:  # one header at a time: a million-entry tar is refused at entry 1,001
        if len(members) >= limits.max_members:
            raise InputError(f"more than {limits.max_members:,} entries in the artifact (the next is {m.name!r}): "
                             "refusing it before unpacking", path=label)
        why = _refusal(m, seen)
        if why is not None:
            raise InputError(f"{why}: refusing it", path=label)
        total += m.size
        if total > limits.max_bytes:
            raise InputError(f"entry {m.name!r} ({_bytes(m.size)}) takes the artifact past {_bytes(limits.max_bytes)} "
                             "unpacked: refusing it before unpacking", path=label)
        seen.add(m.name)
        members.append(m)
    return members


def _refusal(m: tarfile.TarInfo, seen: set[str]) -> str | None:
    """Why the entry ``m`` may not be unpacked, or None."""
    name = m.name
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        return f"unexpected entry {name!r} in artifact: its path leads outside the artifact (absolute or '..')"
    # A sparse entry's header claims a size its data does not hold: it would unpack to more than
    # the file is (tarfile marks GNU sparse entries; PAX ones carry GNU.sparse.* fields).
    if m.issparse() or any(k.startswith("GNU.sparse.") for k in m.pax_headers):
        return f"unexpected entry {name!r} in artifact: a sparse file"
    if m.issym() or m.islnk():
        kind = "symbolic" if m.issym() else "hard"
        return f"unexpected entry {name!r} in artifact: a {kind} link (to {m.linkname!r})"
    if m.ischr() or m.isblk():
        return f"unexpected entry {name!r} in artifact: a device"
    if m.isfifo():
        return f"unexpected entry {name!r} in artifact: a fifo"
    if not (m.isfile() or m.isdir()):
        return f"unexpected entry {name!r} in artifact: not a regular file or folder (tar type {m.type!r})"
    if not (name == SIGNATURE or name.startswith(f"{CONTENT_DIR}/")):
        return f"unexpected entry {name!r} in artifact: only {CONTENT_DIR}/ and {SIGNATURE} belong in one"
    # model-signing skips .git* paths when hashing, so such a file would ride along unsigned:
    # refuse every dot-file outright.
    if any(part.startswith(".") for part in parts):
        return f"unexpected hidden entry {name!r} in artifact"
    if name in seen:  # the later copy would win on disk, unlike what a listing shows first
        return f"unexpected entry {name!r} in artifact: it appears twice"
    return None


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def read_manifest(root: Path) -> dict[str, Any]:
    """Raises: InputError for a manifest that is not JSON or of another format version."""
    try:
        data = json.loads((root / CONTENT_DIR / "manifest.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"the artifact's {CONTENT_DIR}/manifest.json is not JSON ({e})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in READABLE_FORMAT_VERSIONS:
        raise InputError(f"artifact format_version {version!r} is not supported (this kolm reads "
                         f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
    return data


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def open_verified(artifact: str | Path, trust: Any,
                  limits: UnpackLimits = UnpackLimits()) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Unpack, verify the signature under ``trust`` (a ``signing.Trust``), then yield the
    content folder and its manifest. Nothing inside is read before the signature checks out.

    Raises:
        InputError: unreadable or malformed artifact, or one past ``limits`` (``unpacked``).
        ArtifactRejected: a changed, added or removed file, or a different signer.
        KolmRuntimeError: the temporary folder cannot take the copy or the files (a full disk).
    """
    with open_verified_with_digest(artifact, trust, limits) as (content, manifest, _):
        yield content, manifest


@contextlib.contextmanager
def open_verified_with_digest(artifact: str | Path, trust: Any, limits: UnpackLimits = UnpackLimits()
                              ) -> Iterator[tuple[Path, dict[str, Any], str]]:
    """``open_verified``, also yielding the SHA-256 of the very bytes that were verified: the
    artifact is read once, hashed on the way into a private copy, and that copy is what is
    unpacked and verified, so a file replaced meanwhile at ``artifact`` changes neither.

    Raises:
        InputError: unreadable or malformed artifact, or one past ``limits`` (``unpacked``).
        ArtifactRejected: a changed, added or removed file, or a different signer.
        KolmRuntimeError: the temporary folder cannot take the copy or the files (a full disk).
    """
    from kolm_ray.signing import ArtifactRejected, verify_signature

    with _private_copy(artifact, limits) as (local, digest), _unpacked(local, str(artifact), limits) as root:
        try:
            verify_signature(root / CONTENT_DIR, root / SIGNATURE, trust)
        except ArtifactRejected as e:  # name the artifact: a compare or a serve reads several
            raise ArtifactRejected(f"{artifact}: {e}") from None
        yield root / CONTENT_DIR, read_manifest(root), digest


@contextlib.contextmanager
def _private_copy(artifact: str | Path, limits: UnpackLimits) -> Iterator[tuple[Path, str]]:
    """A copy of ``artifact``'s bytes that no one else writes, and their SHA-256.

    A local file is opened once and hashed while it is copied into a private temporary folder;
    an object is downloaded once into one (``fetched``) and hashed there.
    """
    label = str(artifact)
    with fetched(artifact) as local:
        if is_remote(label):
            yield local, file_digest(local)
            return
        tmp = Path(tempfile.mkdtemp(prefix="kolm-copy-"))  # mode 0700: ours alone
        try:
            yield tmp / "artifact.kolm", _copy_hashed(local, tmp / "artifact.kolm", label, limits)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _copy_hashed(src: Path, dest: Path, label: str, limits: UnpackLimits) -> str:
    import hashlib

    h = hashlib.sha256()
    with _open_artifact(src, label) as f:
        _check_file_size(os.fstat(f.fileno()).st_size, label, limits)
        try:
            with open(dest, "xb") as out:
                for chunk in _chunks(f, label):
                    h.update(chunk)
                    out.write(chunk)
        except OSError as e:  # the write side: the temporary folder is full or unwritable
            raise KolmRuntimeError(f"cannot copy {label} into {dest.parent} to verify it: {e.strerror or e}") from None
    return h.hexdigest()


def _chunks(f: Any, label: str) -> Iterator[bytes]:
    """``f``'s bytes in 1 MiB chunks. Raises: InputError when reading fails (not OSError)."""
    while True:
        try:
            chunk = f.read(1 << 20)
        except OSError as e:
            raise InputError(f"cannot read the artifact ({e.strerror})", path=label) from None
        if not chunk:
            return
        yield chunk


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
