"""The receipt log: hash chain, head file, flush on close, and one test per kind of tampering."""

import json
from pathlib import Path

import pytest

from kolm_ray.serve.receipts import Receipt, ReceiptWriter, read_receipts, verify_log


def _receipt(i: int) -> Receipt:
    return Receipt(time=1000.0 + i, request_id=f"req-{i}", specialist="tldr", version="1.0", artifact_sha256="a" * 64,
                   route="stable", status="ok", input_sha256="b" * 64, output_sha256="c" * 64, latency_ms=1.5,
                   prompt_tokens=10, completion_tokens=5, t=0.9, c=1.0, l=0.8, k=0.9)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    w = ReceiptWriter(tmp_path / "receipts", "w1", flush_interval_s=60)
    for i in range(6):
        w.append(_receipt(i))
    w.flush()
    for i in range(6, 10):
        w.append(_receipt(i))
    w.close()  # the last four are written by close(), not by the timer
    return tmp_path / "receipts"


def _lines(d: Path) -> list[str]:
    return (d / "w1.jsonl").read_text().splitlines()


def _write(d: Path, lines: list[str]) -> None:
    (d / "w1.jsonl").write_text("\n".join(lines) + "\n")


def test_untouched_log_verifies_and_close_loses_nothing(log_dir):
    report = verify_log(log_dir)
    assert report.ok and report.receipts == 10
    assert [r["request_id"] for r in read_receipts(log_dir)] == [f"req-{i}" for i in range(10)]


def test_timer_flushes_without_close(tmp_path):
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=0.05)
    w.append(_receipt(0))
    for _ in range(200):
        if w.written:
            break
        w._stop.wait(0.05)
    assert w.written == 1 and verify_log(tmp_path).ok
    w.close()


def test_edited_receipt_is_detected(log_dir):
    lines = _lines(log_dir)
    rec = json.loads(lines[3])
    rec["completion_tokens"] = 1
    lines[3] = json.dumps(rec, sort_keys=True)
    _write(log_dir, lines)
    problems = verify_log(log_dir).segments[0].problems
    assert any("line 4: hash mismatch" in p for p in problems), problems


def test_edited_receipt_with_recomputed_hash_breaks_the_chain(log_dir):
    from kolm_ray.serve.receipts import chain_hash

    lines = _lines(log_dir)
    rec = json.loads(lines[3])
    rec.pop("hash")
    rec["k"] = 0.1
    rec["hash"] = chain_hash(rec["prev"], rec)
    lines[3] = json.dumps(rec, sort_keys=True)
    _write(log_dir, lines)
    problems = verify_log(log_dir).segments[0].problems
    assert any("line 5: chain broken" in p for p in problems), problems


def test_dropped_receipt_is_detected(log_dir):
    lines = _lines(log_dir)
    del lines[4]
    _write(log_dir, lines)
    problems = verify_log(log_dir).segments[0].problems
    assert any("line 5: seq 5 where 4 was due" in p for p in problems), problems


def test_reordered_receipts_are_detected(log_dir):
    lines = _lines(log_dir)
    lines[2], lines[3] = lines[3], lines[2]
    _write(log_dir, lines)
    assert not verify_log(log_dir).ok


def test_receipts_cut_from_the_end_are_detected(log_dir):
    _write(log_dir, _lines(log_dir)[:-2])
    problems = verify_log(log_dir).segments[0].problems
    assert any("cut from the end" in p for p in problems), problems


def test_deleted_segment_is_detected(log_dir):
    (log_dir / "w1.jsonl").unlink()
    assert not verify_log(log_dir).ok


def test_a_reopened_writer_continues_its_chain(log_dir):
    w = ReceiptWriter(log_dir, "w1", flush_interval_s=60)
    w.append(_receipt(10))
    w.close()
    report = verify_log(log_dir)
    assert report.ok and report.receipts == 11


def test_reading_since_a_time_skips_segments_last_written_before_it(tmp_path):
    import os

    old = ReceiptWriter(tmp_path, "old", flush_interval_s=60)
    old.append(_receipt(0))
    old.close()
    os.utime(tmp_path / "old.jsonl", (500.0, 500.0))  # last written long before the window
    new = ReceiptWriter(tmp_path, "new", flush_interval_s=60)
    new.append(_receipt(5))
    new.close()
    assert [r["request_id"] for r in read_receipts(tmp_path, since=1003.0)] == ["req-5"]
    assert len(read_receipts(tmp_path)) == 2


def test_a_torn_last_line_is_skipped_by_readers_and_reported_by_verify(log_dir):
    with (log_dir / "w1.jsonl").open("a") as f:
        f.write('{"seq": 10, "time": 2000')  # a writer killed mid-append
    assert len(read_receipts(log_dir)) == 10
    [seg] = verify_log(log_dir).segments  # a crash, not tampering: said as a torn tail (test_receipts_durability)
    assert any("torn tail: 24 bytes after seq 9" in w for w in seg.warnings), seg


def test_a_garbled_head_file_is_reported_not_a_crash(log_dir):
    (log_dir / "w1.head.json").write_text("{oops")
    problems = verify_log(log_dir).segments[0].problems
    assert any("cut from the end" in p for p in problems), problems


def test_a_failed_write_keeps_the_receipts_queued_and_the_chain_intact(tmp_path, monkeypatch):
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    w.append(_receipt(0))
    w.flush()
    w.append(_receipt(1))
    real_open = Path.open

    def failing(self, *a, **kw):
        if self.suffix == ".jsonl" and a and a[0].startswith("a"):
            raise OSError(28, "No space left on device")
        return real_open(self, *a, **kw)

    monkeypatch.setattr(Path, "open", failing)
    with pytest.raises(OSError):
        w.flush()
    monkeypatch.setattr(Path, "open", real_open)
    w.close()  # the disk is back: the queued receipt is written on the same chain
    assert verify_log(tmp_path).ok and verify_log(tmp_path).receipts == 2


FORMAT_2_LOG = Path(__file__).parents[2] / "assets" / "receipts-format-2"  # written by the format-2 writer: K 0-1


def test_a_format_2_log_still_verifies_and_is_read_on_the_0_to_100_scale(tmp_path):
    import shutil

    from click.testing import CliRunner

    from kolm_ray.cli import cli
    from kolm_ray.serve.receipts import RECEIPT_FORMAT_VERSION

    logs = tmp_path / "receipts" / "kolm"
    shutil.copytree(FORMAT_2_LOG, logs)
    new = ReceiptWriter(logs, "after-upgrade", flush_interval_s=60)  # a format-3 replica beside the old one
    new.append(_receipt(99).model_copy(update={"t": 90.0, "c": 100.0, "l": 80.0, "k": 90.0, "time": 1_790_000_000.0}))
    new.close()
    res = CliRunner().invoke(cli, ["receipts", "verify", "--store", str(tmp_path)])
    assert res.exit_code == 0 and "verified    17 receipts in 2 segment(s)" in res.output, res.output
    stored = [json.loads(x) for x in (logs / "20260528T000000-format2.jsonl").read_text().splitlines()]
    assert {r["format_version"] for r in stored} == {2} and stored[2]["k"] == 0.5  # the old log is untouched
    got = read_receipts(logs)
    assert {r["format_version"] for r in got} == {RECEIPT_FORMAT_VERSION}
    old_canary_call = next(r for r in got if r["request_id"] == "r1" and r["kind"] == "call")
    assert [old_canary_call[f] for f in "tclk"] == [90.0, 50.0, 80.0, 50.0]
    old_audit = next(r for r in got if r["request_id"] == "r1" and r["kind"] == "audit")
    assert (old_audit["t"], old_audit["c"], old_audit["k"]) == (None, 25.0, 25.0)
    assert [got[-1][f] for f in "tclk"] == [90.0, 100.0, 80.0, 90.0]  # the new segment's, not scaled again
