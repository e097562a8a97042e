"""The receipt log under failure and deletion: a write that fails half-way, a writer killed
mid-append, a head that lags its segment, and segments deleted together with their heads.
Each test is named after the attack (or accident) it replays."""

import errno
import json
import shutil
from pathlib import Path

import pytest

from kolm_ray.serve import receipts as rc
from kolm_ray.serve.receipts import Receipt, ReceiptWriter, read_receipts, verify_log

FORMAT_2_LOG = Path(__file__).parents[2] / "assets" / "receipts-format-2"


def _receipt(i: int) -> Receipt:
    return Receipt(time=1000.0 + i, request_id=f"req-{i}", specialist="tldr", version="1.0", artifact_sha256="a" * 64,
                   route="stable", status="ok", input_sha256="b" * 64, output_sha256="c" * 64, latency_ms=1.5,
                   prompt_tokens=10, completion_tokens=5, t=90.0, c=100.0, l=80.0, k=90.0)


def _write(directory: Path, writer: str, ids: range) -> None:
    """One writer lifetime (one replica start): open, append, close."""
    w = ReceiptWriter(directory, writer, flush_interval_s=60)
    for i in ids:
        w.append(_receipt(i))
    w.close()


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _all_problems(report) -> list[str]:
    return [p for s in report.segments for p in s.problems]


def _all_warnings(report) -> list[str]:
    return [w for s in report.segments for w in s.warnings]


class _HalfThenFail:
    """A segment opened for appending whose write puts half the bytes on disk, then raises."""

    def __init__(self, f, exc):
        self._f, self._exc = f, exc

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise self._exc

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def _fail_appends_half_way(monkeypatch, exc: BaseException) -> None:
    real_open = Path.open

    def opener(self, *a, **kw):
        mode = a[0] if a else kw.get("mode", "r")
        f = real_open(self, *a, **kw)
        return _HalfThenFail(f, exc) if self.suffix == ".jsonl" and mode.startswith("a") else f

    monkeypatch.setattr(Path, "open", opener)


# ----- 1. partial writes and torn lines ------------------------------------------------------------


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EIO, "I/O error"),
                                 RuntimeError("interrupted mid-write")], ids=["ENOSPC", "EIO", "exception"])
def test_a_partial_write_then_a_retry_duplicates_no_seq_and_glues_no_record(tmp_path, monkeypatch, exc):
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    for i in range(3):
        w.append(_receipt(i))
    w.flush()
    clean = (tmp_path / "w.jsonl").read_bytes()
    for i in range(3, 8):
        w.append(_receipt(i))
    with monkeypatch.context() as m:
        _fail_appends_half_way(m, exc)
        with pytest.raises(type(exc)):
            w.flush()
    # the half-written batch was taken back: the segment is the clean prefix the writer's chain ends on
    assert (tmp_path / "w.jsonl").read_bytes() == clean
    w.append(_receipt(8))
    w.close()  # the disk is back: the same batch, on the same chain, then the new one
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 9, report
    recs = _records(tmp_path / "w.jsonl")
    assert [r["seq"] for r in recs] == list(range(9))
    assert [r["request_id"] for r in recs] == [f"req-{i}" for i in range(9)]


def test_a_partial_write_whose_rollback_also_fails_is_repaired_before_the_next_append(tmp_path, monkeypatch):
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    w.append(_receipt(0))
    w.flush()
    w.append(_receipt(1))
    with monkeypatch.context() as m:
        _fail_appends_half_way(m, OSError(errno.EIO, "I/O error"))
        m.setattr(rc.os, "ftruncate", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(OSError):
            w.flush()
    assert not (tmp_path / "w.jsonl").read_text().endswith("\n")  # the half line is still there...
    w.close()  # ...until the next append cuts it off first
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 2 and not _all_warnings(report), report
    assert [r["seq"] for r in _records(tmp_path / "w.jsonl")] == [0, 1]


def test_a_failed_head_update_neither_loses_nor_repeats_the_batch(tmp_path, monkeypatch):
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    w.append(_receipt(0))
    real_replace = rc.os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".head.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(rc.os, "replace", failing_replace)
        w.flush()  # the receipts are durable: the head is retried on the next flush, not the batch
    w.close()
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 1, report
    assert json.loads((tmp_path / "w.head.json").read_text())["seq"] == 0


def _crash_mid_append(d: Path, writer: str, n_before: int) -> int:
    """A writer killed while appending: ``n_before`` receipts written and acknowledged (head),
    then a batch of two torn inside its first line, the head never updated. Returns the torn bytes."""
    seg, head = d / f"{writer}.jsonl", d / f"{writer}.head.json"
    w = ReceiptWriter(d, writer, flush_interval_s=60)
    for i in range(n_before):
        w.append(_receipt(i))
    w.flush()
    acked_len, acked_head = seg.stat().st_size, head.read_bytes()
    w.append(_receipt(n_before))
    w.append(_receipt(n_before + 1))
    w.close()
    torn = 40
    with seg.open("r+b") as f:
        f.truncate(acked_len + torn)
    head.write_bytes(acked_head)
    return torn


def test_a_writer_killed_mid_append_leaves_a_torn_tail_that_verify_reports_and_readers_skip(tmp_path):
    torn = _crash_mid_append(tmp_path, "w", 3)
    report = verify_log(tmp_path)
    [seg] = report.segments
    assert report.ok and seg.receipts == 3, report  # no receipt was edited, dropped or reordered...
    assert any(f"torn tail: {torn} bytes after seq 2" in x for x in seg.warnings), seg  # ...but one never completed
    assert [r["request_id"] for r in read_receipts(tmp_path)] == ["req-0", "req-1", "req-2"]


def test_a_writer_reopened_on_a_torn_tail_cuts_it_says_so_in_the_chain_and_glues_nothing(tmp_path):
    torn = _crash_mid_append(tmp_path, "w", 3)
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    w.append(_receipt(10))
    w.close()
    text = (tmp_path / "w.jsonl").read_text()
    assert text.endswith("\n") and all(line.startswith("{") and line.endswith("}") for line in text.splitlines())
    recs = _records(tmp_path / "w.jsonl")
    assert [r["seq"] for r in recs] == [0, 1, 2, 3] and recs[3]["request_id"] == "req-10"
    assert recs[3]["torn_tail"]["after_seq"] == 2 and recs[3]["torn_tail"]["bytes"] == torn
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 4, report
    assert any(f"{torn} bytes of a torn tail after seq 2 were cut" in x for x in _all_warnings(report)), report


def test_a_crash_between_the_append_and_the_head_update_is_not_called_tampering(tmp_path):
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    w.append(_receipt(0))
    w.flush()
    acked_head = (tmp_path / "w.head.json").read_bytes()
    w.append(_receipt(1))
    w.close()
    (tmp_path / "w.head.json").write_bytes(acked_head)  # killed after the fsync, before the head's replace
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 2, report
    assert any("head records seq 0" in x for x in _all_warnings(report)), report


def test_a_head_behind_its_segment_that_names_another_hash_is_still_tampering(tmp_path):
    _write(tmp_path, "w", range(3))
    head = json.loads((tmp_path / "w.head.json").read_text())
    (tmp_path / "w.head.json").write_text(json.dumps({**head, "seq": 1, "hash": "f" * 64}))
    assert not verify_log(tmp_path).ok


# ----- 2. deleted segments ------------------------------------------------------------------------------


def _three_restarts(d: Path) -> None:
    _write(d, "w1", range(3))
    _write(d, "w2", range(3, 7))
    _write(d, "w3", range(7, 9))


def _delete(d: Path, writer: str) -> None:
    (d / f"{writer}.jsonl").unlink()
    (d / f"{writer}.head.json").unlink()


def test_each_new_segment_anchors_the_heads_before_it(tmp_path):
    _three_restarts(tmp_path)
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 9, report
    w2, w3 = _records(tmp_path / "w2.jsonl"), _records(tmp_path / "w3.jsonl")
    w1_head, w2_head = (json.loads((tmp_path / f"{w}.head.json").read_text()) for w in ("w1", "w2"))
    assert w2[0]["anchors"] == [{"writer": "w1", "seq": 2, "hash": w1_head["hash"]}]
    assert w3[0]["anchors"] == [{"writer": "w2", "seq": 3, "hash": w2_head["hash"]}]  # w1: anchored by w2 already
    assert [t.segment for t in report.tips] == ["w3.jsonl"]


@pytest.mark.parametrize("gone", ["w1", "w2"])
def test_a_segment_deleted_with_its_head_is_reported_missing(tmp_path, gone):
    from click.testing import CliRunner

    from kolm_ray.cli import cli

    d = tmp_path / "receipts" / "kolm"
    _three_restarts(d)
    head = json.loads((d / f"{gone}.head.json").read_text())
    _delete(d, gone)
    report = verify_log(d)
    assert not report.ok
    assert any(f"segment {gone} missing (last seen seq {head['seq']}, hash {head['hash'][:16]}" in p
               for p in _all_problems(report)), report
    res = CliRunner().invoke(cli, ["receipts", "verify", "--store", str(tmp_path), "--app-name", "kolm"])
    assert res.exit_code == 1, res.output
    assert f"segment {gone} missing (last seen seq {head['seq']}" in res.output, res.output


def test_the_newest_segment_deleted_with_its_head_is_caught_only_by_an_anchor_kept_outside_the_log(tmp_path):
    _three_restarts(tmp_path)
    kept = [t.model_dump() for t in verify_log(tmp_path).tips]  # e.g. a verify report stored elsewhere
    _delete(tmp_path, "w3")
    assert verify_log(tmp_path).ok  # nothing left in the log names w3: the documented limit
    report = verify_log(tmp_path, anchors=kept)
    assert not report.ok
    assert any("segment w3 missing (last seen seq 1" in p for p in _all_problems(report)), report


def test_a_live_replicas_segment_deleted_with_its_head_is_caught_by_its_siblings_anchor(tmp_path):
    log = tmp_path / "log"
    a = ReceiptWriter(log, "a", flush_interval_s=60, anchor_interval_s=0)
    b = ReceiptWriter(log, "b", flush_interval_s=60, anchor_interval_s=0)
    a.append(_receipt(0))
    a.flush()
    b.append(_receipt(1))
    b.flush()  # b sees a's head
    a.append(_receipt(2))
    a.flush()  # a sees b's head
    a.close()
    b.close()
    for gone in ("a", "b"):
        d = tmp_path / f"without-{gone}"
        shutil.copytree(log, d)
        _delete(d, gone)
        assert any(f"segment {gone} missing" in p for p in _all_problems(verify_log(d))), gone


def test_an_anchored_segment_cut_short_with_its_head_rewritten_is_detected(tmp_path):
    _three_restarts(tmp_path)
    recs = (tmp_path / "w2.jsonl").read_text().splitlines()
    (tmp_path / "w2.jsonl").write_text("\n".join(recs[:2]) + "\n")
    last = json.loads(recs[1])
    (tmp_path / "w2.head.json").write_text(json.dumps({"writer": "w2", "seq": 1, "hash": last["hash"]}))
    report = verify_log(tmp_path)
    assert not report.ok
    assert any("ends at seq 1 but w3 anchored it at seq 3" in p for p in _all_problems(report)), report


def test_an_anchored_segment_rewritten_under_its_anchor_is_detected(tmp_path):
    _three_restarts(tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "w2.jsonl").read_text().splitlines()]
    prev = recs[0]["prev"]
    for r in recs:  # a consistent forgery of the whole segment and its head
        r.pop("hash")
        r["prev"], r["k"] = prev, 0.0
        r["hash"] = prev = rc.chain_hash(prev, r)
    (tmp_path / "w2.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    (tmp_path / "w2.head.json").write_text(json.dumps({"writer": "w2", "seq": 3, "hash": prev}))
    problems = _all_problems(verify_log(tmp_path))
    assert any("seq 3 does not match the hash w3 anchored" in p for p in problems), problems


def test_a_format_2_segment_is_anchored_by_the_first_writer_after_the_upgrade(tmp_path):
    shutil.copytree(FORMAT_2_LOG, tmp_path, dirs_exist_ok=True)
    _write(tmp_path, "after-upgrade", range(1))
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 17, report
    assert {r["format_version"] for r in _records(tmp_path / "20260528T000000-format2.jsonl")} == {2}  # untouched
    _delete(tmp_path, "20260528T000000-format2")
    assert any("segment 20260528T000000-format2 missing (last seen seq 15" in p
               for p in _all_problems(verify_log(tmp_path)))


def test_a_format_3_log_without_anchors_still_verifies_and_reads_on_0_to_100(tmp_path):
    prev, lines = rc.GENESIS, []
    for i in range(3):
        rec = {"format_version": 3, "seq": i, "prev": prev, **_receipt(i).model_dump()}
        rec["hash"] = prev = rc.chain_hash(prev, rec)
        lines.append(json.dumps(rec, sort_keys=True))
    (tmp_path / "old.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "old.head.json").write_text(json.dumps({"writer": "old", "seq": 2, "hash": prev}))
    report = verify_log(tmp_path)
    assert report.ok and report.receipts == 3 and [t.segment for t in report.tips] == ["old.jsonl"]
    assert [r["k"] for r in read_receipts(tmp_path)] == [90.0] * 3  # format 3 is on 0-100 already: not scaled again


def test_a_torn_tail_cut_inside_a_multibyte_character_crashes_neither_readers_nor_verify(tmp_path):
    w = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    w.append(_receipt(0))
    w.flush()
    size = (tmp_path / "w.jsonl").stat().st_size
    w.append(_receipt(1).model_copy(update={"specialist": "résumé-ünïcode"}))
    w.close()
    data = (tmp_path / "w.jsonl").read_bytes()
    cut = data.index("é".encode(), size) + 1  # inside the two bytes of "é"
    (tmp_path / "w.jsonl").write_bytes(data[:cut])
    [seg] = verify_log(tmp_path).segments
    assert any(f"torn tail: {cut - size} bytes after seq 0" in x for x in seg.warnings), seg
    assert [r["request_id"] for r in read_receipts(tmp_path)] == ["req-0"]


def test_a_segment_that_grows_while_the_log_is_verified_is_not_called_cut(tmp_path, monkeypatch):
    """verify_log reads a live segment, its writer appends and a sibling anchors the new head, then
    verify_log reads the sibling: the anchor is checked against the segment as it is now."""
    a = ReceiptWriter(tmp_path, "a", flush_interval_s=60, anchor_interval_s=0)
    b = ReceiptWriter(tmp_path, "b", flush_interval_s=60, anchor_interval_s=0)
    a.append(_receipt(0))
    a.flush()
    seen_by_verify = {n: (tmp_path / n).read_bytes() for n in ("a.jsonl", "a.head.json")}
    a.append(_receipt(1))
    a.flush()
    b.append(_receipt(2))
    b.flush()  # anchors a at seq 1
    a.close()
    b.close()
    real = Path.read_bytes
    reads = []

    def stale_first_read(self):
        reads.append(self.name)
        return seen_by_verify[self.name] if self.name in seen_by_verify and reads.count(self.name) == 1 else real(self)

    monkeypatch.setattr(Path, "read_bytes", stale_first_read)
    report = verify_log(tmp_path)
    assert report.ok, report


def test_two_writers_on_one_id_cut_none_of_each_others_receipts(tmp_path):
    """A misuse (the same writer id opened twice at once) is reported as a forked chain, but the
    cut-off of failed appends never removes receipts another writer appended and acknowledged."""
    a = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    b = ReceiptWriter(tmp_path, "w", flush_interval_s=60)
    for i in range(4):
        (a if i % 2 else b).append(_receipt(i))
        (a if i % 2 else b).flush()
    a.close()
    b.close()
    assert sorted(r["request_id"] for r in read_receipts(tmp_path)) == [f"req-{i}" for i in range(4)]
    assert any("where" in p for p in _all_problems(verify_log(tmp_path)))


def test_kolm_receipts_verify_with_a_saved_report_catches_the_newest_segment_deleted(tmp_path):
    """The operator's routine: keep `verify --json` outside the store, pass it back with --anchors."""
    from click.testing import CliRunner

    from kolm_ray.cli import cli

    d = tmp_path / "receipts" / "kolm"
    _three_restarts(d)
    args = ["receipts", "verify", "--store", str(tmp_path), "--app-name", "kolm"]
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 0 and "tips        1 newest segment(s)" in plain.output, plain.output
    saved = tmp_path / "kept" / "tips.json"
    saved.parent.mkdir()
    saved.write_text(CliRunner().invoke(cli, [*args, "--json"]).output)
    _delete(d, "w3")
    assert CliRunner().invoke(cli, args).exit_code == 0  # the log alone cannot tell
    res = CliRunner().invoke(cli, [*args, "--anchors", str(saved)])
    assert res.exit_code == 1 and "segment w3 missing (last seen seq 1" in res.output, res.output
    saved.write_text("{not json")
    bad = CliRunner().invoke(cli, [*args, "--anchors", str(saved)])
    assert bad.exit_code == 2 and "tips.json" in bad.output and "kolm receipts verify --json" in bad.output, bad.output


def test_tips_saved_for_the_whole_store_check_one_app_and_the_other_way_round(tmp_path):
    from click.testing import CliRunner

    from kolm_ray.cli import cli

    d = tmp_path / "receipts" / "kolm"
    _three_restarts(d)
    base = ["receipts", "verify", "--store", str(tmp_path)]
    for saved_with, checked_with in ([[], ["--app-name", "kolm"]], [["--app-name", "kolm"], []]):
        saved = tmp_path / "tips.json"
        saved.write_text(CliRunner().invoke(cli, [*base, *saved_with, "--json"]).output)
        ok = CliRunner().invoke(cli, [*base, *checked_with, "--anchors", str(saved)])
        assert ok.exit_code == 0, ok.output  # the same log: every tip found where it was
    _delete(d, "w3")
    res = CliRunner().invoke(cli, [*base, "--anchors", str(saved)])
    assert res.exit_code == 1 and "segment w3 missing" in res.output, res.output


def test_an_empty_segment_a_writer_left_before_its_first_receipt_is_a_note_not_tampering(tmp_path):
    from kolm_ray.serve.receipts import verify_log

    _three_restarts(tmp_path)
    (tmp_path / "w4.jsonl").write_bytes(b"")  # killed between creating the file and its first append
    report = verify_log(tmp_path)
    assert report.ok, report
    assert any("empty segment" in w for s in report.segments for w in s.warnings)
