"""Serving holds a released artifact to the SHA-256 recorded when it was published: a file
swapped afterwards is refused even when its signature verifies (same key, same name@version)."""

import shutil

from kolm_ray.artifact import file_digest
from kolm_ray.publish.controller import released_catalog, serve_config
from kolm_ray.publish.release import ReleaseStore, published_digests
from kolm_ray.publish.service import publish_artifact
from kolm_ray.signing import Trust
from tests.conftest import ROUTING_REFS, ROUTING_TASK


def _publish(specialists, tmp_path):
    art = tmp_path / "arts" / "route-1.0.kolm"
    art.parent.mkdir()
    shutil.copy(specialists["route"], art)
    trust = Trust(public_key=specialists["public_key"])
    state, _, _ = publish_artifact(tmp_path / "home", "prod", str(art), trust, weight=0.05, hold_s=60,
                                   min_samples=10, tolerance=0.5)
    cfg = serve_config(state, {"trust_key": str(specialists["public_key"]), "store": str(tmp_path / "home")})
    return art, state, cfg


def test_publish_records_the_digest_of_the_bytes_it_verified(specialists, tmp_path):
    art, state, _ = _publish(specialists, tmp_path)
    v = ReleaseStore(tmp_path / "home", "prod").load().releases["route"].stable
    assert v.artifact == str(art) and v.artifact_sha256 == file_digest(art)
    assert published_digests(state) == {str(art): file_digest(art)}


def test_the_published_artifact_serves(specialists, tmp_path):
    art, state, cfg = _publish(specialists, tmp_path)
    catalog = released_catalog(cfg, state)
    assert [s.ref for s in catalog.specialists] == ["route@1.0"] and not catalog.refused


def test_an_artifact_swapped_after_publish_is_refused_though_its_signature_verifies(specialists, tiny_base, tmp_path):
    from kolm_ray.serve.catalog import build_catalog
    from kolm_ray.testing.artifacts import make_artifact

    art, state, cfg = _publish(specialists, tmp_path)
    impostor = make_artifact(tmp_path / "other", tiny_base, "route", (1, 0), task=ROUTING_TASK,
                             references=ROUTING_REFS, seed=9, private_key=specialists["home"] / "keys" / "signing.pem")
    shutil.copy(impostor, art)
    trust = Trust(public_key=specialists["public_key"])
    assert [s.ref for s in build_catalog([str(art)], trust).specialists] == ["route@1.0"]  # signature alone: fine
    catalog = released_catalog(cfg, state)
    assert not catalog.specialists
    [refused] = catalog.refused
    assert refused.artifact == str(art)
    assert "changed after `kolm publish`" in refused.reason and file_digest(art)[:16] in refused.reason


def test_publish_records_the_digest_of_the_bytes_it_verified_though_the_file_is_swapped_meanwhile(
        specialists, tmp_path, monkeypatch):
    """An attacker's rename between kolm verifying the artifact and recording its digest: the
    release holds the digest of what was verified, so serving refuses the swapped-in file."""
    import contextlib

    import kolm_ray.artifact

    art = tmp_path / "arts" / "route-1.0.kolm"
    art.parent.mkdir()
    shutil.copy(specialists["route"], art)
    verified = file_digest(art)
    read = kolm_ray.artifact._unpacked

    @contextlib.contextmanager
    def unpacked_then_swapped(*args, **kwargs):
        with read(*args, **kwargs) as root:
            shutil.copy(specialists["route2"], art.with_suffix(".swap"))
            art.with_suffix(".swap").replace(art)
            yield root

    monkeypatch.setattr(kolm_ray.artifact, "_unpacked", unpacked_then_swapped)
    publish_artifact(tmp_path / "home", "prod", str(art), Trust(public_key=specialists["public_key"]),
                     weight=0.05, hold_s=60, min_samples=10, tolerance=0.5)
    assert file_digest(art) == file_digest(specialists["route2"])  # the swap happened
    assert ReleaseStore(tmp_path / "home", "prod").load().releases["route"].stable.artifact_sha256 == verified
