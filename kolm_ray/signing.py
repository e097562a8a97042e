"""Signing and verifying a Specialist's content folder with the OpenSSF model-signing format
(``model-signing``, built on sigstore): hash every file -> manifest -> sign -> verify.

Two ``Signer``s: ``KeySigner`` (an elliptic-curve private key; by default one kolm creates once
under ``$KOLM_HOME/keys`` and names when it does) and ``SigstoreSigner`` (keyless, with the
transparency log, where an OIDC identity is available). ``Trust`` has no default: it demands a
public key, or a sigstore identity and issuer; ``default_trust`` names kolm's own key for the
commands that read what this machine compiled, and they say so. A key file is checked when a
``Trust`` is made (a private key, a certificate or a non-PEM file is an ``InputError`` naming it),
and a signature that does not verify is an ``ArtifactRejected`` that names what changed: the
file, with its signed and actual SHA-256, or the other signer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from kolm_ray.durable import write_atomic
from kolm_ray.errors import InputError, KolmError, KolmRuntimeError
from kolm_ray.home import state_dir


class ArtifactRejected(KolmError):
    """The artifact's signature does not verify (tampered, or signed by someone else)."""

    exit_code = 1


class Signer(Protocol):
    def sign(self, content: Path, signature: Path) -> None: ...

    def describe(self) -> str: ...

    def public_pem(self) -> bytes | None:
        """The public key that verifies what this signer signs; None when that is not known
        before signing (keyless sigstore: the identity comes with the OIDC token)."""
        ...


def default_key_paths() -> tuple[Path, Path]:
    keys = state_dir() / "keys"
    return keys / "signing.pem", keys / "signing.pub"


def ensure_default_key(say: Callable[[str], None] = lambda s: None) -> Path:
    """The default private key, created (P-256) on first use; returns its path.

    Safe for first runs at once (several compiles or processes on one ``KOLM_HOME``): the
    pair is made under a file lock, by one of them, and the others use it. The public half is
    published before the private one, each by an atomic, fsynced rename, so whoever finds the
    private key finds its public key beside it, and no reader sees half a file.
    """
    from filelock import FileLock

    priv, pub = default_key_paths()
    if priv.is_file() and pub.is_file():
        return priv
    priv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(priv.parent / ".signing.lock"):
        if priv.is_file():  # another run made it meanwhile, or an older kolm left no public half
            if not pub.is_file():
                _publish_public_key(pub, KeySigner(priv).public_pem())
            return priv
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        _publish_public_key(pub, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
        # write_atomic's temp file is made by mkstemp, mode 0600: the key is never readable by others.
        write_atomic(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    say(f"created a signing key pair: {priv} (private) and {pub} (public; give it to `kolm verify --key`)")
    return priv


def _publish_public_key(pub: Path, pem: bytes) -> None:
    write_atomic(pub, pem)
    os.chmod(pub, 0o644)  # a public key: others verify with it


def write_public_key(private_key: Path, dest: Path) -> Path:
    dest.write_bytes(KeySigner(private_key).public_pem())
    return dest


@dataclass(frozen=True)
class KeySigner:
    private_key: Path

    def sign(self, content: Path, signature: Path) -> None:
        import model_signing

        try:
            model_signing.signing.Config().use_elliptic_key_signer(private_key=self.private_key).sign(content, signature)
        except (ValueError, TypeError) as e:
            raise InputError(f"cannot sign with this key ({e})", path=str(self.private_key)) from None

    def describe(self) -> str:
        return f"signed with key {self.private_key}"

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(self.private_key.read_bytes(), password=None)
        return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class SigstoreSigner:
    use_staging: bool = False

    def sign(self, content: Path, signature: Path) -> None:
        import model_signing

        try:
            model_signing.signing.Config().use_sigstore_signer(
                use_ambient_credentials=True, use_staging=self.use_staging
            ).sign(content, signature)
        except Exception as e:  # noqa: BLE001 - OIDC / network failures come in many types
            raise KolmRuntimeError(
                f"sigstore keyless signing failed ({type(e).__name__}: {e}); it needs an OIDC identity "
                "(CI workload identity or a browser) and network access. Use --sign key:PATH offline."
            ) from None

    def describe(self) -> str:
        return "signed keyless with sigstore"

    def public_pem(self) -> None:
        return None


def signer_from_spec(spec: str | None, say: Callable[[str], None] = lambda s: None) -> Signer:
    """``None`` -> the default key; ``key:PATH``; ``sigstore``. Raises: InputError."""
    if spec is None or spec == "key":
        return KeySigner(ensure_default_key(say))
    if spec == "sigstore":
        return SigstoreSigner()
    if spec.startswith("key:"):
        path = Path(spec[4:]).expanduser()
        if not path.is_file():
            raise InputError("signing key not found", path=str(path))
        return KeySigner(path)
    raise InputError(f"invalid --sign {spec!r}: use key:PATH, or sigstore")


@dataclass(frozen=True)
class Trust:
    """Whom to trust: a public key, or a sigstore identity with its OIDC issuer."""

    public_key: Path | None = None
    identity: str | None = None
    issuer: str | None = None

    def __post_init__(self) -> None:
        if self.public_key is None and not (self.identity and self.issuer):
            raise InputError("verification needs --key PUB, or --identity ID with --issuer URL")
        if self.public_key is not None:
            check_public_key(self.public_key)

    def describe(self) -> str:
        """``key PATH`` (with ``(kolm's own)`` for the default key), or the sigstore identity."""
        if self.public_key is None:
            return f"sigstore identity {self.identity} (issuer {self.issuer})"
        own = self.public_key.resolve() == default_key_paths()[1].resolve()
        return f"key {self.public_key}" + (" (kolm's own)" if own else "")


def check_public_key(path: Path) -> None:
    """A key a ``Trust`` can verify with: a PEM elliptic-curve public key (P-256, P-384, P-521).

    Raises:
        InputError: the file is missing or unreadable, a private key (the message names the
            public key beside it), a certificate, or not a PEM public key of a supported curve.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise InputError("public key not found" if not path.exists() else "is a directory, expected a public key file",
                         path=str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the public key ({e.strerror})", path=str(path)) from None
    if b"PRIVATE KEY-----" in data:
        beside = path.with_suffix(".pub")
        hint = f"{beside.name} beside it" if beside.is_file() else "`openssl pkey -in KEY -pubout` writes it"
        raise InputError(f"{path} is a private key: give the public key ({hint})")
    if b"-----BEGIN CERTIFICATE-----" in data:
        raise InputError(f"{path} is a certificate: give the signer's public key (PEM, BEGIN PUBLIC KEY)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        what = "a PEM file of another kind" if b"-----BEGIN " in data else "not a PEM file"
        raise InputError(f"{path} is {what}: give a PEM public key (BEGIN PUBLIC KEY), like the signing.pub "
                         f"kolm writes beside its private key") from None
    except UnsupportedAlgorithm as e:
        raise InputError(f"{path}: unsupported public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                               "secp521r1"):
        kind = getattr(getattr(key, "curve", None), "name", None) or type(key).__name__.removeprefix("_")
        raise InputError(f"{path} is a {kind} public key: kolm verifies elliptic-curve keys (P-256, P-384, P-521)")


def default_trust() -> Trust:
    """Trust kolm's own default key: the public half at ``$KOLM_HOME/keys/signing.pub``.

    For commands that read artifacts this machine compiled; the caller should say which key it
    trusted. ``Trust`` itself keeps no default.

    Raises:
        InputError: there is no default public key.
    """
    _, pub = default_key_paths()
    if not pub.is_file():
        raise InputError(f"no default public key at {pub}: give --key PUB, or --identity ID with --issuer URL")
    return Trust(public_key=pub)


def verify_signature(content: Path, signature: Path, trust: Trust) -> None:
    """Check ``signature`` over the files in ``content`` under ``trust``.

    Raises:
        ArtifactRejected: a file was changed, added or removed (the message names it, with its
            signed and actual digests), or another signer signed it.
        InputError: the trusted key cannot be used to verify.
    """
    import model_signing

    cfg = model_signing.verifying.Config()
    try:
        if trust.public_key is not None:
            cfg = cfg.use_elliptic_key_verifier(public_key=trust.public_key)
        else:
            cfg = cfg.use_sigstore_verifier(identity=trust.identity, oidc_issuer=trust.issuer)
    except (ValueError, TypeError, AttributeError) as e:  # a key check_public_key let through
        raise InputError(f"cannot verify with this key ({e})", path=str(trust.public_key)) from None
    try:
        cfg.verify(content, signature)
    except Exception as e:  # noqa: BLE001 - model_signing raises ValueError and crypto errors alike
        raise ArtifactRejected(f"signature verification failed: {_why_rejected(e, content, signature, trust)}") from None


def _why_rejected(e: Exception, content: Path, signature: Path, trust: Trust) -> str:
    """One readable line: the files that changed (with hex digests), or the other signer."""
    text = " ".join(str(e).split())
    if "Key mismatch" in text:
        return f"signed with another key, not the trusted {trust.describe()}"
    if "Signature mismatch" in text:
        changes = _changed_files(content, signature)
        if changes:
            more = f"; and {len(changes) - 3} more file(s)" if len(changes) > 3 else ""
            return "; ".join(changes[:3]) + more
    return f"{type(e).__name__}: {text}"


def _changed_files(content: Path, signature: Path) -> list[str]:
    """What differs between the files the signature lists and those in ``content``.

    Called only after model_signing checked the signature over that list and found the files
    differ, so the list is the signer's. Empty when the bundle is not the shape this reads.
    """
    try:
        bundle = json.loads(signature.read_text())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        predicate = statement["predicate"]
        if predicate["serialization"]["method"] != "files":  # shards: names are not file paths
            return []
        signed = {r["name"]: (r.get("algorithm", "sha256"), r["digest"]) for r in predicate["resources"]}
        ignored = set(predicate["serialization"].get("ignore_paths", []))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    present = {p.relative_to(content).as_posix(): p for p in content.rglob("*")
               if p.is_file() and p.relative_to(content).parts[0] not in ignored}
    where = content.name
    out = [f"{where}/{name} was removed after signing" for name in sorted(signed.keys() - present.keys())]
    out += [f"{where}/{name} was added after signing" for name in sorted(present.keys() - signed.keys())]
    for name in sorted(signed.keys() & present.keys()):
        algorithm, expected = signed[name]
        try:
            h = hashlib.new(algorithm)
        except ValueError:
            return []
        with present[name].open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != expected:
            out.append(f"{where}/{name} changed after signing ({algorithm} {expected} when signed, "
                       f"{h.hexdigest()} now)")
    return out
