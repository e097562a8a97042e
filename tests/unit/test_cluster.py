"""cluster.quiet_ray_output: Ray's output to the run's log, kolm's messages to the terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# In a child process: descriptor 2 is the process's own there, as in a `kolm` run.
CHILD = r"""
import logging, os, sys
from pathlib import Path
import click
handler_made_before = logging.StreamHandler()          # as Ray's loggers are, at import
noisy = logging.getLogger("noisy"); noisy.addHandler(handler_made_before); noisy.propagate = False
from kolm_ray.cluster import quiet_ray_output
quiet_ray_output(Path(sys.argv[1]))
os.write(2, b"[E core_worker.cc:2465] C++ noise\n")    # the driver's C++ log lines
noisy.warning("Progress bars disabled")                 # a Python logger of Ray's
serve_logger = logging.getLogger("ray.serve")            # set up after the swap, as Serve does
serve_logger.addHandler(logging.StreamHandler()); serve_logger.setLevel(logging.INFO)
serve_logger.info("Started Serve in namespace")
serve_logger.warning("a replica died")                   # a warning still reaches the user
from ray._private import worker                        # the driver's error listener prints with it
worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes"], "pid": "raylet", "is_err": False},
                          ignore_prefix=False)
click.echo("error: kolm's own message", err=True)        # what the user must see
print("stage line on stdout")
"""


def _run(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "run" / "ray.log"
    res = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, timeout=120,
                         env={**_base_env(), **env})
    return res, log.read_text() if log.exists() else ""


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "KOLM_VERBOSE"}


def test_ray_output_goes_to_the_log_and_kolm_messages_to_the_terminal(tmp_path):
    res, log = _run(tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "a replica died\nerror: kolm's own message\n"
    assert "C++ noise" in log and "Progress bars disabled" in log and "Started Serve" in log
    assert "(raylet) WARNING: 8 PYTHON worker processes" in log
    assert "kolm's own" not in log
    assert res.stdout == "stage line on stdout\n"


def test_verbose_leaves_everything_on_the_terminal(tmp_path):
    res, log = _run(tmp_path, KOLM_VERBOSE="1")
    assert res.returncode == 0
    assert "C++ noise" in res.stderr and "Progress bars disabled" in res.stderr and "kolm's own" in res.stderr
    assert "8 PYTHON worker processes" in res.stdout
    assert log == ""
