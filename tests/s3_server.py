"""A local S3 server for the object-storage tests: moto's S3 app in server mode (what
``moto.server.ThreadedMotoServer`` runs) on a loopback port bound at import, started by the tests themselves.

One request at a time: moto checks ``If-None-Match: *`` and then stores the object in two steps,
so two request threads could both pass the check, where real S3 makes the conditional PUT
atomic. Serializing the app gives the tests S3's guarantee (the races stay real on the client
side: many threads and processes send at once).

Import the fixtures into a test module (``from tests.s3_server import s3_bucket, s3_server``).

The endpoint and dummy credentials are set in this process's environment when this module is
imported, that is at collection, before any test runs: the session's Ray head node starts later
and its workers (Ray Data actors, Ray Train workers) inherit that environment, as a real
cluster's nodes read the standard AWS variables of their own. ``AWS_EC2_METADATA_DISABLED`` and
the empty config paths keep the SDKs from looking for other credentials (no instance metadata
on this network, no developer's real ``~/.aws``). The server itself starts with the first test
that asks for ``s3_server``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from typing import Iterator

import pytest

# Bound (and listening) now, served from when the first test asks: the port is held all along,
# so nothing else started in between (a stand-in teacher on port 0, Ray) can take it.
_LISTENER = socket.create_server(("127.0.0.1", 0), backlog=128)
PORT = _LISTENER.getsockname()[1]
ENDPOINT = f"http://127.0.0.1:{PORT}"
ENV = {
    "AWS_ENDPOINT_URL": ENDPOINT,
    "AWS_ACCESS_KEY_ID": "kolm-test",
    "AWS_SECRET_ACCESS_KEY": "kolm-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
os.environ.update(ENV)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)
os.environ.pop("AWS_PROFILE", None)


class _OneAtATime:
    """A WSGI app that handles one request at a time (the response is read inside the lock)."""

    def __init__(self, app) -> None:
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            return list(self.app(environ, start_response))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The running server's endpoint URL."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = make_server("127.0.0.1", PORT, _OneAtATime(DomainDispatcherApplication(create_backend_app)),
                         threaded=True, request_handler=MotoRequestHandler, fd=_LISTENER.fileno())
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="moto-s3")
    thread.start()
    yield ENDPOINT
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket for one test: ``s3://kolm-test-<hex>``."""
    import boto3

    for k, v in ENV.items():  # a test that removed one (no credentials) must not leak into the next
        monkeypatch.setenv(k, v)
    name = f"kolm-test-{secrets.token_hex(4)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
