"""kolm_ray.testing.cluster.free_port: a node's components each get a port of their own."""

from __future__ import annotations

import socket

from kolm_ray.testing import cluster


def test_a_port_is_never_handed_out_twice_even_when_the_kernel_offers_it_again(monkeypatch):
    # The kernel may give a just-closed ephemeral port to the next bind; `ray start` then
    # refuses two components on one port (seen in CI: metrics_export == runtime_env_agent).
    offered = iter([41001, 41001, 41002, 41001, 41003])

    class Sock:
        def __init__(self, *a):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def bind(self, addr):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(cluster, "_HANDED_OUT", set())
    monkeypatch.setattr(socket, "socket", Sock)
    assert [cluster.free_port() for _ in range(3)] == [41001, 41002, 41003]

