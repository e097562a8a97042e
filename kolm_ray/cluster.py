"""Joining a Ray cluster (the one at ``--address`` / ``RAY_ADDRESS``, else a local instance),
and sizing a stage's workers to what its nodes have.

Inside a ``ray job submit`` entrypoint Ray sets ``RAY_ADDRESS`` and the job joins its cluster.
A worker's request must fit on one node: ``ray.available_resources()`` is the whole cluster's,
so sizing reads each node's free resources instead.

Ray's own output (its warnings, the driver's C++ log lines, Ray Data's progress lines) goes to
a log file when the caller names one, so a user sees kolm's stage lines; ``KOLM_VERBOSE=1``
(``kolm -v``) leaves it on the terminal.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import ray

from kolm_ray.errors import KolmRuntimeError


# Where this process's Ray output goes, once ``connect`` has sent it to a file.
ray_log: Path | None = None


def connect(address: str | None = None, log_file: Path | None = None) -> None:
    """Join (or start) Ray once per process; quiet Ray Data's own progress bars. With
    ``log_file`` (default ``$KOLM_HOME/logs/ray.log``), Ray's output from now on goes there
    (see ``quiet_ray_output``).

    Raises:
        KolmRuntimeError: the cluster at ``address`` cannot be reached.
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if log_file is None:
            from kolm_ray.home import state_dir

            log_file = state_dir() / "logs" / "ray.log"
        quiet_ray_output(log_file)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     include_dashboard=False if address is None else None)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KolmRuntimeError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def quiet_ray_output(log_file: Path) -> None:
    """Send this process's file descriptor 2 to ``log_file`` (appended), and give Python's
    ``sys.stderr`` a copy of the terminal's: Ray's C++ log lines and the logging handlers it
    set up at import write to descriptor 2, so they land in the file, while kolm's own messages
    (``click.echo(err=True)``, tracebacks) still reach the user. Once per process; not when
    ``KOLM_VERBOSE`` is set, nor when stderr is not the process's own (a test runner's capture).
    """
    global ray_log
    if ray_log is not None or os.environ.get("KOLM_VERBOSE"):
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return
    import ray.data  # noqa: F401 - its log handlers bind to the stderr they find at import: descriptor 2

    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = io.TextIOWrapper(os.fdopen(terminal, "wb", buffering=0), encoding=sys.stderr.encoding or "utf-8",
                                  errors="backslashreplace", line_buffering=True)
    import faulthandler

    faulthandler.enable(file=sys.stderr)  # a fatal crash in Ray's C++ still shows on the terminal
    # Ray Serve sets its driver-side logger up later, on the stderr it finds then (the terminal):
    # its INFO lines ("Started Serve", "Deleting app") go to the log file instead.
    logging.getLogger("ray.serve").addFilter(_ToLogFile(logging.INFO))
    # The driver prints the cluster's error messages ("(raylet) WARNING: 8 PYTHON worker processes
    # have been started...") to stdout, among the stage lines: to the log file too.
    try:
        from ray._private import worker as ray_worker

        ray_worker.print_to_stdstream = _raylet_lines_to_log_file
    except (ImportError, AttributeError):  # another Ray: its messages stay on the terminal
        pass
    ray_log = log_file


def _raylet_lines_to_log_file(data: dict, ignore_prefix: bool = False) -> None:
    prefix = "" if ignore_prefix else f"({data.get('pid', 'ray')}) "
    _to_log_file("".join(f"{prefix}{line}\n" for line in data.get("lines", [])))


def _to_log_file(text: str) -> None:
    """Descriptor 2 is the log file once ``quiet_ray_output`` ran."""
    os.write(2, text.encode("utf-8", "backslashreplace"))


class _ToLogFile(logging.Filter):
    """Writes a logger's records up to ``level`` to descriptor 2 (the log file) and drops them
    from its own handlers; records above ``level`` (warnings, errors) still reach the user."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self._format = logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- %(message)s").format

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > self.level:
            return True
        _to_log_file(self._format(record) + "\n")
        return False


def free_per_node() -> dict[str, tuple[float, float]]:
    """Free (CPU, GPU) per alive node, now."""
    try:  # Ray has no public per-node view of free resources; this is what `ray status` reads
        from ray._private.state import state

        per_node = state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - an older or newer Ray: fall back to node totals
        per_node = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n.get("Alive")}
    return {node: (float(r.get("CPU", 0)), float(r.get("GPU", 0))) for node, r in per_node.items()}


def cpus_per_worker(workers: int, gpus_per_worker: float = 0.0) -> float:
    """CPUs for each of ``workers`` workers when no queue grant says: as much of one node's free
    cores as lets all of them fit (a lone worker takes the freest node's cores, never the
    cluster's total), at least one core when nothing is free (the request then waits)."""
    from kolm_ray.admission import Demand, QueuePolicy, grant_for

    free = free_per_node()
    most = max((c for c, _ in free.values()), default=1.0)
    grant = grant_for(Demand(workers=workers, cpus_per_worker=max(1.0, float(int(most))), gpus_per_worker=gpus_per_worker),
                      free, QueuePolicy())
    return grant.cpus_per_worker if grant else 1.0
