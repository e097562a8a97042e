"""The ``kolm`` command group: parses, validates at the edge, calls the library, prints.

No logic of its own. Errors from ``kolm_ray.errors`` become exit codes here and only here:
2 for bad arguments or input, 1 for runtime failures, 3 for a failed K-score gate.
"""

from __future__ import annotations

from typing import Any

import click

from kolm_ray.errors import KolmError


class _KolmGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KolmError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)



@click.group(cls=_KolmGroup)
@click.version_option(package_name="kolm_ray")
def cli() -> None:
    """kolm: compile a frontier-model task into a small, signed, self-hosted Specialist."""


def main() -> None:
    cli(prog_name="kolm")
