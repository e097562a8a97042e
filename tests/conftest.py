"""Shared fixtures: one local Ray instance per session, a seeded RNG, KOLM_HOME in a temp dir,
and a factory for the local Messages API server with the real SDK pointed at it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(1234)


@pytest.fixture(autouse=True)
def kolm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kolm-home"
    monkeypatch.setenv("KOLM_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (Ray starts in seconds, not milliseconds)."""
    import ray

    from kolm_ray.cluster import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(None)
    yield ray
    ray.shutdown()


@pytest.fixture
def messages_api(monkeypatch: pytest.MonkeyPatch):
    """Factory: start a local Messages API server and point the SDK at it by environment."""
    from kolm_ray.testing.messages_api import MessagesAPIServer

    servers = []

    def start(responder, **kwargs) -> MessagesAPIServer:
        srv = MessagesAPIServer(responder, **kwargs).start()
        servers.append(srv)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.url)
        # A fresh key per server: the cluster-wide quota actor is per key, so tests don't share one.
        monkeypatch.setenv("ANTHROPIC_API_KEY", f"test-key-{srv.port}")
        return srv

    yield start
    for srv in servers:
        srv.stop()


def write_jsonl(path: Path, rows, with_output=True) -> Path:
    path.write_text("\n".join(r.to_json(with_output=with_output) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random-init Qwen2 with an offline tokenizer, built once per session."""
    from kolm_ray.train.base import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))
