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

Segments are chained to each other (format 4): a writer's first receipt, and then one receipt
every ``anchor_interval_s`` while other segments grow, carries ``anchors``: the heads (writer,
seq, hash) of the other segments in its folder that no segment has anchored at that head yet
(a head names what its writer anchored, ``anchored``, so each head is anchored once, not by
every later writer). ``verify_log`` checks that every anchored segment exists and still holds
the anchored receipt: a segment deleted together with its head is reported missing (last seen
seq and hash), one cut short with its head rewritten is reported cut. The segments nothing
anchors yet (``LogReport.tips``: the newest) can only be checked against an anchor kept outside
the log (``verify_log(..., anchors=...)``).

Writing is off the request path: ``ReceiptWriter.append`` only queues the record; a background
thread hashes, appends and fsyncs every ``flush_interval_s`` and on ``close()`` (graceful
shutdown loses none). The segment on disk is always whole receipts ending where the writer's
chain ends: an append that fails part-way (ENOSPC, EIO, an exception) is cut off again and its
batch re-queued on the same ``seq``. A torn last line left by a writer killed mid-append is
reported by ``verify_log`` as a torn tail (those receipts were never completely written, so never
acknowledged) and skipped by readers; if the same writer id reopens the segment, the torn tail is
cut before its next append, and that receipt records the cut (``torn_tail``: bytes, SHA-256).
Must not compute scores or touch models.

Scores (T, C, L, K) are on 0-100, as in the eval report, ``kolm compare`` and ``kolm status``
(formats 3 and 4). Logs written before (formats 1 and 2) hold them on 0-1 and are never rewritten
(their hashes must still verify): ``read_receipts`` hands every record to readers on the current
scale. Format 3 logs (no anchors) still verify; the first format-4 writer beside them anchors them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict

from kolm_ray.durable import fsync_dir

log = logging.getLogger("kolm_ray.serve")
# 4: a receipt may carry ``anchors`` (other segments' heads) and ``torn_tail`` (a torn tail cut on reopen);
# later format-4 receipts also carry ``error`` (null unless status is "error"): an added field that
# readers take with ``.get`` (absent: the version's error), so no new format;
# 3: T/C/L/K on 0-100 (2 and 1 held them on 0-1); 2: records carry a kind ("call" or "audit"), 1 had calls only.
RECEIPT_FORMAT_VERSION = 4
FIRST_FORMAT_ON_0_100 = 3
SCORE_FIELDS = ("t", "c", "l", "k")
GENESIS = "0" * 64
# A failed call's ``error`` that says the serving path failed it (a 503), not the version it was routed to.
INFRA_ERRORS = frozenset({"overloaded", "unavailable"})


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
    status: str  # "ok" or "error" ("cancelled": the client hung up mid-stream)
    # What failed, when status is "error": "overloaded" or "unavailable" (INFRA_ERRORS, a 503 of
    # the serving path: a full queue, a replica gone or restarting) or "server_error" (the
    # version's generation failed, or a bug). Absent in receipts written before it was recorded.
    error: str | None = None
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
    formats 1 and 2 held T, C, L, K on 0-1, so they are scaled to 0-100; format 1 had calls only;
    format 3 differs from 4 only in lacking the optional ``anchors`` and ``torn_tail``. A record
    already current is returned as it is, so upgrading twice changes nothing."""
    version = record.get("format_version", 1)
    if not isinstance(version, int) or version >= RECEIPT_FORMAT_VERSION:
        return record
    out = {**record, "format_version": RECEIPT_FORMAT_VERSION, "stored_format_version": version}
    out.setdefault("kind", "call")
    if version < FIRST_FORMAT_ON_0_100:
        for f in SCORE_FIELDS:
            if isinstance(out.get(f), (int, float)):
                out[f] = 100 * out[f]
    return out


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev + body).encode()).hexdigest()


SEGMENT_SUFFIX = ".jsonl"
HEAD_SUFFIX = ".head.json"


def _load_head(path: Path) -> dict[str, Any] | None:
    """A head file's content; None for one that is missing, unreadable or not a JSON object."""
    try:
        head = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


@dataclass
class ReceiptWriter:
    """Buffered, hash-chained appends to one segment; flushed by a timer thread."""

    directory: Path
    writer_id: str
    flush_interval_s: float = 0.5
    # How often (at most) a flush looks at the other segments' heads and anchors the ones that grew;
    # the first flush always does.
    anchor_interval_s: float = 30.0
    _buf: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _io_lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _seq: int = 0
    _prev: str = GENESIS
    _thread: threading.Thread | None = None
    # Bytes of the segment that hold whole receipts ending on this writer's chain (``_seq``/``_prev``):
    # whatever lies past it when the next append starts is cut first.
    _size: int = 0
    _torn: dict[str, Any] | None = None  # a torn tail found on reopen: cut, and recorded, by the next append
    _uncut: bool = False  # a failed append could not be cut off: it is cut before the next one
    _anchored: dict[str, int] = field(default_factory=dict)  # writer -> the seq of its head this writer anchored
    _next_anchor_scan: float = 0.0  # time.monotonic()
    _head_cache: dict[str, tuple[tuple[int, int], dict[str, Any] | None]] = field(default_factory=dict)
    _head_stale: bool = False  # the last head update failed: retried on the next flush
    written: int = 0

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{self.writer_id}{SEGMENT_SUFFIX}"
        self.head_path = self.directory / f"{self.writer_id}{HEAD_SUFFIX}"
        if self.path.exists():  # a writer id is used once; resume its chain rather than fork it
            self._resume()
        self._thread = threading.Thread(target=self._run, name=f"receipts-{self.writer_id}", daemon=True)
        self._thread.start()

    def _resume(self) -> None:
        data = self.path.read_bytes()
        self._size = data.rfind(b"\n") + 1
        for line in reversed(data[: self._size].splitlines()):
            rec = _parse(line.decode("utf-8", errors="replace"))
            if rec is not None and isinstance(rec.get("seq"), int) and isinstance(rec.get("hash"), str):
                self._seq, self._prev = rec["seq"] + 1, rec["hash"]
                break
        tail = data[self._size:]
        if tail:
            self._torn = {"after_seq": self._seq - 1, "bytes": len(tail), "sha256": hashlib.sha256(tail).hexdigest()}
            log.warning("%s ends in a torn receipt (%d bytes after seq %d: a writer killed mid-append); "
                        "it is cut, and the cut recorded, before the next append", self.path, len(tail), self._seq - 1)
        head = _load_head(self.head_path)
        anchored = head.get("anchored") if head else None
        if isinstance(anchored, dict):
            self._anchored = {w: s for w, s in anchored.items() if isinstance(w, str) and isinstance(s, int)}

    def append(self, receipt: Receipt | AuditRecord) -> None:
        """Queue a receipt or an audit (microseconds; no I/O on the caller's thread)."""
        with self._lock:
            self._buf.append(receipt.model_dump())

    def flush(self) -> int:
        """Hash and append everything queued; returns how many receipts were written. On any
        error while appending, what was appended is cut off again, the batch goes back to the
        front of the queue and the chain is not advanced (the next flush writes it on the same
        seq). A failed head update is logged and retried on the next flush: the receipts are
        already durable."""
        with self._io_lock:
            with self._lock:
                batch, self._buf = self._buf, []
            if not batch:
                if self._head_stale:
                    self._write_head()
                return 0
            scanned = time.monotonic() >= self._next_anchor_scan
            anchors = self._anchors_due() if scanned else []
            seq, prev, lines = self._seq, self._prev, []
            for rec in batch:
                rec = {"format_version": RECEIPT_FORMAT_VERSION, "seq": seq, "prev": prev, **rec}
                if not lines:
                    if anchors:
                        rec["anchors"] = anchors
                    if self._torn is not None:
                        rec["torn_tail"] = self._torn
                rec["hash"] = chain_hash(prev, rec)
                seq, prev = seq + 1, rec["hash"]
                lines.append(json.dumps(rec, sort_keys=True, ensure_ascii=False))
            data = ("\n".join(lines) + "\n").encode("utf-8")
            try:
                self._append(data)
            except BaseException:
                with self._lock:
                    self._buf[:0] = batch
                raise
            self._seq, self._prev, self._size, self._torn = seq, prev, self._size + len(data), None
            self._anchored.update({a["writer"]: a["seq"] for a in anchors})
            if scanned:
                self._next_anchor_scan = time.monotonic() + self.anchor_interval_s
            self.written += len(batch)
            self._write_head()
            return len(batch)

    def _append(self, data: bytes) -> None:
        """Append ``data`` and fsync, or leave the segment as it was (``_size`` bytes) and raise."""
        created = not self.path.exists()
        with self.path.open("ab", buffering=0) as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            if size > self._size and (self._torn is not None or self._uncut):
                if self._uncut:
                    log.warning("cutting %d bytes of a failed append from %s before appending again",
                                size - self._size, self.path)
                os.ftruncate(fd, self._size)  # a torn tail found on reopen, or an append whose cut-off failed
                self._uncut = False
            elif size != self._size:  # not this writer's doing: cut nothing, leave it for verify_log to report
                log.error("%s changed from %d to %d bytes under its writer (receipts removed, or a second "
                          "writer with the same id)", self.path, self._size, size)
                self._size = size
            try:
                view = memoryview(data)
                while view:
                    n = f.write(view)
                    if not n:
                        raise OSError(f"short write to {self.path}")
                    view = view[n:]
                os.fsync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, self._size)
                    os.fsync(fd)
                except OSError:
                    self._uncut = True
                    log.exception("could not cut a failed append from %s; it is cut before the next one", self.path)
                raise
        if created:
            fsync_dir(self.directory)

    def _write_head(self) -> None:
        """Replace the head at once (its bytes fsynced first, so a crash leaves the old head or the
        new one, never an empty one). The folder is not fsynced: a rename lost in a crash leaves the
        old head, behind its segment, which ``verify_log`` tells from receipts cut off."""
        head = {"writer": self.writer_id, "seq": self._seq - 1, "hash": self._prev, "anchored": self._anchored}
        tmp = self.directory / f".{self.writer_id}{HEAD_SUFFIX}.tmp"
        try:
            with tmp.open("wb") as f:
                f.write(json.dumps(head, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.head_path)
            self._head_stale = False
        except OSError:
            self._head_stale = True
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.exception("updating %s failed; retried on the next flush", self.head_path)

    def _anchors_due(self) -> list[dict[str, Any]]:
        """The heads of the other segments beside this one that no head says it anchored yet (at
        that seq or later): the tips of the chain of segments. Never raises (a failure only leaves
        them for the next scan)."""
        try:
            heads: dict[str, dict[str, Any]] = {}
            covered = dict(self._anchored)
            for entry in os.scandir(self.directory):
                if not entry.name.endswith(HEAD_SUFFIX):
                    continue
                writer = entry.name[: -len(HEAD_SUFFIX)]
                if writer == self.writer_id or not (self.directory / f"{writer}{SEGMENT_SUFFIX}").is_file():
                    continue
                st = entry.stat()
                key = (st.st_mtime_ns, st.st_size)
                cached = self._head_cache.get(writer)
                head = cached[1] if cached and cached[0] == key else _load_head(Path(entry.path))
                self._head_cache[writer] = (key, head)
                if head is None or not isinstance(head.get("seq"), int) or not isinstance(head.get("hash"), str):
                    continue
                heads[writer] = head
                claims = head.get("anchored")
                for w, seq in (claims.items() if isinstance(claims, dict) else ()):
                    if isinstance(seq, int) and w != writer:
                        covered[w] = max(covered.get(w, -1), seq)
            return [{"writer": w, "seq": h["seq"], "hash": h["hash"]} for w, h in sorted(heads.items())
                    if h["seq"] >= 0 and h["seq"] > covered.get(w, -1)]
        except OSError:
            log.exception("reading the heads beside %s failed; anchoring them later", self.path)
            return []

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a full or failing disk: keep the receipts queued, retry next tick
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
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            rec = _parse(raw.decode("utf-8", errors="replace")) if raw.endswith(b"\n") else None
            if rec is None:
                log.warning("skipping unreadable receipt at %s:%d", path, n)
                continue
            yield rec


class SegmentHead(BaseModel):
    """Where a segment ends (or ended when it was anchored): ``segment`` relative to the folder verified."""

    segment: str
    seq: int
    hash: str


class SegmentReport(BaseModel):
    segment: str
    receipts: int
    problems: list[str]  # tampering (or a loss that cannot be told from it): verification fails
    warnings: list[str] = []  # what a crash leaves (a torn tail, a head behind its segment): said, not failed


class LogReport(BaseModel):
    directory: str
    segments: list[SegmentReport]
    # Segments whose last receipt no other segment anchors (the newest ones): deleting one with its
    # head leaves nothing in the log that misses it; keep these outside the log and pass them back as
    # ``verify_log(..., anchors=...)`` to catch that.
    tips: list[SegmentHead] = []

    @property
    def ok(self) -> bool:
        return bool(self.segments) and not any(s.problems for s in self.segments)

    @property
    def receipts(self) -> int:
        return sum(s.receipts for s in self.segments)


@dataclass
class _Checked:
    problems: list[str]
    warnings: list[str]
    receipts: int
    last_seq: int
    last_hash: str | None
    anchors: list[tuple[int, str, int, str]]  # (line, writer, seq, hash)


def _anchor_list(value: Any) -> list[tuple[str, int, str]] | None:
    if not isinstance(value, list):
        return None
    out = []
    for a in value:
        if not (isinstance(a, dict) and isinstance(a.get("writer"), str) and isinstance(a.get("seq"), int)
                and isinstance(a.get("hash"), str)):
            return None
        out.append((a["writer"], a["seq"], a["hash"]))
    return out


def _check_segment(data: bytes, head: dict[str, Any] | None) -> _Checked:
    """One segment's bytes against its head (pure). Whole lines end in a newline; bytes after the
    last newline are a torn tail (a writer killed mid-append), reported as a warning."""
    end = data.rfind(b"\n") + 1
    body, tail = data[:end].decode("utf-8", errors="replace"), data[end:]
    problems: list[str] = []
    warnings: list[str] = []
    anchors: list[tuple[int, str, int, str]] = []
    prev: str | None = GENESIS
    expect_seq, receipts = 0, 0
    head_seq = head.get("seq") if head is not None else None
    hash_at_head_seq: str | None = None
    for n, line in enumerate(body.split("\n")[:-1], start=1):
        if not line.strip():
            continue
        receipts += 1
        rec = _parse(line)
        if rec is None:
            problems.append(f"line {n}: not a receipt (not a JSON object)")
            prev = None
            continue
        claimed = rec.pop("hash", None)
        if rec.get("seq") != expect_seq:
            problems.append(f"line {n}: seq {rec.get('seq')} where {expect_seq} was due (dropped or reordered)")
        if prev is not None and rec.get("prev") != prev:
            problems.append(f"line {n}: chain broken (prev does not match the hash of the receipt before it)")
        if claimed != chain_hash(rec.get("prev", ""), rec):
            problems.append(f"line {n}: hash mismatch (receipt edited)")
        if "anchors" in rec:
            got = _anchor_list(rec["anchors"])
            if got is None:
                problems.append(f"line {n}: unreadable anchors")
            anchors += [(n, w, s, h) for w, s, h in got or []]
        torn = rec.get("torn_tail")
        if isinstance(torn, dict):
            warnings.append(f"line {n}: {torn.get('bytes')} bytes of a torn tail after seq {torn.get('after_seq')} "
                            "were cut when its writer reopened the segment (receipts a killed writer never "
                            "completely wrote, so never acknowledged)")
        if head_seq is not None and rec.get("seq") == head_seq and hash_at_head_seq is None:
            hash_at_head_seq = claimed if isinstance(claimed, str) else ""
        prev, expect_seq = claimed, (rec.get("seq") if isinstance(rec.get("seq"), int) else expect_seq) + 1
    last_seq = expect_seq - 1
    if tail:
        warnings.append(f"torn tail: {len(tail)} bytes after seq {last_seq} (a writer killed mid-append: "
                        "receipts never completely written, so never acknowledged; readers skip them)")
    if head is None:
        if receipts:
            problems.append("head file missing")
        elif not tail:  # a writer that died (or hit a full disk) before its first append completed
            warnings.append("empty segment without a head: its writer stopped before its first receipt was written")
    elif head_seq == last_seq and head.get("hash") == prev:
        pass
    elif isinstance(head_seq, int) and head_seq < last_seq and head.get("hash") == hash_at_head_seq:
        warnings.append(f"log ends at seq {last_seq} but its head records seq {head_seq}: the writer stopped "
                        "between an append and its head update (the receipts after it verify by the chain)")
    elif isinstance(head_seq, int) and head_seq <= last_seq and hash_at_head_seq is not None:
        problems.append(f"its head records seq {head_seq} with a hash the log's receipt at seq {head_seq} "
                        "does not have: head or receipts rewritten")
    else:
        problems.append(f"log ends at seq {last_seq} but its head records seq {head_seq}: "
                        "receipts cut from the end")
    return _Checked(problems, warnings, receipts, last_seq, prev if isinstance(prev, str) else None, anchors)


def verify_segment(lines: list[str], head: dict[str, Any] | None) -> list[str]:
    """Problems found in one segment's lines (pure: no I/O). Empty means intact."""
    return _check_segment("".join(f"{x}\n" for x in lines).encode("utf-8"), head).problems


def _hashes_at(path: Path, seqs: set[int]) -> dict[int, str]:
    """The hash of the first receipt with each of ``seqs`` in a segment (read again, line by line)."""
    out: dict[int, str] = {}
    for rec in _read_lines(path):
        seq = rec.get("seq")
        if seq in seqs and seq not in out and isinstance(rec.get("hash"), str):
            out[seq] = rec["hash"]
    return out


def verify_log(directory: Path, anchors: Iterable[SegmentHead | Mapping[str, Any]] = ()) -> LogReport:
    """Verify every segment under ``directory`` (searched recursively), each against its head and
    against the anchors other segments hold of it; ``anchors`` adds heads kept outside the log (a
    report's ``tips`` stored earlier), ``segment`` relative to ``directory``."""
    checked: dict[Path, _Checked] = {}
    reports: dict[Path, SegmentReport] = {}

    def rel(p: Path) -> str:
        return str(p.relative_to(directory))

    for seg in sorted(directory.rglob(f"*{SEGMENT_SUFFIX}")):
        head_path = seg.with_name(seg.name[: -len(SEGMENT_SUFFIX)] + HEAD_SUFFIX)
        head = None
        if head_path.is_file():
            head = _load_head(head_path) or {"seq": "unreadable head file"}
        c = checked[seg] = _check_segment(seg.read_bytes(), head)
        reports[seg] = SegmentReport(segment=rel(seg), receipts=c.receipts, problems=list(c.problems),
                                     warnings=list(c.warnings))
    for h in sorted(directory.rglob(f"*{HEAD_SUFFIX}")):
        seg = h.with_name(h.name[: -len(HEAD_SUFFIX)] + SEGMENT_SUFFIX)
        if seg not in checked:
            reports[seg] = SegmentReport(segment=rel(seg), receipts=0,
                                         problems=["segment deleted: its head file remains"])

    # Every anchor: (seq, hash, who anchored it, where)
    anchored: dict[Path, list[tuple[int, str, str, str]]] = defaultdict(list)
    for seg, c in checked.items():
        for line, writer, seq, h in c.anchors:
            if writer and "/" not in writer and writer not in (".", ".."):
                anchored[seg.parent / f"{writer}{SEGMENT_SUFFIX}"].append(
                    (seq, h, seg.name[: -len(SEGMENT_SUFFIX)], f"{rel(seg)} line {line}"))
    in_log = {target: max(seq for seq, *_ in refs) for target, refs in anchored.items()}
    for a in anchors:
        a = a if isinstance(a, SegmentHead) else SegmentHead.model_validate(a)
        anchored[directory / a.segment].append((a.seq, a.hash, "an anchor kept outside the log", a.segment))

    # An anchor the segment as read does not bear out is checked against the segment read again, now:
    # a live writer may have appended (and been anchored) after its segment was read above.
    lookups: dict[Path, set[int]] = defaultdict(set)
    for target, refs in anchored.items():
        name = target.name[: -len(SEGMENT_SUFFIX)]
        c = checked.get(target)
        if c is None and not target.is_file():
            seq, h, by, where = max(refs)
            report = reports.setdefault(target, SegmentReport(segment=rel(target), receipts=0, problems=[]))
            report.problems.insert(0, f"segment {name} missing (last seen seq {seq}, hash {h[:16]}…, "
                                      f"anchored by {by}, {where})")
            continue
        lookups[target].update(seq for seq, h, *_ in refs if c is None or seq != c.last_seq or h != c.last_hash)
    for target, seqs in lookups.items():
        if not seqs:
            continue
        found = _hashes_at(target, seqs)
        c = checked.get(target)
        last_seq = max([c.last_seq if c else -1, *found])
        report = reports.get(target)
        for seq, h, by, where in sorted(anchored[target]):
            if seq not in seqs or found.get(seq) == h:
                continue
            if seq in found:
                problem = f"seq {seq} does not match the hash {by} anchored ({where}): receipts rewritten"
            elif seq > last_seq:
                problem = (f"segment ends at seq {last_seq} but {by} anchored it at seq {seq} ({where}): "
                           "receipts cut from the end")
            else:
                problem = f"no receipt with seq {seq}, which {by} anchored ({where}): receipts dropped"
            if report is None:  # written since the folder was listed
                report = reports[target] = SegmentReport(segment=rel(target), receipts=0, problems=[])
            report.problems.append(problem)

    tips = [SegmentHead(segment=rel(seg), seq=c.last_seq, hash=c.last_hash) for seg, c in checked.items()
            if c.last_seq >= 0 and c.last_hash is not None and in_log.get(seg, -1) < c.last_seq]
    return LogReport(directory=str(directory), segments=[reports[k] for k in sorted(reports)], tips=tips)


def read_receipts(directory: Path, since: float | None = None) -> list[dict[str, Any]]:
    """Every receipt under ``directory`` (newer than ``since``), oldest first, each in the current
    format (``upgrade``: scores on 0-100 whichever format wrote it). A segment last written before
    ``since`` holds nothing newer (receipts are written after they are timed), so it is not read."""
    segments = [seg for seg in sorted(directory.rglob(f"*{SEGMENT_SUFFIX}"))
                if since is None or seg.stat().st_mtime >= since]
    out = [upgrade(r) for seg in segments for r in _read_lines(seg) if since is None or r["time"] >= since]
    return sorted(out, key=lambda r: r["time"])
