"""Shared fixtures: one local Ray instance per session, a seeded RNG, KOLM_HOME in a temp dir,
and a factory for the local Messages API server with the real SDK pointed at it."""

from __future__ import annotations

import os
import random
import secrets
from pathlib import Path

# Before anything imports Ray: Ray reads its auth settings once, at import. The session's head
# node (fixture `ray_head`) is started with this token and every driver here presents it.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "routing"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(1234)


@pytest.fixture(autouse=True)
def kolm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kolm-home"
    monkeypatch.setenv("KOLM_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def ray_head():
    """One `ray start --head` node (token auth on) for the whole session: in-process tests join
    it as drivers and `ray job submit` tests submit to its job server, so one machine never runs
    two clusters side by side."""
    from kolm_ray.testing.cluster import LocalHead

    head = LocalHead(token=os.environ["RAY_AUTH_TOKEN"]).start()
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This process joined to the session's head node (Ray starts in seconds, not milliseconds)."""
    import ray

    from kolm_ray.cluster import connect

    os.environ["RAY_ADDRESS"] = ray_head.address  # subprocesses (CLI runs) join it too
    connect(ray_head.address)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    """Serve's one HTTP port on the session's cluster (Serve keeps the first port it starts on)."""
    from kolm_ray.testing.cluster import free_port

    return free_port()


@pytest.fixture
def messages_api(monkeypatch: pytest.MonkeyPatch):
    """Factory: start a local Messages API server and point the SDK at it by environment."""
    from kolm_ray.testing.messages_api import MessagesAPIServer

    servers = []

    def start(responder, **kwargs) -> MessagesAPIServer:
        srv = MessagesAPIServer(responder, **kwargs).start()
        servers.append(srv)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.url)
        # A fresh key per server: the cluster-wide quota actor is per key (and detached: it
        # outlives a test), so tests don't share one. Not the port alone: a later server may get
        # an earlier one's port.
        monkeypatch.setenv("ANTHROPIC_API_KEY", f"test-key-{srv.port}-{secrets.token_hex(4)}")
        return srv

    yield start
    for srv in servers:
        srv.stop()


def cli_json(result):
    """The JSON document a `--json` command printed (a click ``Result``). The test process is a
    Ray driver: Ray relays its raylet's warnings ("N PYTHON worker processes have been
    started...") to it whenever they come, so a line of them may precede or follow the document
    in the captured output. Parsed from the first line that opens an object or array."""
    import json
    import re

    text = result.stdout
    found = re.search(r"^[{\[]", text, re.M)
    assert found, f"no JSON document in the output:\n{result.output[-3000:]}"
    return json.JSONDecoder().raw_decode(text, found.start())[0]


def write_jsonl(path: Path, rows, with_output=True) -> Path:
    path.write_text("\n".join(r.to_json(with_output=with_output) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random-init Qwen2 with an offline tokenizer, built once per session."""
    from kolm_ray.train.base import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


ROUTING_TASK = "Route the customer message to one team: billing, account or bug."
ROUTING_REFS = [("I was charged twice for my invoice", "billing"), ("I cannot log in to my account", "account"),
                ("The app crashes when I open settings", "bug"), ("Refund my last payment please", "billing")]


@pytest.fixture(scope="session")
def specialists(tiny_base, tmp_path_factory) -> dict:
    """Two signed Specialists on the tiny base (different random adapters), a tampered copy of a
    third, and the key that signed them: for serving and compare tests, without a compile."""
    from kolm_ray.signing import default_key_paths
    from kolm_ray.testing.artifacts import make_artifact

    home = tmp_path_factory.mktemp("specialists-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOLM_HOME", str(home))
        store = home / "artifacts"
        route = make_artifact(store, tiny_base, "route", (1, 0), task=ROUTING_TASK, references=ROUTING_REFS, seed=1)
        route2 = make_artifact(store, tiny_base, "route", (1, 1), task=ROUTING_TASK, references=ROUTING_REFS, seed=3)
        tldr = make_artifact(store, tiny_base, "tldr", (1, 0), task="Summarize the message in ten words.",
                             references=ROUTING_REFS, seed=2, max_new_tokens=12)
        evil = make_artifact(store, tiny_base, "evil", (1, 0), task=ROUTING_TASK, references=ROUTING_REFS, seed=4)
        public_key = default_key_paths()[1]
    tampered = _flip_adapter_byte(evil)
    return {"route": route, "route2": route2, "tldr": tldr, "tampered": tampered, "home": home,
            "public_key": public_key}


def _flip_adapter_byte(artifact: Path) -> Path:
    """A copy of ``artifact`` with one byte of its adapter weights changed, signature kept."""
    import io
    import tarfile

    out = artifact.with_name("tampered-" + artifact.name)
    with tarfile.open(artifact) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if data is not None and m.name.endswith("adapter_model.safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(m, None if data is None else io.BytesIO(data))
    artifact.unlink()
    return out


def _recorded_teacher():
    import json

    from kolm_ray.testing.messages_api import MessagesAPIServer, replay_responder

    answers = {}
    for line in (EXAMPLE / "recorded-teacher.jsonl").read_text().splitlines():
        rec = json.loads(line)
        answers[rec["input"]] = rec["output"]
    return MessagesAPIServer(replay_responder(answers)).start()


@pytest.fixture(scope="session")
def compiled(ray_session, tiny_base, tmp_path_factory):
    """One compile of the bundled example (recorded teacher, tiny base), shared by every test
    that needs a real Specialist: compile, compare, publish."""
    from click.testing import CliRunner

    from kolm_ray.cli import cli

    home = tmp_path_factory.mktemp("home")
    work = tmp_path_factory.mktemp("work")
    srv = _recorded_teacher()
    env = {"KOLM_HOME": str(home), "ANTHROPIC_BASE_URL": srv.url, "ANTHROPIC_API_KEY": "recorded"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        args = ["compile", "--task-file", str(EXAMPLE / "task.txt"), "--examples", str(EXAMPLE / "examples.jsonl"),
                "--eval", str(EXAMPLE / "holdout.jsonl"), "--base", str(tiny_base), "--name", "routing",
                "--work-dir", str(work), "--epochs", "8", "--lr", "3e-3"]
        res = CliRunner().invoke(cli, [*args, "--gate", "K=60"])
    yield {"res": res, "home": home, "work": work, "args": args, "env": env, "server": srv}
    srv.stop()


