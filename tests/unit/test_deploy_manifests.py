"""deploy/kubernetes/: every manifest is a KubeRay ray.io/v1 object its CRD accepts (a trimmed copy
of the schema in tests/assets/kuberay/), its clusters are shaped as the README says, its
entrypoints name files in this repository with arguments their own parsers accept, and the
RayService's serveConfigV2 passes Ray Serve's own schema, imports, and is exactly what the
`kolm serve --emit-config` command written above it produces. Each check is also run on a
broken copy of a manifest, one test per break, so none of them can pass vacuously."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import runpy
import shlex
import sys
from pathlib import Path
from unittest import mock

import click
import jsonschema
import pytest
import ray
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from kolm_ray.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parents[1] / "assets" / "kuberay"
APP_DIR = "/app"  # where deploy/Dockerfile puts the repository's jobs/
STORE = "/mnt/kolm"  # where the manifests mount kolm's store (KOLM_HOME)
RAY_KINDS = {"RayJob": "rayjob", "RayService": "rayservice"}


# ---- reading the manifests -------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def the(kind: str, name: str) -> dict:
    """The one object of ``kind`` in deploy/kubernetes/``name``, as a copy a test may break."""
    [doc] = [d for d in docs(DEPLOY / name) if d["kind"] == kind]
    return copy.deepcopy(doc)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def pod_templates(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"]["template"])] + [
        (f"worker group {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay's rule: the first container runs Ray


# ---- check: the CRD schema -------------------------------------------------------------------

def _closed(node):
    """The schema as the API server applies it: an object with listed properties takes no others
    (unknown fields are pruned, or refused under kubectl's default strict field validation)."""
    if isinstance(node, list):
        return [_closed(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_problems(doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in RAY_KINDS:
        return [f"kind {kind!r}: deploy/kubernetes holds KubeRay objects ({', '.join(RAY_KINDS)})"]
    crd = json.loads((SCHEMAS / f"{RAY_KINDS[kind]}.v1.schema.json").read_text())
    if doc.get("apiVersion") != crd["apiVersion"]:
        return [f"apiVersion {doc.get('apiVersion')!r}, not {crd['apiVersion']}"]
    validator = jsonschema.Draft202012Validator(_closed(crd["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


# ---- check: the Ray cluster's shape ----------------------------------------------------------

def cluster_problems(doc: dict) -> list[str]:
    cluster = cluster_spec(doc)
    problems = []
    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {cluster.get('rayVersion')!r}: kolm_ray pins Ray {ray.__version__}")
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode is not token: KubeRay would start the cluster without Ray's token auth")
    if cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("the head offers CPUs: fits, evals and replicas could land on it (rayStartParams num-cpus '0')")
    gpu_groups = 0
    for where, template in pod_templates(cluster):
        container = ray_container(template)
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        gpus, asked = limits.get("nvidia.com/gpu"), requests.get("nvidia.com/gpu")
        if where == "head" and (gpus or asked):
            problems.append("the head asks for a GPU")
        elif asked is not None and asked != gpus:  # Kubernetes wants a GPU limit equal to the request
            problems.append(f"{where}: nvidia.com/gpu request {asked!r} but limit {gpus!r}")
        elif gpus and int(gpus) >= 1:
            gpu_groups += 1
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if env.get("KOLM_HOME") != STORE or STORE not in mounts:
            problems.append(f"{where}: KOLM_HOME is not the store mounted at {STORE}: every node reads and "
                            "writes it (artifacts, checkpoints, receipts)")
    if not gpu_groups:
        problems.append("no GPU worker group")
    return problems


# ---- check: entrypoints ------------------------------------------------------------------------

_CLICK_INVOKE = click.Command.invoke
_ARGPARSE_PARSE = argparse.ArgumentParser.parse_args


class _Parsed(BaseException):  # not an Exception: the CLI turns those into error lines
    """Raised where the entrypoint's arguments have parsed and its work would begin."""


def _stop_at_the_command(self: click.Command, ctx: click.Context):
    if isinstance(self, click.Group):
        return _CLICK_INVOKE(self, ctx)
    raise _Parsed(ctx.command_path)


def _stop_after_parsing(self: argparse.ArgumentParser, *args, **kwargs):
    _ARGPARSE_PARSE(self, *args, **kwargs)
    raise _Parsed(self.prog)


def _parse_only(run) -> tuple[str | None, str | None]:
    """Run ``run()`` up to the point where its click command or argparse parser has accepted the
    arguments: (the command reached, None), or (None, what the parser said)."""
    out = io.StringIO()
    with mock.patch.object(click.Command, "invoke", _stop_at_the_command), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", _stop_after_parsing), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            run()
        except _Parsed as reached:
            return str(reached), None
        except SystemExit as e:
            return None, f"exit {e.code}: {out.getvalue().strip()}"
    return None, "it ran without parsing its arguments with click or argparse"


def run_entrypoint(entrypoint: str) -> tuple[str | None, list[str]]:
    """Parse ``entrypoint`` as its driver would, stopping before any work: the command it reaches
    (``kolm receipts verify``, ``jobs/compile.py compile``, ``nightly.py``) and its problems."""
    words = shlex.split(entrypoint)
    quoted = [w for w in words if shlex.quote(w) != w]
    if quoted:  # KubeRay's submitter runs it through bash, then `ray job submit` joins the words
        return None, [f"words that need quoting reach the driver split or unquoted: {quoted}"]
    if words[0] == "kolm":
        reached, said = _parse_only(lambda: cli.main(words[1:], prog_name="kolm"))
        return reached, [f"`{' '.join(words[:2])}`: {said}"] if said else []
    if words[0] != "python" or len(words) < 2:
        return None, [f"not `python FILE ...` or `kolm COMMAND ...`: {entrypoint!r}"]
    script = words[1]
    if not script.startswith(APP_DIR + "/"):
        return None, [f"{script}: not under {APP_DIR}, where the image has the repository's files"]
    local = ROOT / script.removeprefix(APP_DIR + "/")
    if not local.is_file():
        return None, [f"{script}: no {local.relative_to(ROOT)} in the repository"]
    # Every jobs/*.py parses its arguments first, with click or argparse: the run stops there.
    with mock.patch.object(sys, "argv", [str(local), *words[2:]]):
        reached, said = _parse_only(lambda: runpy.run_path(str(local), run_name="__main__"))
    return reached, [f"{script}: {said}"] if said else []


def entrypoint_problems(entrypoint: str) -> list[str]:
    return run_entrypoint(entrypoint)[1]


# ---- check: serveConfigV2 ----------------------------------------------------------------------

def serve_config_problems(text: str) -> list[str]:
    from ray._common.utils import import_attr  # how Serve itself resolves import_path
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as e:
        return [f"not a Serve config: {e}"]
    problems = []
    for app in schema.applications:
        try:
            builder = import_attr(app.import_path)
        except (ImportError, AttributeError, ValueError) as e:
            problems.append(f"{app.name}: import_path {app.import_path!r} does not resolve ({e})")
            continue
        if not callable(builder):
            problems.append(f"{app.name}: import_path {app.import_path!r} is not an application builder")
    return problems


def serve_port_problems(doc: dict) -> list[str]:
    http = yaml.safe_load(doc["spec"]["serveConfigV2"]).get("http_options", {})
    problems = [] if http.get("host") == "0.0.0.0" else [f"http_options.host {http.get('host')!r}: the Service "
                                                           "cannot reach a proxy that listens on loopback"]
    for where, template in pod_templates(cluster_spec(doc)):
        ports = {p.get("name"): p["containerPort"] for p in ray_container(template).get("ports", [])}
        if ports.get("serve") != http.get("port", 8000):
            problems.append(f"{where}: container port 'serve' {ports.get('serve')} is not Serve's port "
                            f"{http.get('port', 8000)}")
    return problems


def documented_invocation(path: Path) -> tuple[dict[str, str], list[str]]:
    """The `VAR=... kolm serve ARGS` command in the manifest's comments: env and ARGS."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    starts = [i for i, line in enumerate(lines) if re.match(r"^(\w+=\S+\s+)*kolm serve\s", line)]
    assert len(starts) == 1, f"{path.name}: write the one `kolm serve ... --emit-config` command in a comment"
    command = []
    for line in lines[starts[0]:]:
        command.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    words = shlex.split(" ".join(command))
    env = {}
    while "=" in words[0]:
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    return env, words[2:]


def _swap_prefix(value, old: str, new: str):
    if isinstance(value, dict):
        return {k: _swap_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap_prefix(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old):]
    return value


def emit_config(env: dict[str, str], args: list[str], home: Path, out: Path) -> dict:
    """Run the documented `kolm serve ... --emit-config` with the store at ``home`` instead of
    STORE, and return the config it writes with the store's paths put back."""
    args = list(args)
    i = args.index("--emit-config")
    args[i + 1] = str(out)
    res = CliRunner().invoke(cli, ["serve", *_swap_prefix(args, STORE, str(home))],
                             env=_swap_prefix(env, STORE, str(home)))
    assert res.exit_code == 0, f"the documented `kolm serve` failed: {res.output}"
    written = json.loads(out.read_text())
    return _swap_prefix(_swap_prefix(written, str(home.resolve()), STORE), str(home), STORE)


def drift(manifest, emitted, where: str = "") -> list[str]:
    if isinstance(manifest, dict) and isinstance(emitted, dict):
        return [d for k in sorted(set(manifest) | set(emitted), key=str)
                for d in (drift(manifest.get(k, "<missing>"), emitted.get(k, "<missing>"), f"{where}.{k}"))]
    if isinstance(manifest, list) and isinstance(emitted, list) and len(manifest) == len(emitted):
        return [d for i, (m, e) in enumerate(zip(manifest, emitted)) for d in drift(m, e, f"{where}[{i}]")]
    return [] if manifest == emitted else [f"{where.lstrip('.')}: manifest {manifest!r}, kolm serve writes {emitted!r}"]


@pytest.fixture(scope="module")
def emitted(specialists, tmp_path_factory) -> dict:
    """What the RayService's documented command writes, on the session's signed Specialists
    (tests/conftest.py: route-1.0 and tldr-1.0 under a store with kolm's key)."""
    env, args = documented_invocation(DEPLOY / "rayservice.yaml")
    return emit_config(env, args, specialists["home"], tmp_path_factory.mktemp("emit") / "serve.json")


# ---- the manifests as written --------------------------------------------------------------------

def test_deploy_kubernetes_holds_the_compile_and_nightly_rayjobs_and_a_rayservice():
    kinds = {p.name: [d["kind"] for d in docs(p)] for p in manifest_files()}
    assert kinds == {"rayjob-compile.yaml": ["RayJob"], "rayjob-nightly.yaml": ["RayJob"],
                     "rayservice.yaml": ["RayService"]}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_is_accepted_by_its_kuberay_crd_schema(path):
    for doc in docs(path):
        assert crd_problems(doc) == []


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_cluster_has_a_cpu_only_head_gpu_workers_token_auth_and_the_store(path):
    for doc in docs(path):
        assert cluster_problems(doc) == []


@pytest.mark.parametrize("name", ["rayjob-compile.yaml", "rayjob-nightly.yaml"])
def test_every_entrypoint_names_a_file_in_the_repo_with_arguments_it_accepts(name):
    assert entrypoint_problems(the("RayJob", name)["spec"]["entrypoint"]) == []


def test_the_entrypoints_reach_kolm_compile_and_the_nightlys_own_parser():
    assert run_entrypoint(the("RayJob", "rayjob-compile.yaml")["spec"]["entrypoint"]) == (
        "jobs/compile.py compile", [])
    assert run_entrypoint(the("RayJob", "rayjob-nightly.yaml")["spec"]["entrypoint"]) == ("nightly.py", [])


def test_serve_config_v2_passes_ray_serves_own_schema_and_its_import_path_resolves():
    assert serve_config_problems(the("RayService", "rayservice.yaml")["spec"]["serveConfigV2"]) == []


def test_serve_config_v2_listens_on_the_port_the_containers_expose():
    assert serve_port_problems(the("RayService", "rayservice.yaml")) == []


def test_serve_config_v2_is_what_kolm_serve_emit_config_writes(emitted):
    manifest = yaml.safe_load(the("RayService", "rayservice.yaml")["spec"]["serveConfigV2"])
    assert drift(manifest, emitted) == [], "paste this as serveConfigV2:\n" + yaml.safe_dump(emitted, sort_keys=False)


def test_the_dockerfile_puts_jobs_where_the_entrypoints_look_on_the_pinned_ray():
    lines = [line.split() for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert ["WORKDIR", APP_DIR] in lines
    assert any(w[0] == "COPY" and w[-2:] == ["jobs/", "jobs/"] for w in lines)
    assert any(w[0] == "FROM" and w[1].startswith(f"rayproject/ray:{ray.__version__}-") for w in lines)


# ---- one broken copy per check ---------------------------------------------------------------------

def test_a_misspelt_rayjob_field_is_rejected_by_the_crd():
    job = the("RayJob", "rayjob-compile.yaml")
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in p for p in crd_problems(job))


def test_a_field_misplaced_in_a_pod_template_is_rejected_by_the_crd():
    svc = the("RayService", "rayservice.yaml")
    template = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    template["spec"]["env"] = template["spec"]["containers"][0].pop("env")  # env is a container's
    assert any("'env' was unexpected" in p for p in crd_problems(svc))


def test_a_wrongly_typed_field_is_rejected_by_the_crd():
    job = the("RayJob", "rayjob-nightly.yaml")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in p for p in crd_problems(job))


def test_an_old_api_version_is_rejected():
    job = the("RayJob", "rayjob-compile.yaml")
    job["apiVersion"] = "ray.io/v1alpha1"
    assert crd_problems(job) == ["apiVersion 'ray.io/v1alpha1', not ray.io/v1"]


def test_an_entrypoint_naming_a_missing_file_is_rejected():
    assert entrypoint_problems("python /app/jobs/compiles.py --examples x") == [
        "/app/jobs/compiles.py: no jobs/compiles.py in the repository"]


def test_an_entrypoint_outside_the_image_app_dir_is_rejected():
    assert "not under /app" in entrypoint_problems("python jobs/compile.py --examples x")[0]


def test_a_compile_entrypoint_with_an_unknown_option_is_rejected():
    entrypoint = the("RayJob", "rayjob-compile.yaml")["spec"]["entrypoint"].replace("--gate", "--gates")
    [problem] = entrypoint_problems(entrypoint)
    assert "exit 2" in problem and "--gates" in problem


def test_a_compile_entrypoint_missing_a_required_option_is_rejected():
    entrypoint = re.sub(r"--examples \S+", "", the("RayJob", "rayjob-compile.yaml")["spec"]["entrypoint"])
    [problem] = entrypoint_problems(entrypoint)
    assert "exit 2" in problem and "--examples" in problem


def test_a_nightly_entrypoint_with_an_unknown_option_is_rejected():
    entrypoint = the("RayJob", "rayjob-nightly.yaml")["spec"]["entrypoint"] + " --env prod"
    [problem] = entrypoint_problems(entrypoint)
    assert "exit 2" in problem and "unrecognized arguments: --env prod" in problem


def test_an_entrypoint_naming_a_kolm_subcommand_that_does_not_exist_is_rejected():
    [problem] = entrypoint_problems("kolm compiles --examples x")
    assert "exit 2" in problem and "No such command 'compiles'" in problem


def test_a_kolm_entrypoint_with_a_real_subcommand_passes():
    assert run_entrypoint("kolm receipts verify --store /mnt/kolm") == ("kolm receipts verify", [])


def test_an_entrypoint_with_a_quoted_task_is_rejected():
    [problem] = entrypoint_problems('python /app/jobs/compile.py "draft a TLDR" --examples x --eval y --base b')
    assert "need quoting" in problem and "draft a TLDR" in problem


def test_a_serve_config_with_a_malformed_port_is_rejected_by_ray_serves_schema():
    config = yaml.safe_load(the("RayService", "rayservice.yaml")["spec"]["serveConfigV2"])
    config["http_options"]["port"] = "eight thousand"
    [problem] = serve_config_problems(yaml.safe_dump(config))
    assert problem.startswith("not a Serve config") and "port" in problem


def test_a_serve_config_without_applications_is_rejected_by_ray_serves_schema():
    config = yaml.safe_load(the("RayService", "rayservice.yaml")["spec"]["serveConfigV2"])
    del config["applications"]
    assert serve_config_problems(yaml.safe_dump(config))[0].startswith("not a Serve config")


def test_a_serve_config_whose_import_path_does_not_resolve_is_rejected():
    config = yaml.safe_load(the("RayService", "rayservice.yaml")["spec"]["serveConfigV2"])
    config["applications"][0]["import_path"] = "kolm_ray.serve.app:app_bulider"
    [problem] = serve_config_problems(yaml.safe_dump(config))
    assert "does not resolve" in problem


def test_a_serve_config_that_drifted_from_emit_config_is_rejected(emitted):
    config = yaml.safe_load(the("RayService", "rayservice.yaml")["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["model"]["num_gpus"] = 0.5
    assert drift(config, emitted) == ["applications[0].args.model.num_gpus: manifest 0.5, kolm serve writes 1.0"]


def test_a_serve_config_serving_an_artifact_the_command_does_not_is_rejected(emitted):
    config = yaml.safe_load(the("RayService", "rayservice.yaml")["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["artifacts"].append("/mnt/kolm/artifacts/route-1.1.kolm")
    assert drift(config, emitted) == ["applications[0].args.artifacts: manifest "
                                      f"{config['applications'][0]['args']['artifacts']!r}, kolm serve writes "
                                      f"{emitted['applications'][0]['args']['artifacts']!r}"]


def test_a_serve_port_the_containers_do_not_expose_is_rejected():
    svc = the("RayService", "rayservice.yaml")
    svc["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace("port: 8000", "port: 9000")
    assert len(serve_port_problems(svc)) == 2  # the head's and the GPU group's


def test_a_serve_config_listening_on_loopback_is_rejected():
    svc = the("RayService", "rayservice.yaml")
    svc["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace("host: 0.0.0.0", "host: 127.0.0.1")
    assert "loopback" in serve_port_problems(svc)[0]


def test_a_gpu_group_without_a_gpu_limit_is_rejected():
    job = the("RayJob", "rayjob-compile.yaml")
    del ray_container(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"])["resources"]["limits"][
        "nvidia.com/gpu"]
    assert cluster_problems(job) == ["worker group gpu: nvidia.com/gpu request '1' but limit None", "no GPU worker group"]


def test_a_head_that_offers_cpus_is_rejected():
    job = the("RayJob", "rayjob-nightly.yaml")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"] = {}
    assert [p for p in cluster_problems(job) if "num-cpus" in p]


def test_a_ray_version_other_than_the_pinned_one_is_rejected():
    svc = the("RayService", "rayservice.yaml")
    svc["spec"]["rayClusterConfig"]["rayVersion"] = "2.52.0"
    assert cluster_problems(svc) == [f"rayVersion '2.52.0': kolm_ray pins Ray {ray.__version__}"]


def test_a_cluster_without_token_auth_is_rejected():
    job = the("RayJob", "rayjob-compile.yaml")
    del job["spec"]["rayClusterSpec"]["authOptions"]
    assert [p for p in cluster_problems(job) if "token" in p]


def test_a_worker_without_the_store_is_rejected():
    job = the("RayJob", "rayjob-compile.yaml")
    del ray_container(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"])["volumeMounts"]
    assert [p for p in cluster_problems(job) if p.startswith("worker group gpu: KOLM_HOME")]
