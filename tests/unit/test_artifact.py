"""The .kolm artifact and its signature: one test per attack."""

import contextlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import kolm_ray.artifact
from kolm_ray.artifact import (
    ARTIFACT_FORMAT_VERSION, CONTENT_DIR, MAX_MEMBERS, SIGNATURE, UnpackLimits, artifact_path, file_digest,
    next_version, open_verified, open_verified_with_digest, pack, read_verified_text, unpacked,
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


# ----- unpacking before the signature is checked: bounded, headers first -------------------------
# Known-bad artifacts, made here: a manifest and a signature file first (regular files that would
# be unpacked if entries were written as they are read), then the entry under attack.


def _header(name: str, size: int = 0, **fields) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    for k, v in fields.items():
        setattr(info, k, v)
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _kolm(path: Path, *entries: tuple[bytes, bytes]) -> Path:
    """A tar of the manifest, the signature and ``entries`` (raw header, data): a header may
    claim more data than follows it, as an attacker's may."""
    manifest = json.dumps({"format_version": ARTIFACT_FORMAT_VERSION, "name": "t", "version": "1.0"}).encode()
    out = bytearray()
    for header, data in [(_header(f"{CONTENT_DIR}/manifest.json", len(manifest)), manifest),
                         (_header(SIGNATURE, 2), b"{}"), *entries]:
        out += header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    path.write_bytes(bytes(out + b"\0" * 2 * tarfile.BLOCKSIZE))
    return path


def _entry(name: str, **fields) -> tuple[bytes, bytes]:
    return _header(name, **fields), b""


@pytest.fixture
def nothing_unpacked(monkeypatch):
    """Fails the test if any entry is extracted (the refusal must come from the headers alone)."""
    def extract(*args, **kwargs):
        raise AssertionError("an entry was extracted before every header was checked")

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract)
    monkeypatch.setattr(tarfile.TarFile, "extract", extract)


def _refusal(artifact: Path, pub: Path, limits: UnpackLimits = UnpackLimits()) -> str:
    with pytest.raises(InputError) as e:
        with open_verified(artifact, Trust(public_key=pub), limits):
            pass
    return str(e.value)


def test_a_symlink_entry_is_refused_before_anything_is_unpacked(signed, tmp_path, nothing_unpacked):
    bad = _kolm(tmp_path / "symlink.kolm", _entry(f"{CONTENT_DIR}/adapter/adapter_model.safetensors",
                                                  type=tarfile.SYMTYPE, linkname="/etc/shadow"))
    assert _refusal(bad, signed[1]) == (f"{bad}: unexpected entry '{CONTENT_DIR}/adapter/adapter_model.safetensors' "
                                        "in artifact: a symbolic link (to '/etc/shadow'): refusing it")


def test_a_hardlink_entry_is_refused(signed, tmp_path, nothing_unpacked):
    bad = _kolm(tmp_path / "hardlink.kolm", _entry(f"{CONTENT_DIR}/eval.json", type=tarfile.LNKTYPE,
                                                   linkname=f"{CONTENT_DIR}/manifest.json"))
    assert _refusal(bad, signed[1]) == (f"{bad}: unexpected entry '{CONTENT_DIR}/eval.json' in artifact: a hard link "
                                        f"(to '{CONTENT_DIR}/manifest.json'): refusing it")


def test_a_device_entry_is_refused(signed, tmp_path, nothing_unpacked):
    bad = _kolm(tmp_path / "device.kolm", _entry(f"{CONTENT_DIR}/adapter/disk", type=tarfile.BLKTYPE, devmajor=8))
    assert _refusal(bad, signed[1]) == f"{bad}: unexpected entry '{CONTENT_DIR}/adapter/disk' in artifact: a device: " \
                                       "refusing it"


def test_a_fifo_entry_is_refused(signed, tmp_path, nothing_unpacked):
    bad = _kolm(tmp_path / "fifo.kolm", _entry(f"{CONTENT_DIR}/train.json", type=tarfile.FIFOTYPE))
    assert _refusal(bad, signed[1]) == f"{bad}: unexpected entry '{CONTENT_DIR}/train.json' in artifact: a fifo: " \
                                       "refusing it"


def test_a_sparse_entry_claiming_a_terabyte_is_refused(signed, tmp_path, nothing_unpacked):
    """A GNU sparse entry: its header says 1 TiB, its data holds nothing (a hole that would be
    written out, then read and hashed, before the signature check)."""
    header = bytearray(_header(f"{CONTENT_DIR}/adapter/adapter_model.safetensors", type=tarfile.GNUTYPE_SPARSE)[-512:])
    header[483:495] = tarfile.itn(1 << 40, 12, tarfile.GNU_FORMAT)  # the real (unpacked) size
    header[148:156] = b"%06o\0 " % (sum(header[:148]) + 8 * 32 + sum(header[156:]))  # the header's checksum
    bad = _kolm(tmp_path / "sparse.kolm", (bytes(header), b""))
    assert _refusal(bad, signed[1]) == (f"{bad}: unexpected entry '{CONTENT_DIR}/adapter/adapter_model.safetensors' "
                                        "in artifact: a sparse file: refusing it")


def test_an_absolute_path_is_refused(signed, tmp_path, nothing_unpacked):
    bad = _kolm(tmp_path / "absolute.kolm", (_header("/etc/cron.d/kolm", 4), b"evil"))
    assert "'/etc/cron.d/kolm' in artifact: its path leads outside the artifact" in _refusal(bad, signed[1])


def test_a_dotdot_path_under_the_content_folder_is_refused(signed, tmp_path, nothing_unpacked):
    bad = _kolm(tmp_path / "dotdot.kolm", (_header(f"{CONTENT_DIR}/../../evil.sh", 4), b"evil"))
    assert f"'{CONTENT_DIR}/../../evil.sh' in artifact: its path leads outside the artifact" in _refusal(bad, signed[1])


def test_an_entry_given_twice_is_refused(signed, tmp_path, nothing_unpacked):
    """The second copy would win on disk while a listing shows the first."""
    bad = _kolm(tmp_path / "twice.kolm", (_header(f"{CONTENT_DIR}/manifest.json", 2), b"{}"))
    assert _refusal(bad, signed[1]) == f"{bad}: unexpected entry '{CONTENT_DIR}/manifest.json' in artifact: it " \
                                       "appears twice: refusing it"


def test_a_tar_bomb_header_claiming_64_gib_is_refused_from_the_header(signed, tmp_path, nothing_unpacked):
    """The header claims 64 GiB and no data follows: nothing near that is ever written."""
    bad = _kolm(tmp_path / "bomb.kolm", _entry(f"{CONTENT_DIR}/adapter/adapter_model.safetensors", size=64 << 30))
    assert bad.stat().st_size < 10_000
    assert _refusal(bad, signed[1]) == (f"{bad}: entry '{CONTENT_DIR}/adapter/adapter_model.safetensors' (64.0 GiB) "
                                        "takes the artifact past 4.0 GiB unpacked: refusing it before unpacking")


def test_more_entries_than_the_cap_are_refused_before_any_is_written(signed, tmp_path, nothing_unpacked):
    """An inode bomb: many empty files, each cheap in the tar and a file (and a hash) on disk."""
    bad = _kolm(tmp_path / "many.kolm", *(_entry(f"{CONTENT_DIR}/adapter/f{i}") for i in range(MAX_MEMBERS)))
    assert _refusal(bad, signed[1]) == (f"{bad}: more than {MAX_MEMBERS:,} entries in the artifact (the next is "
                                        f"'{CONTENT_DIR}/adapter/f{MAX_MEMBERS - 2}'): refusing it before unpacking")


def test_a_real_artifact_past_a_lowered_cap_is_refused_before_anything_is_written(signed, nothing_unpacked):
    art, pub, _ = signed
    assert "takes the artifact past 10.0 KiB unpacked" in _refusal(art, pub, UnpackLimits(max_bytes=10 << 10))
    assert "more than 2 entries" in _refusal(art, pub, UnpackLimits(max_members=2))


def test_a_file_larger_than_any_artifact_within_the_limits_is_refused_before_it_is_copied(signed):
    art, pub, _ = signed
    limits = UnpackLimits(max_members=1, max_bytes=1)
    assert art.stat().st_size > limits.max_file_bytes()
    size = f"{art.stat().st_size / 1024:.1f} KiB"
    refusal = _refusal(art, pub, limits)
    assert f"artifact is {size}, more than an artifact that unpacks to at most 1 bytes can be" in refusal


def test_a_fifo_given_as_the_artifact_is_refused_without_waiting_for_a_writer(signed, tmp_path):
    fifo = tmp_path / "t-1.0.kolm"
    os.mkfifo(fifo)
    assert _refusal(fifo, signed[1]) == f"{fifo}: artifact is not a regular file"
    with pytest.raises(InputError, match="artifact is not a regular file"):
        with unpacked(fifo):
            pass


def test_the_default_caps_leave_room_for_an_8b_adapter():
    """Rank 64 on every linear layer of an 8B base, fp32: about 0.7 GB in about ten files."""
    assert UnpackLimits().max_bytes >= 2 * 700_000_000 and UnpackLimits().max_members >= 100


# ----- the digest recorded is the digest of the bytes verified -------------------------------------


def _signed_copy(signed, dest: Path, config: str) -> Path:
    """Another artifact under the same key and name: as valid as the first, different bytes."""
    _, _, d = signed
    content = dest.parent / f"{dest.stem}-content"
    shutil.copytree(d / "content", content)
    (content / "adapter" / "adapter_config.json").write_text(config)
    KeySigner(d / "k.pem").sign(content, dest.parent / f"{dest.stem}.sig")
    return pack(content, dest.parent / f"{dest.stem}.sig", dest)


@pytest.fixture
def swapped_once_read(monkeypatch):
    """``swap(path, other)``: ``path`` is replaced by a copy of ``other`` the moment its tar has
    been read (an attacker's rename between kolm reading it and recording its digest)."""
    def swap(path: Path, other: Path) -> None:
        read = kolm_ray.artifact._unpacked

        @contextlib.contextmanager
        def unpacked_then_swapped(*args, **kwargs):
            with read(*args, **kwargs) as root:
                shutil.copy(other, path.with_suffix(".swap"))
                path.with_suffix(".swap").replace(path)
                yield root

        monkeypatch.setattr(kolm_ray.artifact, "_unpacked", unpacked_then_swapped)

    return swap


def test_a_file_swapped_after_it_is_read_cannot_lend_its_digest(signed, tmp_path, swapped_once_read):
    art = tmp_path / "t-1.0.kolm"
    shutil.copy(signed[0], art)
    impostor = _signed_copy(signed, tmp_path / "impostor.kolm", '{"r": 64}')
    verified = file_digest(art)
    swapped_once_read(art, impostor)
    with open_verified_with_digest(art, Trust(public_key=signed[1])) as (content, _, digest):
        assert (content / "adapter" / "adapter_config.json").read_text() == '{"r": 8}'
    assert file_digest(art) == file_digest(impostor)  # the swap happened
    assert digest == verified  # the digest of what was verified, not of what is there now


def test_a_catalog_records_the_digest_of_the_bytes_it_verified(specialists, tmp_path, swapped_once_read):
    """What `kolm serve` records and holds a published artifact to."""
    from kolm_ray.serve.catalog import open_specialist

    art = tmp_path / "route-1.0.kolm"
    shutil.copy(specialists["route"], art)
    verified = file_digest(art)
    swapped_once_read(art, specialists["route2"])  # route 1.1: signed by the same key
    s = open_specialist(str(art), Trust(public_key=specialists["public_key"]), dest=tmp_path / "adapter")
    assert file_digest(art) == file_digest(specialists["route2"])
    assert (s.version, s.artifact_sha256) == ("1.0", verified)


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


def test_a_specialist_past_the_unpack_limits_is_refused_before_it_is_signed(tmp_path):
    """A compile must not sign an artifact that serve, compare and publish would all refuse."""
    from kolm_ray.artifact import check_within_limits
    from kolm_ray.errors import KolmRuntimeError

    content = tmp_path / "specialist"
    (content / "adapter").mkdir(parents=True)
    (content / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 5000)
    (content / "manifest.json").write_text("{}")
    check_within_limits(content)  # the defaults take it
    with pytest.raises(KolmRuntimeError, match="5,002 bytes.*lower --lora-r"):
        check_within_limits(content, UnpackLimits(max_bytes=4096))
    with pytest.raises(KolmRuntimeError, match="2 files"):
        check_within_limits(content, UnpackLimits(max_members=2))
