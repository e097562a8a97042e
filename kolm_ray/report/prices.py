"""The price file ``kolm report`` costs a bill with: frontier models' token prices (the teacher's
``sampling.pricing.Prices``), the prompt-cache and batch rules, and the lease price.

The default ships as package data (``kolm_ray/report/prices.yaml``); a user's file
(``--prices FILE``, else ``$KOLM_HOME/prices.yaml``) is laid over it section by section, a model's
entry replaced whole. Every error names the file and, where it can, the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_ray.errors import InputError
from kolm_ray.sampling.pricing import DEFAULT_PRICES, Prices, read_price_text

DEFAULT_FILE = Path(__file__).with_name("prices.yaml")
PRICE_FORMAT_VERSION = 1


class CacheRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    min_tokens: int = Field(ge=0, description="Shortest prefix the frontier caches.")
    ttl_s: float = Field(gt=0, description="How long a cached prefix lives after its last use.")


class BatchRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    factor: float = Field(gt=0, le=1, description="Share of the list price a batched call costs.")
    min_calls: int | None = Field(ge=2, description="Calls in one burst that make it batchable; None: never.")
    window_s: float = Field(gt=0, description="How close together a burst's calls arrive.")


class Lease(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    gpu_hour: float = Field(ge=0, description="US dollars per GPU-hour.")
    cpu_hour: float = Field(ge=0, description="US dollars per CPU-core-hour.")
    gpu_share: float | None = Field(None, gt=0, description="GPUs the serving replicas hold "
                                    "(0.25: a quarter of one); None: the replica-seconds measured.")


class PriceBook(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    format_version: int
    default_frontier: str
    frontier: dict[str, Prices]
    cache: CacheRule
    batch: BatchRule
    lease: Lease
    sources: list[str] = Field(default_factory=list, description="The files read, in order.")

    def frontier_prices(self, model: str) -> Prices:
        """Raises: InputError for a model the book does not price."""
        if model not in self.frontier:
            raise InputError(f"no price for frontier model {model!r}; known: {', '.join(sorted(self.frontier))}. "
                             "Add it under `frontier:` in the price file (--prices FILE or $KOLM_HOME/prices.yaml)")
        return self.frontier[model]


def _read(path: Path) -> tuple[dict[str, Any], Any]:
    """The file's data and its YAML node tree (for line numbers). Raises: InputError."""
    import yaml

    text = read_price_text(path)
    try:
        data, node = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"malformed YAML ({getattr(e, 'problem', None) or e})", path=str(path),
                         line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise InputError("expected a mapping (format_version, frontier, cache, batch, lease)", path=str(path),
                         line=1)
    return data, node


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the entry at ``loc`` in a YAML node tree (the deepest one found)."""
    import yaml

    line = None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "frontier":
            out[key] = {**out[key], **value}
        elif key == "frontier" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}  # a model's entry is replaced whole
        else:
            out[key] = value
    return out


def load_price_book(path: str | Path | None = None, home: Path | None = None) -> PriceBook:
    """The default file, with ``path`` (else ``home/prices.yaml`` if present) laid over it.

    Raises: InputError naming the file and line of a missing file, bad YAML or a bad entry.
    """
    user = Path(path) if path is not None else (home / "prices.yaml" if home is not None else None)
    files = [DEFAULT_FILE] + ([user] if user is not None and (path is not None or user.is_file()) else [])
    # The frontier's token prices start from the teacher's list prices (one table: a compile and
    # a report price a model alike); a file adds models or replaces one whole.
    data: dict[str, Any] = {"frontier": {m: p.model_dump() for m, p in DEFAULT_PRICES.items()}}
    for f in files:
        layer, node = _read(f)
        data = _merge(data, layer)
        try:
            book = PriceBook.model_validate({**data, "sources": [str(x) for x in files]})
        except ValidationError as e:
            err = e.errors()[0]
            loc = tuple(err["loc"])
            raise InputError(f"bad price entry {'.'.join(map(str, loc))}: {err['msg']}", path=str(f),
                             line=_line_of(node, loc)) from None
        if book.format_version != PRICE_FORMAT_VERSION:
            raise InputError(f"price file format_version {book.format_version} is not supported "
                             f"(expected {PRICE_FORMAT_VERSION})", path=str(f), line=_line_of(node, ("format_version",)))
    return book
