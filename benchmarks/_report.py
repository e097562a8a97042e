"""Write a benchmark's figures into its section of benchmarks/README.md."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

README = Path(__file__).parent / "README.md"


def record(name: str, lines: list[str], write: bool) -> None:
    """Print a benchmark's figures and, with ``write``, record them in README.md."""
    print("\n".join(lines))
    if write:
        _write_section(name, "\n".join(lines))


def _write_section(name: str, text: str) -> None:
    """Put ``text`` in README.md's section ``name`` (between its markers), dated; add the section if new."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = datetime.date.today().isoformat()
    block = f"{start}\n```\n{text}\n```\n_recorded {stamp}_\n{end}"
    body = README.read_text() if README.exists() else "# Benchmarks\n"
    if start in body:
        body = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip() + f"\n\n## {name}\n\n{block}\n"
    README.write_text(body)
