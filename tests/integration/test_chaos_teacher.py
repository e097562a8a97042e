"""Chaos: the teacher is down for two minutes (every message answered 529 overloaded), then
recovers. `kolm sample` with its default retry policy, as a user runs it (a process of its
own on the cluster), rides it out, finishes with every sample, and says what happened: how
many 529s, how many retries, and how long the teacher did not answer.

About 2.5 minutes: the outage itself, then up to one backoff step (60 s at most, usually
less) until the samples' next attempts find the teacher back.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from kolm_ray.sampling.config import TeacherConfig
from kolm_ray.testing.corpus import TLDR_TASK, tldr_rows
from kolm_ray.testing.messages_api import replay_responder

OUTAGE_S = 120.0


def test_sample_rides_out_a_two_minute_teacher_outage_and_reports_it(ray_session, messages_api, monkeypatch, tmp_path):
    rows = tldr_rows(4, seed=21)
    srv = messages_api(replay_responder({r.input: r.output for r in rows}))
    monkeypatch.setenv("ANTHROPIC_API_KEY", f"test-key-{uuid.uuid4().hex[:8]}")  # a quota of its own
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(r.to_json() for r in rows) + "\n")
    out = tmp_path / "samples"
    srv.outage(OUTAGE_S, from_first_request=True)  # down from the first call on, for two minutes
    kolm = str(Path(sys.executable).parent / "kolm")
    done = subprocess.run([kolm, "sample", TLDR_TASK, "--examples", str(path), "--k", "1", "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_samples"] == 0 and summary["calls"] == 4 and srv.stats.succeeded == 4
    # Every 529 the stand-in sent is counted, as a retry and in the outage.
    sent = srv.stats.outage_rejected
    assert sent >= 4 * 5  # each sample tried at least through its first five backoffs
    assert summary["retries_by_kind"] == {"overloaded": sent} and summary["retries"] == sent
    outage = summary["outage"]
    assert outage["failures"] == sent and outage["by_kind"] == {"overloaded": sent}
    # From the first 529 to the first answer: the whole outage, and at most one backoff step
    # (with its jitter) more; the teacher back only once the outage was over.
    assert OUTAGE_S - 1 <= outage["longest_s"] <= OUTAGE_S + TeacherConfig().backoff_max_s * 1.5
    assert 0 <= outage["started_at"] - srv.outage_started_at < 5 and outage["ended_at"] >= srv.outage_until
    # Within the policy: no sample used more attempts than it allows.
    attempts = pq.read_table(out / "samples.parquet").column("attempts").to_pylist()
    assert max(attempts) <= TeacherConfig().max_attempts and sum(attempts) == 4 + sent
    # What the user reads.
    assert "outage      teacher unavailable for" in done.stdout, done.stdout
    assert f"{sent} failed calls: {sent} overloaded (529)" in done.stdout
    assert f"{sent} retries (overloaded {sent})" in done.stdout
