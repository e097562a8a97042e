"""Object storage end to end, against a local S3 server the tests start themselves (moto,
tests/s3_server.py): the teacher cache hitting in a bucket (through Ray Data actors), samples
written to a bucket, artifact versions allocated race-free and never overwritten, a compile's
sign and gate stages writing to a bucket, `kolm inspect` / `kolm verify` / `kolm publish` of an
s3:// artifact, serving refusing an object swapped after publish, a Ray Train fit checkpointing
to S3 and resuming from there, and errors that name the URI."""

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kolm_ray.artifact import CONTENT_DIR, file_digest, put_artifact, reserve_version, unpacked
from kolm_ray.cli import cli
from kolm_ray.errors import GateFailed, InputError, KolmRuntimeError
from kolm_ray.store import ObjectStore, open_store
from kolm_ray.testing.corpus import ROUTING_TASK, routing_rows
from kolm_ray.testing.messages_api import replay_responder, sample_variants
from tests.conftest import ROUTING_REFS, cli_json, write_jsonl
from tests.conftest import ROUTING_TASK as SPECIALIST_TASK
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures
from tests.fit_kill import kill_fit_worker
from tests.races import race

RUNNER = CliRunner()


def _raw_put(uri: str, data: bytes) -> None:
    """Write an object the way someone with write access to the bucket could: no condition."""
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def _raw_get(uri: str) -> bytes:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


# ----- teacher cache and samples -----------------------------------------------------------------


def test_teacher_cache_in_a_bucket_makes_the_rerun_free(ray_session, messages_api, s3_bucket, tmp_path, monkeypatch):
    rows = routing_rows(12, seed=3)
    labels = sorted({r.output for r in rows})
    srv = messages_api(replay_responder({r.input: r.output for r in rows}, sample_variants("label", labels)))
    monkeypatch.setenv("KOLM_HOME", f"{s3_bucket}/home")
    monkeypatch.setenv("KOLM_STATE_DIR", str(tmp_path / "state"))
    path = write_jsonl(tmp_path / "route.jsonl", rows)
    args = ["sample", ROUTING_TASK, "--examples", str(path), "--k", "2", "--out", str(tmp_path / "out"), "--json"]

    res = RUNNER.invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    first = cli_json(res)
    assert first["calls"] == 24 and first["cache_hits"] == 0
    entries = open_store(f"{s3_bucket}/home/cache/teacher").list()
    # endpoints/DIGEST/KEY[:2]/KEY.json: the stand-in is not the default endpoint, so its answers are kept apart
    assert len(entries) == 24 and all(e.startswith("endpoints/") and e.endswith(".json")
                                      and e.split("/")[-2] == e.split("/")[-1][:2] for e in entries), entries[:3]

    before = srv.stats.requests
    res = RUNNER.invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    again = cli_json(res)
    assert again["calls"] == 0 and again["cache_hits"] == 24 and again["cost_usd"] == 0
    assert srv.stats.requests == before  # every answer came out of the bucket
    assert not (tmp_path / "state" / "cache").exists()  # nothing cached on local disk


def test_samples_are_written_to_a_bucket(ray_session, messages_api, s3_bucket, tmp_path):
    from kolm_ray.rows import read_rows
    from kolm_ray.sampling.config import QuotaConfig, SampleConfig, TeacherConfig
    from kolm_ray.sampling.fanout import sample_rows, write_samples
    from kolm_ray.sampling.pricing import price_for

    rows = routing_rows(8, seed=4)
    messages_api(replay_responder({r.input: r.output for r in rows}))
    table = read_rows(write_jsonl(tmp_path / "route.jsonl", rows))
    outcome = sample_rows(ROUTING_TASK, table, teacher=TeacherConfig(), sample=SampleConfig(k=2), quota=QuotaConfig(),
                          prices=price_for(TeacherConfig().model), cache_dir=f"{s3_bucket}/cache")
    where = write_samples(f"{s3_bucket}/runs/route/samples/", outcome)
    assert where == f"{s3_bucket}/runs/route/samples"
    store = open_store(where)
    assert store.list() == ["samples.parquet", "summary.json", "verifier.json"]
    with store.filesystem().open_input_file(f"{where.removeprefix('s3://')}/samples.parquet") as f:
        assert pq.read_table(f).equals(outcome.samples)
    assert json.loads(store.read_bytes("summary.json"))["samples"] == 16
    assert json.loads(store.read_bytes("verifier.json")) == json.loads(outcome.verifier.to_json())


# ----- artifact versions -------------------------------------------------------------------------


def test_racing_allocations_in_a_bucket_get_different_versions_and_keep_their_bytes(s3_bucket, tmp_path):
    store = f"{s3_bucket}/artifacts"

    def compile_one(i: int):
        version = reserve_version(store, "tldr")
        packed = tmp_path / f"packed-{i}"
        packed.write_bytes(f"artifact of compile {i}".encode() * 500)
        return version, put_artifact(store, packed, "tldr", version)

    results = race(6, compile_one)
    assert sorted(v for v, _ in results) == [(1, i) for i in range(6)]
    for i, (version, where) in enumerate(results):
        assert where == f"{store}/tldr-{version[0]}.{version[1]}.kolm"
        assert _raw_get(where) == f"artifact of compile {i}".encode() * 500


def test_a_preexisting_object_is_never_overwritten(s3_bucket, tmp_path, monkeypatch):
    store = f"{s3_bucket}/artifacts"
    _raw_put(f"{store}/tldr-1.0.kolm", b"copied in by hand")
    assert reserve_version(store, "tldr") == (1, 1)
    packed = tmp_path / "packed"
    packed.write_bytes(b"impostor")
    with pytest.raises(KolmRuntimeError, match="never overwritten"):
        put_artifact(store, packed, "tldr", (1, 0))
    assert _raw_get(f"{store}/tldr-1.0.kolm") == b"copied in by hand"
    # A listing that misses objects still cannot hand out a version whose artifact exists.
    monkeypatch.setattr(ObjectStore, "list", lambda self, prefix="", recursive=True: [])
    assert reserve_version(store, "tldr") == (1, 2)  # 1.0 exists, 1.1 is reserved
    assert _raw_get(f"{store}/tldr-1.0.kolm") == b"copied in by hand"


def _prepared(store: str, work: Path, gate: float | None = None):
    return SimpleNamespace(cfg=SimpleNamespace(store=store, work_dir=work, name="route", gate=gate))


def test_sign_stage_puts_the_artifact_in_the_bucket_once(specialists, s3_bucket, tmp_path):
    from kolm_ray.compile import stage_sign
    from kolm_ray.signing import KeySigner

    store = f"{s3_bucket}/artifacts"
    p = _prepared(store, tmp_path / "work")
    version = reserve_version(store, "route")
    signer = KeySigner(specialists["home"] / "keys" / "signing.pem")
    with unpacked(specialists["route"]) as root:
        content = root / CONTENT_DIR
        files = {f: (content / f).read_text() for f in ("manifest.json", "verifier.json", "eval.json", "train.json")}
        local = stage_sign(p, version, files, content / "adapter", signer)
        uri = f"{store}/route-{version[0]}.{version[1]}.kolm"
        assert _raw_get(uri) == local.read_bytes()  # the kept copy is what was uploaded
        pub = specialists["public_key"]
        ok = RUNNER.invoke(cli, ["verify", uri, "--key", str(pub)])
        assert ok.exit_code == 0 and f"verified    {uri}: route 1.0" in ok.output, ok.output
        with pytest.raises(KolmRuntimeError, match="never overwritten"):
            stage_sign(p, version, files, content / "adapter", signer)
    assert _raw_get(uri) == local.read_bytes()


def test_gate_keeps_the_report_in_the_bucket_and_gives_the_version_back(s3_bucket, tmp_path):
    from kolm_ray.compile import stage_gate

    store = f"{s3_bucket}/artifacts"
    version = reserve_version(store, "route")
    student = SimpleNamespace(score=SimpleNamespace(k=40.0))
    with pytest.raises(GateFailed, match=f"{store}/rejected/route-1.0.report.json"):
        stage_gate(_prepared(store, tmp_path, gate=60), student, {"name": "route", "k": 40.0}, "1.0")
    assert json.loads(open_store(store).read_bytes("rejected/route-1.0.report.json")) == {"name": "route", "k": 40.0}
    assert reserve_version(store, "route") == version  # no artifact was written: the next compile gets 1.0


# ----- reading artifacts from a bucket -----------------------------------------------------------


def test_inspect_and_verify_an_s3_artifact(specialists, s3_bucket):
    store = f"{s3_bucket}/artifacts"
    uri = put_artifact(store, specialists["route"], "route", (1, 0))
    pub = str(specialists["public_key"])
    shown = RUNNER.invoke(cli, ["inspect", uri, "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["name"] == "route" and "adapter/adapter_model.safetensors" in shown.output
    ok = RUNNER.invoke(cli, ["verify", uri, "--key", pub])
    assert ok.exit_code == 0 and f"verified    {uri}" in ok.output, ok.output


def test_verify_refuses_a_tampered_s3_artifact(specialists, s3_bucket):
    uri = put_artifact(f"{s3_bucket}/artifacts", specialists["tampered"], "evil", (1, 0))
    res = RUNNER.invoke(cli, ["verify", uri, "--key", str(specialists["public_key"])])
    assert res.exit_code == 1 and "signature verification failed" in res.output, res.output


@pytest.mark.parametrize("tail, code, words", [
    ("/artifacts/nope-1.0.kolm", 2, "not found"),
    ("-missing-bucket/artifacts/route-1.0.kolm", 2, "does not exist"),
])
def test_verify_of_a_missing_s3_artifact_exits_2_naming_it(specialists, s3_bucket, tail, code, words):
    uri = s3_bucket + tail
    res = RUNNER.invoke(cli, ["verify", uri, "--key", str(specialists["public_key"])])
    assert res.exit_code == code and words in res.output and uri.split("/")[2] in res.output, res.output


def test_serving_refuses_an_s3_artifact_swapped_after_publish(specialists, tiny_base, s3_bucket, tmp_path, monkeypatch):
    """Someone with write access to the bucket replaces route-1.0.kolm with another Specialist
    signed by the same key under the same name and version: the signature still verifies, the
    digest recorded at publish does not."""
    from kolm_ray.publish.controller import released_catalog, serve_config
    from kolm_ray.publish.release import ReleaseStore
    from kolm_ray.testing.artifacts import make_artifact

    monkeypatch.setenv("KOLM_HOME", str(tmp_path / "state"))
    uri = put_artifact(f"{s3_bucket}/artifacts", specialists["route"], "route", (1, 0))
    pub = str(specialists["public_key"])
    res = RUNNER.invoke(cli, ["publish", uri, "--to", "prod", "--key", pub])
    assert res.exit_code == 0, res.output
    state = ReleaseStore(tmp_path / "state", "prod").load()
    released = state.releases["route"].stable
    assert released.artifact == uri and released.artifact_sha256 == file_digest(specialists["route"])

    cfg = serve_config(state, {"trust_key": pub, "store": str(tmp_path / "state")})
    catalog = released_catalog(cfg, state)
    assert [(s.ref, s.artifact) for s in catalog.specialists] == [("route@1.0", uri)] and not catalog.refused

    impostor = make_artifact(tmp_path / "other", tiny_base, "route", (1, 0), task=SPECIALIST_TASK,
                             references=ROUTING_REFS, seed=9, private_key=specialists["home"] / "keys" / "signing.pem")
    _raw_put(uri, impostor.read_bytes())
    assert RUNNER.invoke(cli, ["verify", uri, "--key", pub]).exit_code == 0  # the signature alone can't tell
    catalog = released_catalog(cfg, state)
    assert not catalog.specialists
    [refused] = catalog.refused
    assert refused.artifact == uri and "changed after `kolm publish`" in refused.reason


# ----- fit checkpoints ---------------------------------------------------------------------------


def test_a_fit_checkpoints_to_s3_and_a_rerun_resumes_from_there(ray_session, tiny_base, s3_bucket, tmp_path,
                                                                  monkeypatch):
    from kolm_ray.train.base import resolve_base
    from kolm_ray.train.config import FitConfig
    from kolm_ray.train.fit import fit, run_name

    base = resolve_base(str(tiny_base))
    pairs = [(i, o) for i, o in ROUTING_REFS] * 2
    cfg = FitConfig(max_steps=40, checkpoint_every=5, batch_size=2, max_length=64, max_failures=0, seed=5,
                    lora_r=4, lora_alpha=8)
    storage = f"{s3_bucket}/train"
    # The worker is SIGKILLed from outside once Ray Train has registered a checkpoint of step 20
    # or later. It collects reported checkpoints every 2 s, so one or two more may be in the bucket
    # that its snapshot does not name; the re-run checks them against their manifests.
    with kill_fit_worker(storage, after_step=20) as killer:
        with pytest.raises(KolmRuntimeError, match=f"kept under {storage}/fit-"):
            fit(base, SPECIALIST_TASK, pairs, cfg, storage=storage, dest=tmp_path / "adapter")
    assert killer.killed, killer.why_not()
    name = run_name(base, SPECIALIST_TASK, pairs, cfg)
    assert any(k.startswith(f"{name}/step-") and k.endswith("/state.json") for k in open_store(storage).list(name))
    result = fit(base, SPECIALIST_TASK, pairs, cfg, storage=storage, dest=tmp_path / "adapter")
    assert result.resumed_from_step >= 5 and result.resumed_from_step % 5 == 0, result
    assert result.steps == 40 and result.steps_this_run == 40 - result.resumed_from_step
    assert [s for s, _ in result.loss_curve] == list(range(1, 41))  # one curve across both runs
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert f"{name}/step-000040/state.json" in open_store(storage).list(name)


# ----- errors name the URI -----------------------------------------------------------------------


def test_a_missing_bucket_is_an_input_error_naming_it(s3_server):
    store = open_store("s3://kolm-no-such-bucket/prefix")
    for op in (store.check, lambda: store.write_bytes("k", b"x"), lambda: store.put_if_absent("k", b"x"),
               lambda: reserve_version(store, "tldr"), store.list):
        with pytest.raises(InputError, match="bucket 'kolm-no-such-bucket' does not exist") as e:
            op()
        assert "s3://kolm-no-such-bucket/prefix" in str(e.value)


def test_no_credentials_is_a_runtime_error_saying_what_to_set(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(KolmRuntimeError, match="no S3 credentials: set AWS_ACCESS_KEY_ID") as e:
        reserve_version(f"{s3_bucket}/artifacts", "tldr")
    assert f"{s3_bucket}/artifacts/.reserved/tldr-1.0" in str(e.value)
