"""Property tests of the row reader (``rows.read_rows``) over generated files.

Whatever bytes a .jsonl file holds, ``read_rows`` returns a table of the documented columns or
raises ``InputError`` naming the file (and the line, for anything wrong with a line); never
another exception. Valid rows written as JSONL (any line ending, a BOM, blank lines, raw
non-ASCII) or Parquet read back equal, and a bad line among good ones is reported at its own line.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kolm_ray.errors import InputError
from kolm_ray.rows import ROW_SCHEMA, read_rows

# Reproducible in CI: the same examples every run, nothing saved between runs.
_BASE = settings(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int) -> settings:
    """The shared settings with ``n`` examples: sized so each test runs in seconds on two cores."""
    return settings(_BASE, max_examples=n)

# Text as users' files hold it: every code point but lone surrogates (st.text's default), with the
# characters str.splitlines breaks on but JSON keeps raw inside a string made likely.
LINE_BREAKERS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"
texts = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(LINE_BREAKERS), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
FIELDS = ("id", "input", "output", "reference")


@st.composite
def objects(draw) -> dict:
    """A JSON object that may or may not be a valid row: fields present or not, of any type."""
    obj = draw(st.dictionaries(texts, json_values, max_size=2))
    for f in FIELDS:
        if draw(st.booleans()):
            obj[f] = draw(texts if draw(st.booleans()) else json_values)
    return obj


# Lines that are each wrong in their own way, as a user's file might be.
ODD_LINES = [
    "", "   ", "\t", "[]", "[1, 2]", '"text"', "42", "null", "true", "NaN", "{", "}", '{"input": ',
    '{"input": "a",}', "{'input': 'a'}", '{"input": "\\ud800"}', '{"input": "a\\udfff", "output": "b"}',
    '{"id": "\\ud83d", "input": "x"}', '{"input": "a", "output": "\\udc80"}', '{"input": "a", "x": "\\ud800"}',
    "1" * 5000, '{"input": "a", "n": ' + "9" * 5000 + "}", "[" * 5000, '{"input": ' + "[" * 5000,
    '{"input": "' + "x" * 200_000 + '"}', "\ufeff" + '{"input": "a"}', '{"input": "a"}{"input": "b"}',
    '{"input": "a", "input": 3}', '{"input": "a", "output": null}', '{"input": "a", "id": ""}',
]


@st.composite
def jsonl_bytes(draw) -> bytes:
    """A .jsonl file's bytes: JSON objects (rows or not), other JSON, junk and odd lines, any line
    ending, perhaps a BOM, perhaps raw bytes that are not UTF-8 or a NUL spliced in."""
    line = st.one_of(
        objects().map(lambda o: json.dumps(o, ensure_ascii=False)),
        objects().map(json.dumps),
        json_values.map(lambda v: json.dumps(v, ensure_ascii=False)),
        st.sampled_from(ODD_LINES),
        texts,
    )
    lines = draw(st.lists(line, max_size=6))
    ends = draw(st.lists(st.sampled_from(["\n", "\r\n", "\r", ""]), min_size=len(lines), max_size=len(lines)))
    data = "".join(a + b for a, b in zip(lines, ends)).encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


def _check_read(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        table = read_rows(path)
    except InputError as e:
        msg = str(e)
        assert e.path == str(path) and msg.startswith(f"{path}:"), msg
        if e.line is not None:
            n_lines = data.count(b"\n") + data.count(b"\r") + 1
            assert 1 <= e.line <= n_lines, msg
            assert msg.startswith(f"{path}:{e.line}: "), msg
        else:
            # Only a judgement on the file as a whole names no line: no rows at all, or not a
            # text file to begin with (a NUL in its first bytes, a tar, Parquet's magic bytes).
            assert any(w in msg for w in ("no rows", "binary file", ".kolm artifact", "Parquet")), msg
        return
    assert isinstance(table, pa.Table)
    assert table.schema.equals(ROW_SCHEMA)
    assert table.num_rows > 0
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i for i in ids)
    assert all(isinstance(x, str) and x.strip() for x in table.column("input").to_pylist())


@examples(400)
@given(data=jsonl_bytes())
@example(data=b"\xef\xbb\xbf" + b'{"input": "a"}\n')
@example(data=b'{"input": "a"}\n' + b"1" * 5000 + b"\n")
@example(data=b"[" * 100_000)
@example(data=b'{"input": "\\ud800"}\n')
@example(data=b'{"input": "a"}\n{"input": "\xff"}\n')
@example(data='{"input": "a\u2028b"}\n'.encode())
def test_any_jsonl_bytes_give_rows_or_an_input_error_naming_file_and_line(tmp_path, data):
    _check_read(tmp_path / "rows.jsonl", data)


@examples(200)
@given(data=st.binary(max_size=600))
@example(data=b"")
@example(data=b"\x00\x01\x02")
@example(data=b"PAR1")
@example(data=b"PAR1" + b"\x00" * 16 + b"PAR1")
@example(data=b"\x00" * 257 + b"ustar" + b"\x00" * 250)
def test_any_binary_gives_rows_or_an_input_error(tmp_path, data):
    _check_read(tmp_path / "rows.jsonl", data)


# -- valid rows read back as written

row_texts = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(LINE_BREAKERS), max_size=40)
ids = row_texts.filter(lambda s: s != "" and not s.startswith("line-"))  # line-N is the reader's own id


@st.composite
def valid_rows(draw) -> list[dict]:
    n = draw(st.integers(1, 6))
    chosen_ids = draw(st.lists(ids, min_size=n, max_size=n, unique=True))
    rows = []
    for i in range(n):
        row = {"input": draw(row_texts.filter(lambda s: s.strip() != ""))}
        if draw(st.booleans()):
            row["id"] = chosen_ids[i]
        for f in ("output", "reference"):
            if draw(st.booleans()):
                row[f] = draw(st.none() | row_texts)
        rows.append(row)
    return rows


@examples(250)
@given(
    rows=valid_rows(), ascii_only=st.booleans(), bom=st.booleans(),
    end=st.sampled_from(["\n", "\r\n", "\r"]), blank_before=st.lists(st.booleans(), min_size=6, max_size=6),
)
@example(rows=[{"input": "a\u2028b"}], ascii_only=False, bom=False, end="\n", blank_before=[False] * 6)
@example(rows=[{"input": "a"}], ascii_only=True, bom=True, end="\r\n", blank_before=[False] * 6)
def test_valid_jsonl_reads_back_equal(tmp_path, rows, ascii_only, bom, end, blank_before):
    lines, expected = [], []
    for row, blank in zip(rows, blank_before):
        if blank:
            lines.append("  ")
        lines.append(json.dumps(row, ensure_ascii=ascii_only))
        expected.append({
            "id": row.get("id") or f"line-{len(lines)}", "input": row["input"],
            "output": row.get("output"), "reference": row.get("reference"),
        })
    p = tmp_path / "rows.jsonl"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + end.join(lines).encode("utf-8") + end.encode())
    table = read_rows(p)
    assert table.schema.equals(ROW_SCHEMA)
    assert table.to_pylist() == expected


BAD_LINES = [  # (line, what the message says)
    ("[1]", "expected a JSON object"), ('"input"', "expected a JSON object"),
    ('{"output": "x"}', 'missing field "input"'), ('{"input": 5}', 'field "input" must be a string'),
    ('{"input": "a", "output": 3}', 'field "output" must be a string'), ('{"input": "  "}', 'field "input" is empty'),
    ('{"input": ', "malformed JSON"), ('{"input": "a"} x', "malformed JSON"),
    ('{"input": "\\ud800"}', '"input"'), ('{"input": "a", "reference": "\\udfff"}', '"reference"'),
    ("7" * 5000, "JSON"), ("[" * 5000, "JSON"), ('{"input": "x", "id": ["a"]}', 'field "id" must be a string'),
]


@examples(250)
@given(
    rows=valid_rows(), bad=st.sampled_from(BAD_LINES), at=st.integers(0, 6), ascii_only=st.booleans(),
    end=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(),
)
def test_a_bad_line_among_good_ones_is_reported_at_its_line(tmp_path, rows, bad, at, ascii_only, end, bom):
    lines = [json.dumps({k: v for k, v in r.items() if k != "id"}, ensure_ascii=ascii_only) for r in rows]
    at = min(at, len(lines))
    lines.insert(at, bad[0])
    p = tmp_path / "rows.jsonl"
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + end.join(lines).encode("utf-8") + end.encode())
    with pytest.raises(InputError) as e:
        read_rows(p)
    assert e.value.line == at + 1, str(e.value)[:300]
    assert str(e.value).startswith(f"{p}:{at + 1}: ")
    assert bad[1] in str(e.value)


@examples(100)
@given(rows=valid_rows(), bad_at=st.integers(0, 5), bad=st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
def test_bytes_that_are_not_utf8_are_reported_at_their_line(tmp_path, rows, bad_at, bad):
    lines = [json.dumps({"input": r["input"]}, ensure_ascii=False).encode() for r in rows]
    at = min(bad_at, len(lines) - 1)
    lines[at] = lines[at][:-2] + bad + lines[at][-2:]  # inside the input string
    p = tmp_path / "rows.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError) as e:
        read_rows(p)
    assert "not UTF-8" in str(e.value) and e.value.line == at + 1, str(e.value)


# -- Parquet

@examples(60)
@given(rows=valid_rows())
def test_valid_parquet_reads_back_equal(tmp_path, rows):
    cols = {f: [r.get(f) for r in rows] for f in FIELDS}
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({f: pa.array(v, pa.string()) for f, v in cols.items()}), p)
    expected = [{"id": r.get("id") or f"row-{i + 1}", "input": r["input"], "output": r.get("output"),
                 "reference": r.get("reference")} for i, r in enumerate(rows)]
    assert read_rows(p).to_pylist() == expected


parquet_columns = st.sampled_from([
    pa.array(["a", "b"]), pa.array(["a", None]), pa.array([None, None]), pa.array([1, 2]), pa.array([1.5, None]),
    pa.array([True, False]), pa.array([["a"], []]), pa.array([{"x": 1}, None]), pa.array([b"a", b"b"]),
    pa.array(["a", "b"], pa.large_string()), pa.array(["a", "a"]).dictionary_encode(),
    pa.array([2**62, -(2**62)], pa.timestamp("us")), pa.array([" ", "b"]), pa.array(["a", "\u2028"]),
])


@examples(80)
@given(cols=st.dictionaries(st.sampled_from([*FIELDS, "extra", "when"]), parquet_columns, max_size=5))
def test_any_parquet_columns_give_rows_or_an_input_error(tmp_path, cols):
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table(cols) if cols else pa.table({"x": pa.array([], pa.int64())}), p)
    try:
        table = read_rows(p)
    except InputError as e:
        assert str(e).startswith(f"{p}"), str(e)
        return
    assert table.schema.equals(ROW_SCHEMA) and table.num_rows == 2
