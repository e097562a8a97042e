"""Test support: run one function in many threads released at once (for create-if-absent and
allocation races)."""

from __future__ import annotations

import threading
from typing import Any, Callable


def race(n: int, fn: Callable[[int], Any]) -> list:
    """``fn(i)`` in ``n`` threads released at once; their results in thread order. The first
    exception a thread raised is re-raised here, in the test's thread."""
    barrier = threading.Barrier(n)
    out: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out
