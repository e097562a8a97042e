"""Reading task rows: ``{"id"?: str, "input": str, "output"?: str}`` from JSONL or Parquet.

A file of outputs to score may also carry ``"reference"``: the expected output beside ``output``.

Owns validation at the edge: every problem is an ``InputError`` naming the file
and the line (JSONL) or row (Parquet). Returns a ``pyarrow.Table`` with columns
``id``, ``input``, ``output`` and ``reference`` (both nullable). Must not write anything.

JSONL is parsed line by line rather than with ``pyarrow.json``: Arrow's reader
reports block-relative rows and stops at the first type change, while a user
needs the exact line of a bad record. Lines end at ``\n``, ``\r\n`` or ``\r`` (as an editor
counts them), never at the other characters ``str.splitlines`` breaks on (U+2028, U+0085, form
feed, ...): JSON allows those raw inside a string. A UTF-8 byte order mark at the start is skipped.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kolm_ray.errors import InputError

ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("output", pa.string(), nullable=True),
        pa.field("reference", pa.string(), nullable=True),
    ]
)

_KNOWN_FIELDS = {"id", "input", "output", "reference"}
_LINE_END = re.compile(r"\r\n|\r|\n")


def read_rows(path: str | Path, *, require_output: bool = False) -> pa.Table:
    """Read and validate a file of task rows.

    Rows without an ``id`` get ``row-<line>`` (JSONL) or ``row-<index>`` (Parquet).

    Raises:
        InputError: the file is missing, empty, not JSONL/Parquet, or a row is
            malformed (bad JSON, no ``input``, a non-string ``input``/``output``/``id``,
            a duplicate id, or no ``output`` where ``require_output``).
    """
    p = Path(path)
    if not p.exists():
        raise InputError("file not found", path=str(p))
    if p.is_dir():
        raise InputError("is a directory, expected a .jsonl or .parquet file", path=str(p))
    kind = _file_kind(p)
    if kind == "kolm":
        raise InputError("is a .kolm artifact, not rows: give a JSONL or Parquet file of rows", path=str(p))
    if kind == "binary":
        raise InputError("is a binary file, not JSONL: give a JSONL (one JSON object per line) or Parquet file",
                         path=str(p))
    if kind == "parquet":
        records = _parquet_records(p)
        where = "row"
    else:
        records = _jsonl_records(p)
        where = "line"
    if not records:
        raise InputError("no rows: the file is empty", path=str(p))

    ids: list[str] = []
    inputs: list[str] = []
    outputs: list[str | None] = []
    references: list[str | None] = []
    seen: dict[str, int] = {}
    for lineno, rec in records:
        if not isinstance(rec, dict):
            raise InputError(
                f"expected a JSON object like {{\"input\": \"...\"}}, got {type(rec).__name__}",
                path=str(p), line=lineno,
            )
        if "input" not in rec or rec["input"] is None:
            raise InputError('missing field "input"', path=str(p), line=lineno)
        for field in ("input", "output", "id", "reference"):
            value = rec.get(field)
            if value is not None and not isinstance(value, str):
                raise InputError(
                    f'field "{field}" must be a string, got {type(value).__name__}',
                    path=str(p), line=lineno,
                )
            if value is not None and not _is_unicode(value):
                # JSON may escape half a surrogate pair ("\ud800"): no character, and not storable.
                raise InputError(
                    f'field "{field}" is not valid Unicode: it holds half of a surrogate pair '
                    f'(an escape such as "\\ud800" without its partner)',
                    path=str(p), line=lineno,
                )
        if not rec["input"].strip():
            raise InputError('field "input" is empty', path=str(p), line=lineno)
        if require_output and not (rec.get("output") or "").strip():
            raise InputError(
                'missing field "output": this file needs a reference output on every row',
                path=str(p), line=lineno,
            )
        row_id = rec.get("id") or f"{where}-{lineno}"
        if row_id in seen:
            raise InputError(
                f'duplicate id "{row_id}" (first seen at {where} {seen[row_id]})',
                path=str(p), line=lineno,
            )
        seen[row_id] = lineno
        ids.append(row_id)
        inputs.append(rec["input"])
        outputs.append(rec.get("output"))
        references.append(rec.get("reference"))
    return pa.table({"id": ids, "input": inputs, "output": outputs, "reference": references}, schema=ROW_SCHEMA)


def _file_kind(p: Path) -> str:
    """"parquet", "kolm" (a tar: an artifact), "binary" or "jsonl", from the name and first bytes."""
    try:
        with p.open("rb") as f:
            head = f.read(512)
    except OSError as e:
        raise InputError(f"cannot read the file ({e.strerror})", path=str(p)) from None
    if p.suffix == ".parquet" or head.startswith(b"PAR1"):
        return "parquet"
    if p.suffix == ".kolm" or head[257:262] == b"ustar":
        return "kolm"
    if b"\0" in head:
        return "binary"
    return "jsonl"


def _is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _line_of(data: bytes, offset: int) -> int:
    """The 1-based line (as ``_LINE_END`` splits them) that byte ``offset`` of ``data`` is on."""
    return len(_LINE_END.findall(data[:offset].decode("utf-8", errors="replace"))) + 1


def _jsonl_records(p: Path) -> list[tuple[int, object]]:
    records: list[tuple[int, object]] = []
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the file ({e.strerror})", path=str(p)) from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        raise InputError(f"not UTF-8 text ({e.reason} at byte {at})", path=str(p), line=_line_of(data, at)) from None
    for lineno, line in enumerate(_LINE_END.split(text), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise InputError(
                f"malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
                path=str(p), line=lineno,
            ) from None
        except ValueError as e:  # a number past Python's 4300-digit limit for int()
            raise InputError(f"unreadable JSON ({e}); each line must be one JSON object",
                             path=str(p), line=lineno) from None
        except RecursionError:
            raise InputError("JSON nested too deeply to read; each line must be one flat JSON object",
                             path=str(p), line=lineno) from None
    return records


def _parquet_records(p: Path) -> list[tuple[int, object]]:
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"not a readable Parquet file ({e})", path=str(p)) from None
    names = table.schema.names
    twice = sorted({n for n in names if n in _KNOWN_FIELDS and names.count(n) > 1})
    if twice:
        raise InputError(f'column "{twice[0]}" appears {names.count(twice[0])} times', path=str(p))
    # Only the row columns are read: another column of a type Python cannot hold (a timestamp
    # past year 9999, say) is not the reader's business.
    table = table.select([n for n in names if n in _KNOWN_FIELDS])
    unknown_types = [
        f.name for f in table.schema
        if f.name in _KNOWN_FIELDS and not pa.types.is_string(f.type) and not pa.types.is_large_string(f.type)
        and not pa.types.is_null(f.type)
    ]
    if unknown_types:
        raise InputError(
            f'column "{unknown_types[0]}" must be of string type, got {table.schema.field(unknown_types[0]).type}',
            path=str(p),
        )
    try:
        rows = table.to_pylist()
    except (pa.ArrowException, ValueError) as e:  # e.g. a string column that is not UTF-8
        raise InputError(f"not a readable Parquet file ({e})", path=str(p)) from None
    return [(i + 1, rec) for i, rec in enumerate(rows)]
