"""The ``kolm`` command line: parses, validates at the edge, calls the library, prints.

One module per command family; ``app`` holds the group and the one place errors from
``kolm_ray.errors`` become exit codes: 2 for bad arguments or input, 1 for runtime failures,
3 for a failed K-score gate.
"""

from kolm_ray.cli import (  # noqa: F401 - importing a command module registers its commands
    artifacts,
    compiling,
    publishing,
    queue,
    report,
    sampling,
    serving,
)
from kolm_ray.cli.app import cli, main

__all__ = ["cli", "main"]
