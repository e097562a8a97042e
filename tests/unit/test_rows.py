import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kolm_ray.errors import InputError
from kolm_ray.rows import read_rows
from tests.conftest import ASSETS

BAD = ASSETS / "bad"


@pytest.mark.parametrize(
    "name, line, words",
    [
        ("malformed_json.jsonl", 2, "malformed JSON"),
        ("missing_input.jsonl", 2, 'missing field "input"'),
        ("nonstring_input.jsonl", 3, 'field "input" must be a string'),
        ("nonstring_output.jsonl", 1, 'field "output" must be a string'),
        ("duplicate_ids.jsonl", 3, 'duplicate id "r1"'),
        ("not_an_object.jsonl", 1, "expected a JSON object"),
    ],
)
def test_bad_row_names_file_and_line(name, line, words):
    with pytest.raises(InputError) as e:
        read_rows(BAD / name)
    assert e.value.line == line
    assert str(e.value).startswith(f"{BAD / name}:{line}: ")
    assert words in str(e.value)
    assert e.value.exit_code == 2


def test_empty_file_is_an_error():
    with pytest.raises(InputError, match="empty"):
        read_rows(BAD / "empty.jsonl")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_rows(tmp_path / "nope.jsonl")


def test_require_output_names_the_row(tmp_path):
    p = tmp_path / "holdout.jsonl"
    p.write_text('{"input": "a", "output": "x"}\n{"input": "b"}\n')
    with pytest.raises(InputError) as e:
        read_rows(p, require_output=True)
    assert e.value.line == 2


def test_good_jsonl_gets_ids_from_lines(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"input": "a", "output": "x"}\n\n{"id": "mine", "input": "b"}\n')
    t = read_rows(p)
    assert t.column("id").to_pylist() == ["line-1", "mine"]
    assert t.column("output").to_pylist() == ["x", None]


def test_parquet_rows_and_bad_parquet_column(tmp_path):
    good = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"input": ["a", "b"], "output": ["x", None]}), good)
    assert read_rows(good).num_rows == 2
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input": [1, 2]}), bad)
    with pytest.raises(InputError, match='column "input" must be of string type'):
        read_rows(bad)
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"input": ["a", None]}), missing)
    with pytest.raises(InputError) as e:
        read_rows(missing)
    assert e.value.line == 2


def test_corrupt_parquet_is_an_input_error(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_rows(p)
