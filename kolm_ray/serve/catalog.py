"""The Specialists a serving application hosts: which artifacts, verified, on which base.

Pipeline: ``open_specialist(path, trust, dest)`` verifies an artifact's signature under the
configured trust, then extracts what serving needs (adapter, verifier, manifest) into ``dest``
-> a ``Specialist`` (JSON-serializable, so it travels in Serve configs) -> ``build_catalog``
groups them by base model and keeps a ``Refusal`` with its reason for each artifact that did not
verify, or whose bytes are not the ones recorded when it was published, so one bad artifact
never stops the others from serving. An artifact may be a path or an ``s3://`` / ``gs://`` URI:
each host downloads and verifies it itself.

``resolve_model`` is the pure lookup from an OpenAI ``model`` string (``name`` or
``name@version``) to a Specialist. Must not load model weights.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.errors import InputError, KolmError
from kolm_ray.serve.host import Decoding
from kolm_ray.train.base import COMMIT

log = logging.getLogger("kolm_ray.serve")


class Specialist(BaseModel):
    """One verified artifact, ready to load: its identity, base, prompt and verifier."""

    model_config = ConfigDict(frozen=True)
    name: str
    version: str
    artifact: str = Field(description="Path or URI of the .kolm file it came from.")
    artifact_sha256: str
    base_key: str = Field(description="Identity of the base model: its content hash, or hub id@revision.")
    base_path: str = Field(description="What from_pretrained loads for the base: a folder, a hub id, or "
                           "ID@COMMIT for a hub base pinned to a commit (train.base.split_source).")
    system: str = Field(description="The task prompt the Specialist was trained with.")
    decoding: Decoding = Field(description="How it decodes: what its holdout was generated with (manifest "
                                           "'generation'); a request's own settings override it.")
    verifier: str = Field(description="verifier.json, for the receipts' reference-free T, C, L.")
    teacher: str | None = Field(None, description="The teacher model it was distilled from (audits ask it).")
    adapter_dir: str | None = Field(None, description="Where the adapter was extracted (set in a replica).")

    @property
    def max_new_tokens(self) -> int:
        """The token limit of an answer when a request sets none."""
        return self.decoding.max_new_tokens

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def version_key(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.version.split("."))


class Refusal(BaseModel):
    model_config = ConfigDict(frozen=True)
    artifact: str
    reason: str


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True)
    specialists: list[Specialist]
    refused: list[Refusal] = []

    def by_base(self) -> dict[str, list[Specialist]]:
        groups: dict[str, list[Specialist]] = {}
        for s in self.specialists:
            groups.setdefault(s.base_key, []).append(s)
        return groups


def base_key(manifest_base: dict[str, Any]) -> str:
    if manifest_base.get("sha256"):
        return f"sha256:{manifest_base['sha256']}"
    return f"{manifest_base.get('id')}@{manifest_base.get('revision', 'main')}"


def _base_path(manifest_base: dict[str, Any], base_paths: dict[str, str]) -> str:
    """Where this host finds the base: an override by id or hash, else the id itself (a hub id,
    as ``ID@COMMIT`` when the manifest pins its commit, or the local folder the compile used)."""
    for key in (manifest_base.get("sha256"), manifest_base.get("id"), manifest_base.get("name")):
        if key and key in base_paths:
            return str(Path(base_paths[key]).resolve()) if Path(base_paths[key]).is_dir() else base_paths[key]
    ref = str(manifest_base.get("id") or manifest_base.get("name"))
    if not manifest_base.get("sha256") and COMMIT.match(str(manifest_base.get("revision") or "")):
        return f"{ref}@{manifest_base['revision']}"  # a pinned hub base: that commit (AdapterHost splits it)
    # A local base recorded as the user typed it (maybe relative): replicas run elsewhere.
    return str(Path(ref).resolve()) if manifest_base.get("sha256") and Path(ref).is_dir() else ref


def open_specialist(artifact: str | Path, trust: Any, dest: Path | None = None,
                    base_paths: dict[str, str] | None = None, expected_sha256: str | None = None) -> Specialist:
    """Verify ``artifact`` (a path or an object-storage URI) under ``trust`` and read it; with
    ``dest``, extract the adapter there. Its ``artifact_sha256`` is the digest of the very bytes
    verified and extracted (``open_verified_with_digest`` reads the file once, into a private
    copy): a file swapped in meanwhile can't lend its digest. With ``expected_sha256`` (the digest
    recorded when it was published) those bytes must be the published ones. A local base must
    still hash to what the artifact was compiled on.

    Raises:
        InputError: unreadable or malformed artifact; base folder missing or changed.
        ArtifactRejected: the signature does not verify under ``trust``, or the digest is not
            ``expected_sha256``.
    """
    from kolm_ray.artifact import open_verified_with_digest
    from kolm_ray.signing import ArtifactRejected
    from kolm_ray.store import location_of

    with open_verified_with_digest(artifact, trust) as (content, manifest, digest):
        if expected_sha256 is not None and digest != expected_sha256:
            raise ArtifactRejected(
                f"{artifact}: its SHA-256 is {digest[:16]}…, not {expected_sha256[:16]}… as recorded when it was "
                "published: the file changed after `kolm publish`; refusing it (publish a new version instead)")
        mbase = manifest["base"]
        path = _base_path(mbase, base_paths or {})
        if mbase.get("sha256"):
            if not Path(path).is_dir():
                raise InputError(f"base model folder {path!r} not found on this host (give its location with "
                                 "--base-path ID=DIR)", path=str(artifact))
            if _cached_digest(Path(path)) != mbase["sha256"]:
                raise InputError(f"base model folder {path!r} differs from the one this artifact was compiled on",
                                 path=str(artifact))
        adapter_dir = None
        if dest is not None:
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(content / "adapter", dest)
            adapter_dir = str(dest)
        return Specialist(
            name=manifest["name"], version=manifest["version"], artifact=location_of(artifact),
            artifact_sha256=digest, base_key=base_key(mbase), base_path=path,
            system=manifest["prompt"]["system"], decoding=Decoding.from_manifest(manifest.get("generation")),
            verifier=(content / "verifier.json").read_text(), adapter_dir=adapter_dir,
            teacher=(manifest.get("teacher") or {}).get("model"),
        )


_DIGESTS: dict[tuple[str, float, int], str] = {}


def _cached_digest(folder: Path) -> str:
    """A base folder's content hash, memoized per (path, newest mtime, file count) in this process."""
    from kolm_ray.train.base import directory_digest

    files = [f for f in folder.rglob("*") if f.is_file()]
    key = (str(folder.resolve()), max((f.stat().st_mtime for f in files), default=0.0), len(files))
    if key not in _DIGESTS:
        _DIGESTS[key] = directory_digest(folder)
    return _DIGESTS[key]


def build_catalog(artifacts: Sequence[str | Path], trust: Any, base_paths: dict[str, str] | None = None,
                  expected_sha256: Mapping[str, str] | None = None) -> Catalog:
    """Verify every artifact; keep the good ones, refuse the rest with a logged reason.
    ``expected_sha256``: artifact (as listed) -> the digest recorded at publish
    (``publish.release.published_digests``); an artifact whose bytes differ is refused.

    Raises:
        InputError: two artifacts claim the same name and version with different content.
    """
    good: dict[str, Specialist] = {}
    refused = []
    for a in artifacts:
        try:
            s = open_specialist(a, trust, base_paths=base_paths,
                                expected_sha256=(expected_sha256 or {}).get(str(a)))
        except KolmError as e:
            reason = str(e).removeprefix(f"{a}: ")  # said once: the refusal names the artifact
            log.info("refusing artifact %s: %s", a, reason)  # the caller reports ``refused``
            refused.append(Refusal(artifact=str(a), reason=reason))
            continue
        if s.ref in good and good[s.ref].artifact_sha256 != s.artifact_sha256:
            raise InputError(f"two different artifacts claim {s.ref}: {good[s.ref].artifact} and {a}")
        good[s.ref] = s
    return Catalog(specialists=sorted(good.values(), key=lambda s: (s.name, s.version_key)), refused=refused)


class UnknownModel(LookupError):
    pass


def resolve_model(model: str, specialists: Sequence[Specialist], pins: dict[str, str] | None = None) -> Specialist:
    """``name@version`` -> that version; ``name`` -> the version ``pins`` names for it, else the newest.

    Raises:
        UnknownModel: no such Specialist or version.
    """
    name, _, version = model.partition("@")
    versions = [s for s in specialists if s.name == name]
    if not versions:
        served = ", ".join(sorted({s.name for s in specialists})) or "none"
        raise UnknownModel(f"The model '{model}' does not exist (served here: {served}; "
                           "GET /v1/models lists their versions)")
    want = version or (pins or {}).get(name)
    if want:
        for s in versions:
            if s.version == want:
                return s
        raise UnknownModel(f"The model '{name}' has no version '{want}' (have: "
                           f"{', '.join(s.version for s in versions)})")
    return max(versions, key=lambda s: s.version_key)


def adapter_name(s: Specialist) -> str:
    """A Specialist's adapter name inside its base deployment (stable across replicas)."""
    return "k" + hashlib.sha256(s.ref.encode()).hexdigest()[:12]  # PEFT adapter names may not hold "." 
