"""Teacher prices and the cost of recorded usage. Users override the table with a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_ray.errors import InputError


class Prices(BaseModel):
    """US dollars per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float = Field(ge=0, description="Input tokens written to the prompt cache.")
    cache_read: float = Field(ge=0, description="Input tokens read from the prompt cache.")


# List prices per MTok; cache writes at 1.25x input (5-minute TTL), reads at 0.1x.
DEFAULT_PRICES: dict[str, Prices] = {
    "claude-opus-4-7": Prices(input=5.0, output=25.0, cache_write=6.25, cache_read=0.5),
    "claude-opus-4-5": Prices(input=5.0, output=25.0, cache_write=6.25, cache_read=0.5),
    "claude-sonnet-4-6": Prices(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3),
    "claude-sonnet-4-5": Prices(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3),
    "claude-haiku-4-5": Prices(input=1.0, output=5.0, cache_write=1.25, cache_read=0.1),
}
BATCH_DISCOUNT = 0.5  # the Message Batches API bills every token class at half price


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
        )


def cost_usd(usage: Usage, prices: Prices, *, batch: bool = False) -> float:
    dollars = (
        usage.input_tokens * prices.input
        + usage.output_tokens * prices.output
        + usage.cache_write_tokens * prices.cache_write
        + usage.cache_read_tokens * prices.cache_read
    ) / 1e6
    return dollars * (BATCH_DISCOUNT if batch else 1.0)


def price_for(model: str, overrides: dict[str, Prices] | None = None) -> Prices:
    """Raises: InputError when neither the overrides nor the default table price ``model``."""
    table = {**DEFAULT_PRICES, **(overrides or {})}
    if model not in table:
        raise InputError(
            f"no price for teacher model {model!r}; known: {', '.join(sorted(table))}. "
            "Pass --prices FILE with {\"MODEL\": {\"input\": .., \"output\": .., \"cache_write\": .., \"cache_read\": ..}}"
        )
    return table[model]


def read_price_text(path: Path, kind: str = "price file") -> str:
    """A price file's text (the teacher's JSON table, ``kolm report``'s YAML book).
    Raises: InputError naming the file when it is missing, a folder or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("price file not found", path=str(path)) from None
    except IsADirectoryError:
        raise InputError("a folder, not a price file", path=str(path)) from None
    except UnicodeDecodeError:
        raise InputError(f"not a {kind} (not UTF-8 text)", path=str(path)) from None


def load_prices(path: str | Path) -> dict[str, Prices]:
    """Raises: InputError for a missing file, bad JSON or a malformed entry."""
    p = Path(path)
    try:
        data = json.loads(read_price_text(p, "JSON price file"))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg})", path=str(p), line=e.lineno) from None
    if not isinstance(data, dict):
        raise InputError("expected an object of model -> prices", path=str(p))
    try:
        return {m: Prices.model_validate(v) for m, v in data.items()}
    except ValidationError as e:
        raise InputError(f"bad price entry: {e.errors()[0]['loc']} {e.errors()[0]['msg']}", path=str(p)) from None
