"""Joining a Ray cluster: the one at ``--address`` / ``RAY_ADDRESS``, else a local instance.

Inside a ``ray job submit`` entrypoint Ray sets ``RAY_ADDRESS`` and the job joins its cluster.
"""

from __future__ import annotations

import logging
import os

import ray

from kolm_ray.errors import KolmRuntimeError


def connect(address: str | None = None) -> None:
    """Join (or start) Ray once per process; quiet Ray Data's own progress bars.

    Raises:
        KolmRuntimeError: the cluster at ``address`` cannot be reached.
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False if address is None else None)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KolmRuntimeError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
