"""Signing and verifying a Specialist's content folder with the OpenSSF model-signing format
(``model-signing``, built on sigstore): hash every file -> manifest -> sign -> verify.

Two ``Signer``s: ``KeySigner`` (an elliptic-curve private key; by default one kolm creates once
under ``$KOLM_HOME/keys`` and names when it does) and ``SigstoreSigner`` (keyless, with the
transparency log, where an OIDC identity is available). Verification has no default trust: it
demands a public key, or a sigstore identity and issuer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from kolm_ray.errors import InputError, KolmError, KolmRuntimeError
from kolm_ray.home import state_dir


class ArtifactRejected(KolmError):
    """The artifact's signature does not verify (tampered, or signed by someone else)."""

    exit_code = 1


class Signer(Protocol):
    def sign(self, content: Path, signature: Path) -> None: ...

    def describe(self) -> str: ...


def default_key_paths() -> tuple[Path, Path]:
    keys = state_dir() / "keys"
    return keys / "signing.pem", keys / "signing.pub"


def ensure_default_key(say: Callable[[str], None] = lambda s: None) -> Path:
    """The default private key, created (P-256) on first use; returns its path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv, pub = default_key_paths()
    if priv.is_file():
        return priv
    priv.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    say(f"created a signing key pair: {priv} (private) and {pub} (public; give it to `kolm verify --key`)")
    return priv


def write_public_key(private_key: Path, dest: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    dest.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
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
        if self.public_key is not None and not self.public_key.is_file():
            raise InputError("public key not found", path=str(self.public_key))


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
    """Raises: ArtifactRejected when any file was changed, added or removed, or the signer differs."""
    import model_signing

    cfg = model_signing.verifying.Config()
    if trust.public_key is not None:
        cfg = cfg.use_elliptic_key_verifier(public_key=trust.public_key)
    else:
        cfg = cfg.use_sigstore_verifier(identity=trust.identity, oidc_issuer=trust.issuer)
    try:
        cfg.verify(content, signature)
    except Exception as e:  # noqa: BLE001 - model_signing raises ValueError and crypto errors alike
        raise ArtifactRejected(f"signature verification failed: {type(e).__name__}: {e}") from None
