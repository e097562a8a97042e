"""Which artifacts a serving app hosts: verified first, refused with a reason, looked up by name."""

import pytest

from kolm_ray.serve.catalog import UnknownModel, build_catalog, resolve_model
from kolm_ray.signing import Trust


def test_good_artifacts_are_catalogued_and_a_tampered_one_refused(specialists):
    trust = Trust(public_key=specialists["public_key"])
    cat = build_catalog([specialists["route"], specialists["tldr"], specialists["tampered"]], trust)
    assert [s.ref for s in cat.specialists] == ["route@1.0", "tldr@1.0"]
    assert len(cat.by_base()) == 1  # both on the one tiny base
    [refused] = cat.refused
    assert refused.artifact == str(specialists["tampered"]) and "signature verification failed" in refused.reason


def test_an_artifact_signed_by_another_key_is_refused(specialists, tmp_path, monkeypatch):
    from kolm_ray.signing import ensure_default_key, write_public_key

    monkeypatch.setenv("KOLM_HOME", str(tmp_path))
    other = write_public_key(ensure_default_key(), tmp_path / "other.pub")
    cat = build_catalog([specialists["route"]], Trust(public_key=other))
    assert not cat.specialists and "signature verification failed" in cat.refused[0].reason


def test_a_changed_base_folder_is_refused(specialists, tiny_base, tmp_path):
    import shutil

    moved = tmp_path / "base"
    shutil.copytree(tiny_base, moved)
    (moved / "config.json").write_text((moved / "config.json").read_text() + " ")
    cat = build_catalog([specialists["route"]], Trust(public_key=specialists["public_key"]),
                        base_paths={str(tiny_base): str(moved)})
    assert "differs from the one this artifact was compiled on" in cat.refused[0].reason


def test_resolve_model_by_name_pin_and_version(specialists):
    cat = build_catalog([specialists["route"], specialists["route2"]], Trust(public_key=specialists["public_key"]))
    assert resolve_model("route", cat.specialists).version == "1.1"  # newest by default
    assert resolve_model("route", cat.specialists, {"route": "1.0"}).version == "1.0"
    assert resolve_model("route@1.0", cat.specialists, {"route": "1.1"}).version == "1.0"
    with pytest.raises(UnknownModel, match=r"'nope' does not exist \(served here: route; GET /v1/models"):
        resolve_model("nope", cat.specialists)  # the 404 names what is served, as an unknown version's does
    with pytest.raises(UnknownModel, match="no version '2.0'"):
        resolve_model("route@2.0", cat.specialists)
