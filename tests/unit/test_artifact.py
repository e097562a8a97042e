"""The .kolm artifact and its signature: one test per attack."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from kolm_ray.artifact import (
    ARTIFACT_FORMAT_VERSION, CONTENT_DIR, SIGNATURE, artifact_path, file_digest, next_version, open_verified, pack,
    read_verified_text, unpacked,
)
from kolm_ray.errors import InputError
from kolm_ray.signing import ArtifactRejected, KeySigner, Trust, ensure_default_key, signer_from_spec


def _key_pair(dirpath: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = dirpath / "k.pem", dirpath / "k.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    priv, pub = _key_pair(d)
    content = d / "content"
    (content / "adapter").mkdir(parents=True)
    (content / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (content / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (content / "manifest.json").write_text(json.dumps({"format_version": ARTIFACT_FORMAT_VERSION, "name": "t",
                                                       "version": "1.0", "kscore": {"student": {"k": 90.0}}}))
    sig = d / "content.sig"
    KeySigner(priv).sign(content, sig)
    art = pack(content, sig, d / "store" / "t-1.0.kolm")
    return art, pub, d


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the tar, letting ``edit(name, bytes) -> bytes | None`` change or drop members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            new = edit(m.name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(new)
            tout.addfile(info, io.BytesIO(new))
    return dst


def _add_member(src: Path, dst: Path, name: str, data: bytes) -> Path:
    shutil.copy(src, dst)
    with tarfile.open(dst, "a") as t:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return dst


def test_untouched_artifact_verifies(signed):
    art, pub, _ = signed
    with open_verified(art, Trust(public_key=pub)) as (content, manifest):
        assert manifest["name"] == "t"
        assert (content / "adapter" / "adapter_config.json").read_text() == '{"r": 8}'


def test_packing_is_deterministic(signed, tmp_path):
    art, _, d = signed
    again = pack(d / "content", d / "content.sig", tmp_path / "again.kolm")
    assert again.read_bytes() == art.read_bytes()


def test_flipped_byte_is_rejected(signed, tmp_path):
    art, pub, d = signed

    def flip(name, data):
        if name.endswith("adapter_model.safetensors"):
            data = bytearray(data)
            data[100] ^= 0x01
            return bytes(data)
        return data

    bad = _rewrite(art, tmp_path / "flipped.kolm", flip)
    with pytest.raises(ArtifactRejected) as e:
        with open_verified(bad, Trust(public_key=pub)):
            pass
    # Readable: the artifact, the file inside that changed, its signed and actual SHA-256 in hex.
    signed_digest = file_digest(d / "content" / "adapter" / "adapter_model.safetensors")
    with unpacked(bad) as root:
        now = file_digest(root / CONTENT_DIR / "adapter" / "adapter_model.safetensors")
    assert str(e.value) == (f"{bad}: signature verification failed: {CONTENT_DIR}/adapter/adapter_model.safetensors "
                            f"changed after signing (sha256 {signed_digest} when signed, {now} now)")
    assert "\\x" not in str(e.value)


def test_added_file_is_rejected(signed, tmp_path):
    art, pub, _ = signed
    bad = _add_member(art, tmp_path / "added.kolm", f"{CONTENT_DIR}/adapter/extra.bin", b"payload")
    with pytest.raises(ArtifactRejected, match=f"{CONTENT_DIR}/adapter/extra.bin was added after signing"):
        with open_verified(bad, Trust(public_key=pub)):
            pass


def test_removed_file_is_rejected(signed, tmp_path):
    art, pub, _ = signed
    bad = _rewrite(art, tmp_path / "removed.kolm", lambda n, d: None if n.endswith("adapter_config.json") else d)
    with pytest.raises(ArtifactRejected, match=f"{CONTENT_DIR}/adapter/adapter_config.json was removed after signing"):
        with open_verified(bad, Trust(public_key=pub)):
            pass


def test_wrong_key_is_rejected(signed, tmp_path):
    art, _, _ = signed
    _, other_pub = _key_pair(tmp_path)
    with pytest.raises(ArtifactRejected, match=f"signed with another key, not the trusted key {other_pub}"):
        with open_verified(art, Trust(public_key=other_pub)):
            pass


def test_private_key_given_as_the_public_one_is_named_with_the_fix(signed):
    _, _, d = signed
    with pytest.raises(InputError) as e:
        Trust(public_key=d / "k.pem")
    assert str(e.value) == f"{d / 'k.pem'} is a private key: give the public key (k.pub beside it)"


def test_a_key_file_that_is_not_pem_is_an_input_error(tmp_path):
    junk = tmp_path / "key.txt"
    junk.write_text("hello")
    with pytest.raises(InputError, match="is not a PEM file: give a PEM public key"):
        Trust(public_key=junk)


def test_an_rsa_public_key_is_refused_before_verifying(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "rsa.pub").write_bytes(pem)
    with pytest.raises(InputError, match="RSAPublicKey public key: kolm verifies elliptic-curve keys"):
        Trust(public_key=tmp_path / "rsa.pub")


def test_a_file_is_read_only_after_the_signature_verifies(signed, tmp_path):
    art, pub, _ = signed
    text, manifest = read_verified_text(art, Trust(public_key=pub), "adapter/adapter_config.json")
    assert text == '{"r": 8}' and manifest["name"] == "t"
    with pytest.raises(InputError, match="has no specialist/verifier.json"):
        read_verified_text(art, Trust(public_key=pub), "verifier.json")
    bad = _rewrite(art, tmp_path / "edited.kolm",
                   lambda n, d: b'{"r": 64}' if n.endswith("adapter_config.json") else d)
    with pytest.raises(ArtifactRejected, match="adapter_config.json changed after signing"):
        read_verified_text(bad, Trust(public_key=pub), "adapter/adapter_config.json")


def test_entry_outside_the_content_is_refused(signed, tmp_path):
    art, pub, _ = signed
    bad = _add_member(art, tmp_path / "escape.kolm", "../../evil.sh", b"rm -rf /")
    with pytest.raises(InputError, match="unexpected entry"):
        with unpacked(bad):
            pass


def test_unsigned_gitignore_smuggled_in_is_refused(signed, tmp_path):
    art, pub, _ = signed
    bad = _add_member(art, tmp_path / "dotfile.kolm", f"{CONTENT_DIR}/.gitignore", b"*")
    with pytest.raises(InputError, match="hidden entry"):
        with open_verified(bad, Trust(public_key=pub)):
            pass


def test_missing_signature_is_refused(signed, tmp_path):
    art, pub, _ = signed
    bad = _rewrite(art, tmp_path / "nosig.kolm", lambda n, d: None if n == SIGNATURE else d)
    with pytest.raises(InputError, match="missing its signature"):
        with open_verified(bad, Trust(public_key=pub)):
            pass


def test_corrupt_file_is_an_input_error(tmp_path):
    bad = tmp_path / "junk.kolm"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InputError, match="not a readable .kolm artifact"):
        with unpacked(bad):
            pass


def test_verification_has_no_default_trust():
    with pytest.raises(InputError, match="needs --key"):
        Trust()
    with pytest.raises(InputError, match="needs --key"):
        Trust(identity="me@example.com")


def test_versions_increment_per_name(tmp_path):
    assert next_version(tmp_path, "tldr") == (1, 0)
    for v in ("tldr-1.0.kolm", "tldr-1.3.kolm", "other-4.0.kolm"):
        (tmp_path / v).write_bytes(b"")
    assert next_version(tmp_path, "tldr") == (1, 4)
    assert artifact_path(tmp_path, "tldr", (1, 4)).name == "tldr-1.4.kolm"


def test_default_key_is_created_once_and_named(kolm_home):
    said = []
    first = ensure_default_key(said.append)
    assert first.is_file() and str(first) in said[0] and (first.stat().st_mode & 0o777) == 0o600
    assert ensure_default_key(said.append) == first and len(said) == 1


def test_sign_spec_validation(tmp_path):
    with pytest.raises(InputError, match="invalid --sign"):
        signer_from_spec("gpg")
    with pytest.raises(InputError, match="signing key not found"):
        signer_from_spec(f"key:{tmp_path}/nope.pem")
