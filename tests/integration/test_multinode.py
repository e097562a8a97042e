"""A two-node cluster on this one machine: `ray start --head` plus `ray start --address`, one
CPU each. A compile runs whole with its fit and eval on the second node while something else
(a stand-in for a Serve replica) holds the head's CPU; killing the second node mid-fit resumes
the fit from its checkpoint on the head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE, ROOT, _recorded_teacher

PY = sys.executable
KOLM = str(Path(sys.executable).parent / "kolm")

HOLD_HEAD = """
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
head = ray.get_runtime_context().get_node_id()
@ray.remote(num_cpus=1)
class Holder:
    def node(self):
        return ray.get_runtime_context().get_node_id()
h = Holder.options(name="holder", namespace="test", lifetime="detached",
                   scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
assert ray.get(h.node.remote()) == head
print(head)
"""
RELEASE_HEAD = """
import ray
ray.init()
ray.kill(ray.get_actor("holder", namespace="test"))
"""
PLACEMENT = """
import json, ray
from ray.util.state import list_actors, list_tasks
ray.init()
print(json.dumps({
    "train_workers": [(a.node_id, a.state) for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)],
    "eval_tasks": [t.node_id for t in list_tasks(filters=[("name", "=", "_generate_all")], detail=True, limit=1000) if t.node_id],
}))
"""


def _driver(env: dict[str, str], code: str) -> str:
    res = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""


@pytest.fixture(scope="module")
def two_nodes(tiny_base, tmp_path_factory):
    from kolm_ray.testing.cluster import LocalHead, LocalWorker

    head = LocalHead(num_cpus=1, token=os.environ["RAY_AUTH_TOKEN"]).start()
    worker = LocalWorker(head, num_cpus=1).start()
    srv = _recorded_teacher()
    home = tmp_path_factory.mktemp("multinode-home")
    env = {**os.environ, **head.env, "RAY_ADDRESS": head.address, "KOLM_HOME": str(home),
           "ANTHROPIC_BASE_URL": srv.url, "ANTHROPIC_API_KEY": "recorded-multinode"}
    for _ in range(60):  # the second node registers some seconds after `ray start` returns
        nodes = json.loads(_driver(env, "import json, ray; ray.init(); print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"))
        if len(nodes) == 2:
            break
        time.sleep(1)
    assert len(nodes) == 2
    yield {"head": head, "worker": worker, "env": env, "home": home, "base": tiny_base, "server": srv}
    worker.stop()
    head.stop()
    srv.stop()


def _compile_args(cluster, work: Path, name: str, *extra: str) -> list[str]:
    return [KOLM, "compile", "--task-file", str(EXAMPLE / "task.txt"), "--examples", str(EXAMPLE / "examples.jsonl"),
            "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", str(cluster["base"]), "--name", name,
            "--work-dir", str(work), *extra]


def _manifest_files(artifact: Path) -> dict[str, dict]:
    with tarfile.open(artifact) as tar:
        return {Path(m.name).name: json.loads(tar.extractfile(m).read())
                for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")}


def test_a_compile_runs_whole_with_its_fit_and_eval_on_the_second_node(two_nodes, tmp_path):
    env = two_nodes["env"]
    head_node = _driver(env, HOLD_HEAD)
    try:
        res = subprocess.run(_compile_args(two_nodes, tmp_path / "work", "placed", "--epochs", "1", "--n", "40"),
                             env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        _driver(env, RELEASE_HEAD)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "admitted · 1 CPU per worker" in res.stdout
    placed = json.loads(_driver(env, PLACEMENT))
    workers = {node for node, _ in placed["train_workers"]}
    assert workers and head_node not in workers, placed  # the fit ran on the second node
    assert placed["eval_tasks"] and head_node not in set(placed["eval_tasks"]), placed
    artifact = Path(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("artifact ")))
    assert artifact.is_file()


def test_killing_the_second_node_mid_fit_resumes_the_fit_on_the_head(two_nodes, tmp_path):
    env = two_nodes["env"]
    _driver(env, HOLD_HEAD)  # the fit must start on the second node
    work = tmp_path / "work"
    proc = subprocess.Popen(_compile_args(two_nodes, work, "survivor", "--epochs", "40", "--checkpoint-every", "20",
                                          "--max-failures", "3"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        # Ray Train's controller writes its snapshot once a checkpoint is registered (a step-*
        # folder alone may still be half-persisted): from then on a resume starts past zero.
        registered = lambda: list((work / "train").glob("*/checkpoint_manager_snapshot.json"))  # noqa: E731
        deadline = time.time() + 300
        while not registered() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert registered(), "no checkpoint registered before the fit ended"
        two_nodes["worker"].stop()  # the second node is lost mid-fit
        _driver(env, RELEASE_HEAD)  # and the head has room for the replacement worker
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    artifact = Path(next(line.split()[1] for line in out.splitlines() if line.startswith("artifact ")))
    train = _manifest_files(artifact)["train.json"]
    assert train["resumed_from_step"] > 0, train  # resumed from the checkpoint, not from zero
    assert "resumed at step" in out
