"""Receipts: one per call served (``Receipt``, kind "call"), and one per audit of a call
(``AuditRecord``, kind "audit", linked by the call's request id), in an append-only,
hash-chained log.

Each writer (one per ingress replica lifetime) owns one segment ``<dir>/<writer>.jsonl`` and
its head file ``<writer>.head.json``. A receipt carries ``seq`` (0, 1, 2, ...), ``prev`` (the
previous receipt's hash; 64 zeros for the first) and ``hash`` = SHA-256 over ``prev`` and the
receipt's canonical JSON without ``hash``. The head file names the last ``seq`` and ``hash``
written, so a receipt cut from the end is detected too. ``verify_log`` checks every segment:
an edited receipt breaks its hash, a dropped or reordered one breaks the chain (``prev`` and
``seq``), a truncated tail disagrees with the head.

Writing is off the request path: ``ReceiptWriter.append`` only queues the record; a background
thread hashes, appends and fsyncs every ``flush_interval_s`` and on ``close()`` (graceful
shutdown loses none). Must not compute scores or touch models.

Scores (T, C, L, K) are on 0-100, as in the eval report, ``kolm compare`` and ``kolm status``
(format 3). Logs written before (formats 1 and 2) hold them on 0-1 and are never rewritten (their
hashes must still verify): ``read_receipts`` hands every record to readers on the current scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict

log = logging.getLogger("kolm_ray.serve")
# 3: T/C/L/K on 0-100 (2 and 1 held them on 0-1); 2: records carry a kind ("call" or "audit"), 1 had calls only.
RECEIPT_FORMAT_VERSION = 3
SCORE_FIELDS = ("t", "c", "l", "k")
GENESIS = "0" * 64


class Receipt(BaseModel):
    """One served call. Inputs and outputs appear only as SHA-256 digests; the verifier's
    reference-free T, C, L, K of the output on 0-100 (``points``)."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["call"] = "call"
    time: float
    request_id: str
    specialist: str
    version: str
    artifact_sha256: str
    route: str  # "stable" or "canary" (a release's split), "pinned" (name@version), "latest"
    status: str  # "ok" or "error"
    input_sha256: str
    output_sha256: str | None
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    t: float | None
    c: float | None
    l: float | None  # noqa: E741
    k: float | None
    api_key: str | None = None  # the key's name, never the token


class AuditRecord(BaseModel):
    """One audit of a served call (``request_id`` links it to the call's receipt): the teacher's
    reference for the same input, and the call's output scored against it as the holdout is
    (T, C, L, K on 0-100). ``route`` "shadow" marks the canary's unseen answer to a stable call."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["audit"] = "audit"
    time: float
    request_id: str
    specialist: str
    version: str
    artifact_sha256: str
    route: str
    status: Literal["ok", "failed", "dropped"]  # failed: no reference (teacher error); dropped: queue full
    output_sha256: str | None = None
    reference_sha256: str | None = None
    t: float | None = None
    c: float | None = None
    l: float | None = None  # noqa: E741
    k: float | None = None
    passed: bool | None = None
    judge: str | None = None  # name@version whose task and verifier judged it (a release's stable)
    teacher: str | None = None
    cached: bool = False  # the reference came from the teacher cache: not paid again
    input_tokens: int = 0
    output_tokens: int = 0
    # This audit's share of what the teacher call cost: 0 when the reference came from the
    # cache, None when the teacher model has no price (``--prices``) to cost it with.
    cost_usd: float | None = 0.0
    error: str | None = None


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def points(checks: Any) -> dict[str, float | None]:
    """A verifier's ``Checks`` (0-1) as receipts record them: T, C, L, K on 0-100; all None
    without checks (an output that was never produced)."""
    return {f: None if checks is None or getattr(checks, f) is None else 100 * getattr(checks, f)
            for f in SCORE_FIELDS}


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record of any format as the current format reads (pure; the log itself is untouched):
    formats 1 and 2 held T, C, L, K on 0-1, so they are scaled to 0-100; format 1 had calls only.
    A record already current is returned as it is, so upgrading twice changes nothing."""
    version = record.get("format_version", 1)
    if not isinstance(version, int) or version >= RECEIPT_FORMAT_VERSION:
        return record
    out = {**record, "format_version": RECEIPT_FORMAT_VERSION, "stored_format_version": version}
    out.setdefault("kind", "call")
    for f in SCORE_FIELDS:
        if isinstance(out.get(f), (int, float)):
            out[f] = 100 * out[f]
    return out


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev + body).encode()).hexdigest()


@dataclass
class ReceiptWriter:
    """Buffered, hash-chained appends to one segment; flushed by a timer thread."""

    directory: Path
    writer_id: str
    flush_interval_s: float = 0.5
    _buf: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _io_lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _seq: int = 0
    _prev: str = GENESIS
    _thread: threading.Thread | None = None
    written: int = 0

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{self.writer_id}.jsonl"
        self.head_path = self.directory / f"{self.writer_id}.head.json"
        if self.path.exists():  # a writer id is used once; resume its chain rather than fork it
            for rec in _read_lines(self.path):
                self._seq, self._prev = rec["seq"] + 1, rec["hash"]
        self._thread = threading.Thread(target=self._run, name=f"receipts-{self.writer_id}", daemon=True)
        self._thread.start()

    def append(self, receipt: Receipt | AuditRecord) -> None:
        """Queue a receipt or an audit (microseconds; no I/O on the caller's thread)."""
        with self._lock:
            self._buf.append(receipt.model_dump())

    def flush(self) -> int:
        """Hash and append everything queued; returns how many receipts were written. On an I/O
        error the batch goes back to the front of the queue and the chain is not advanced."""
        with self._io_lock:
            with self._lock:
                batch, self._buf = self._buf, []
            if not batch:
                return 0
            seq, prev, lines = self._seq, self._prev, []
            for rec in batch:
                rec = {"format_version": RECEIPT_FORMAT_VERSION, "seq": seq, "prev": prev, **rec}
                rec["hash"] = chain_hash(prev, rec)
                seq, prev = seq + 1, rec["hash"]
                lines.append(json.dumps(rec, sort_keys=True, ensure_ascii=False))
            try:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                with self._lock:
                    self._buf[:0] = batch
                raise
            self._seq, self._prev = seq, prev
            tmp = self.head_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"writer": self.writer_id, "seq": self._seq - 1, "hash": self._prev}))
            os.replace(tmp, self.head_path)
            self.written += len(batch)
            return len(batch)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except OSError:  # a full or failing disk: keep the receipts queued and try again next tick
                log.exception("flushing receipts to %s failed; retrying", self.path)

    def close(self) -> None:
        """Stop the timer and write what is queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()


def _parse(line: str) -> dict[str, Any] | None:
    """A receipt line as a dict; None for one that is not a JSON object."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _read_lines(path: Path) -> Iterable[dict[str, Any]]:
    """Receipts of a segment for readers (the controller, status); a torn or garbled line (a
    writer killed mid-append) is skipped with a warning here and reported by ``verify_log``."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rec = _parse(line)
            if rec is None or not line.endswith("\n"):
                log.warning("skipping unreadable receipt at %s:%d", path, n)
                continue
            yield rec


class SegmentReport(BaseModel):
    segment: str
    receipts: int
    problems: list[str]


class LogReport(BaseModel):
    directory: str
    segments: list[SegmentReport]

    @property
    def ok(self) -> bool:
        return bool(self.segments) and not any(s.problems for s in self.segments)

    @property
    def receipts(self) -> int:
        return sum(s.receipts for s in self.segments)


def verify_segment(lines: list[str], head: dict[str, Any] | None) -> list[str]:
    """Problems found in one segment's lines (pure: no I/O). Empty means intact."""
    problems: list[str] = []
    prev, expect_seq = GENESIS, 0
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rec = _parse(line)
        if rec is None:
            problems.append(f"line {n}: not a receipt (not a JSON object)")
            prev = None  # type: ignore[assignment]
            continue
        claimed = rec.pop("hash", None)
        if rec.get("seq") != expect_seq:
            problems.append(f"line {n}: seq {rec.get('seq')} where {expect_seq} was due (dropped or reordered)")
        if prev is not None and rec.get("prev") != prev:
            problems.append(f"line {n}: chain broken (prev does not match the hash of the receipt before it)")
        if claimed != chain_hash(rec.get("prev", ""), rec):
            problems.append(f"line {n}: hash mismatch (receipt edited)")
        prev, expect_seq = claimed, (rec.get("seq") if isinstance(rec.get("seq"), int) else expect_seq) + 1
    if head is None:
        problems.append("head file missing")
    elif head.get("seq") != expect_seq - 1 or head.get("hash") != prev:
        problems.append(f"log ends at seq {expect_seq - 1} but its head records seq {head.get('seq')}: "
                        "receipts cut from the end")
    return problems


def verify_log(directory: Path) -> LogReport:
    """Verify every segment under ``directory`` (searched recursively)."""
    segments = []
    for seg in sorted(directory.rglob("*.jsonl")):
        head_path = seg.with_name(seg.name[: -len(".jsonl")] + ".head.json")
        head = None
        if head_path.is_file():
            try:
                head = json.loads(head_path.read_text())
            except json.JSONDecodeError:
                head = {"seq": "unreadable head file"}
            if not isinstance(head, dict):
                head = {"seq": "unreadable head file"}
        lines = seg.read_text(encoding="utf-8").splitlines()
        segments.append(SegmentReport(segment=str(seg.relative_to(directory)),
                                      receipts=sum(1 for x in lines if x.strip()),
                                      problems=verify_segment(lines, head)))
    heads_without_log = [h for h in directory.rglob("*.head.json")
                         if not h.with_name(h.name[: -len(".head.json")] + ".jsonl").is_file()]
    for h in heads_without_log:
        segments.append(SegmentReport(segment=str(h.relative_to(directory)), receipts=0,
                                      problems=["segment deleted: its head file remains"]))
    return LogReport(directory=str(directory), segments=segments)


def read_receipts(directory: Path, since: float | None = None) -> list[dict[str, Any]]:
    """Every receipt under ``directory`` (newer than ``since``), oldest first, each in the current
    format (``upgrade``: scores on 0-100 whichever format wrote it). A segment last written before
    ``since`` holds nothing newer (receipts are written after they are timed), so it is not read."""
    segments = [seg for seg in sorted(directory.rglob("*.jsonl")) if since is None or seg.stat().st_mtime >= since]
    out = [upgrade(r) for seg in segments for r in _read_lines(seg) if since is None or r["time"] >= since]
    return sorted(out, key=lambda r: r["time"])
