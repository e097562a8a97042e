"""The operator's limits file: what a key gets, how a change merges, and what a bad file says."""

import json
import threading

import pytest

from kolm_ray.errors import InputError
from kolm_ray.sampling.limits import (
    LIMITS_FORMAT_VERSION, RateLimits, key_digest, limits_path, load_limits, set_limits,
)


def test_no_file_means_nothing_stated_and_the_defaults_apply(kolm_home):
    limits = load_limits()
    resolved = limits.for_key(key_digest("k", None))
    assert resolved.org == RateLimits() and resolved.stated is False and resolved.tenants == {}
    assert limits_path() == kolm_home / "teacher-limits.json"


def test_the_default_entry_applies_to_every_key_without_its_own(tmp_path):
    path = tmp_path / "limits.json"
    set_limits(max_in_flight=16, path=path, notify=False)
    key = key_digest("k", None)
    set_limits(key=key, tokens_per_minute=1000, path=path, notify=False)
    limits = load_limits(path)
    assert limits.for_key(key_digest("other", None)).org.max_in_flight == 16
    own = limits.for_key(key).org
    # The key's entry starts from the default entry's limits and changes only what was given.
    assert (own.max_in_flight, own.tokens_per_minute, own.calls_per_minute) == (16, 1000, 4000)
    assert limits.for_key(key).stated is True


def test_a_change_keeps_what_it_does_not_name(tmp_path):
    path = tmp_path / "limits.json"
    set_limits(max_in_flight=16, calls_per_minute=100, path=path, notify=False)
    set_limits(tenant="acme", budget_usd=50.0, path=path, notify=False)
    set_limits(tenant="acme", budget_tokens=10**6, path=path, notify=False)
    set_limits(max_in_flight=8, path=path, notify=False)
    r = load_limits(path).for_key(key_digest("k", None))
    assert (r.org.max_in_flight, r.org.calls_per_minute) == (8, 100)
    assert r.tenants["acme"].usd == 50.0 and r.tenants["acme"].tokens == 10**6


def test_tenants_of_the_default_entry_and_of_a_key_merge(tmp_path):
    path = tmp_path / "limits.json"
    key = key_digest("k", None)
    set_limits(tenant="acme", budget_usd=5.0, path=path, notify=False)
    set_limits(key=key, tenant="globex", budget_usd=7.0, path=path, notify=False)
    set_limits(key=key, tenant="acme", budget_usd=9.0, path=path, notify=False)
    tenants = load_limits(path).for_key(key).tenants
    assert (tenants["acme"].usd, tenants["globex"].usd) == (9.0, 7.0)
    assert load_limits(path).for_key(key_digest("other", None)).tenants.keys() == {"acme"}
    assert load_limits(path).for_key(key).stated is False  # budgets alone state no rate limits


def test_the_file_carries_its_format_version(tmp_path):
    path = tmp_path / "limits.json"
    set_limits(max_in_flight=3, path=path, notify=False)
    assert json.loads(path.read_text())["format_version"] == LIMITS_FORMAT_VERSION == 1


def test_malformed_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "limits.json"
    path.write_text('{"format_version": 1,\n "default": {\n')
    with pytest.raises(InputError, match=rf"{path}:\d+: malformed JSON"):
        load_limits(path)


def test_an_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(InputError, match="format_version 1"):
        load_limits(path)


def test_a_bad_entry_names_the_field(tmp_path):
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"format_version": 1, "default": {"org": {"max_in_flight": 0}}}))
    with pytest.raises(InputError, match="default.org.max_in_flight"):
        load_limits(path)


def test_bad_changes_are_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "limits.json"
    with pytest.raises(InputError, match="a budget belongs to a tenant"):
        set_limits(budget_usd=5.0, path=path, notify=False)
    with pytest.raises(InputError, match="not a key digest"):
        set_limits(key="sk-ant-secret", max_in_flight=4, path=path, notify=False)
    with pytest.raises(InputError, match="max_in_flight"):
        set_limits(max_in_flight=-1, path=path, notify=False)
    with pytest.raises(InputError, match="usd"):
        set_limits(tenant="acme", budget_usd=-1.0, path=path, notify=False)
    assert not path.exists()


def test_concurrent_writers_lose_no_change(tmp_path):
    path = tmp_path / "limits.json"
    errors = []

    def writer(i: int) -> None:
        try:
            for j in range(10):
                set_limits(tenant=f"t{i}-{j}", budget_usd=float(j), path=path, notify=False)
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(load_limits(path).default.tenants) == 40
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".limits.json.tmp")]
