"""`kolm report --html` opened in a real headless browser (Chromium from the OS packages; .ci/run
installs it): the plots rendered (plotly's SVG traces exist in the DOM after its scripts ran, and
the screenshot holds their colours), and every figure in the page's table equals the report's JSON
from the same run. The inputs come from kolm's own writers: signed artifacts (make_artifact, then
re-signed with the compile costs a compile records), the release state through its transitions,
and receipts through ReceiptWriter."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kolm_ray.publish.release import ReleaseStore, Version, add_version, promote, rollback

DAY = 86400.0
TASK = "Route the customer message to one team: billing, account or bug."
REFS = [("I was charged twice for my invoice", "billing"), ("I cannot log in to my account", "account")]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def _with_costs(artifact: Path, teacher_usd: float, gpu_s: float, cpu_s: float) -> Path:
    """The artifact re-signed (kolm's key) with the compile figures a real compile records."""
    from kolm_ray.artifact import CONTENT_DIR, pack, unpacked
    from kolm_ray.durable import write_json
    from kolm_ray.signing import KeySigner, ensure_default_key

    with unpacked(artifact) as root, tempfile.TemporaryDirectory() as td:
        content = root / CONTENT_DIR
        manifest = json.loads((content / "manifest.json").read_text())
        manifest["teacher"].update(model="claude-sonnet-4-6", cost_usd=teacher_usd + 1.0,  # the dataset, cached
                                   paid_this_run_usd=teacher_usd)  # samples included; what this compile paid
        manifest["compute"] = {"teacher_cost_usd": teacher_usd, "fit_gpu_seconds": gpu_s, "eval_gpu_seconds": 60.0,
                               "fit_cpu_seconds": cpu_s, "eval_cpu_seconds": 0.0}
        write_json(content / "manifest.json", manifest)
        sig = Path(td) / "specialist.sig"
        KeySigner(ensure_default_key()).sign(content, sig)
        return pack(content, sig, artifact)


def _digest(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def env(kolm_home: Path, tiny_base: Path) -> dict:
    """prod: route 1.0 stable, 1.1 published as canary, promoted, rolled back; tldr 1.0 with calls;
    idle 1.0 with none. Six days of receipts."""
    from kolm_ray.serve.receipts import AuditRecord, Receipt, ReceiptWriter
    from kolm_ray.testing.artifacts import make_artifact

    store = kolm_home / "artifacts"
    arts = {}
    for i, (name, v) in enumerate([("route", (1, 0)), ("route", (1, 1)), ("tldr", (1, 0)), ("idle", (1, 0))]):
        a = make_artifact(store, tiny_base, name, v, task=TASK, references=REFS, seed=i)
        arts[(name, f"{v[0]}.{v[1]}")] = _with_costs(a, teacher_usd=3.0 + i, gpu_s=900.0 * (i + 1), cpu_s=120.0)
    now = time.time()
    t0 = now - 6 * DAY
    ver = {k: Version(version=k[1], artifact=str(p), artifact_sha256=_digest(p)) for k, p in arts.items()}

    def release(s):
        route = add_version(None, "route", ver[("route", "1.0")], now=t0, weight=0.1, hold_s=0, min_samples=1,
                        tolerance=0.5)
        route = add_version(route, "route", ver[("route", "1.1")], now=t0 + 2 * DAY, weight=0.1, hold_s=0,
                        min_samples=1, tolerance=0.5)
        route = promote(route, now=t0 + 3 * DAY, reason="audited K within 5 points")
        route = rollback(route, now=t0 + 5 * DAY, reason="manual rollback")
        tldr = add_version(None, "tldr", ver[("tldr", "1.0")], now=t0 + 60, weight=0.1, hold_s=0, min_samples=1,
                       tolerance=0.5)
        idle = add_version(None, "idle", ver[("idle", "1.0")], now=t0 + 120, weight=0.1, hold_s=0, min_samples=1,
                       tolerance=0.5)
        return s.model_copy(update={"releases": {"route": route, "tldr": tldr, "idle": idle}})

    ReleaseStore(kolm_home, "prod").update(release)
    w = ReceiptWriter(kolm_home / "receipts" / "kolm-prod", "ingress-1", flush_interval_s=3600)
    n = 0
    for day in range(6):
        for i in range(20 + 10 * day):
            t = t0 + day * DAY + 3600 + i * 90
            name = "route" if i % 3 else "tldr"
            version = "1.1" if name == "route" and 2 <= day < 5 and i % 2 else "1.0"
            n += 1
            w.append(Receipt(time=t, request_id=f"r{n}", specialist=name, version=version,
                             artifact_sha256=ver[(name, version)].artifact_sha256, route="stable", status="ok",
                             input_sha256="0" * 64, output_sha256="1" * 64, latency_ms=250.0 + i,
                             prompt_tokens=1200 + 10 * i, completion_tokens=40 + i, t=None, c=100.0, l=None,
                             k=70.0 + day + (i % 5)))
            if i % 4 == 0:
                w.append(AuditRecord(time=t + 5, request_id=f"r{n}", specialist=name, version=version,
                                     artifact_sha256=ver[(name, version)].artifact_sha256, route="stable",
                                     status="ok", k=60.0 + day, t=50.0, c=100.0, passed=True, judge=f"{name}@1.0",
                                     teacher="claude-sonnet-4-6", input_tokens=900, output_tokens=30,
                                     cost_usd=0.0032))
    w.close()
    return {"home": kolm_home, "arts": arts}


def _kolm(home: Path, *args: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "KOLM_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "kolm_ray.cli", *args], env=e, capture_output=True, text=True, check=False,
                          timeout=300)


def test_the_html_report_renders_in_chromium_and_matches_the_json(env, tmp_path: Path):
    chromium = _chromium()
    page = tmp_path / "report.html"
    res = _kolm(env["home"], "report", "--env", "prod", "--since", "30d", "--gpu-hour-price", "2.50",
                "--gpu-share", "0.25", "--json", "--html", str(page))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [s["name"] for s in report["specialists"]] == ["idle", "route", "tldr"]
    assert report["total"]["calls"] == sum(20 + 10 * d for d in range(6))
    route = next(s for s in report["specialists"] if s["name"] == "route")
    assert [v["version"] for v in route["versions"]] == ["1.0", "1.1"] and all(v["found"] for v in route["versions"])
    assert {v["artifact_sha256"] for v in route["versions"]} == {_digest(env["arts"][("route", v)]) for v in ("1.0", "1.1")}
    assert [v["teacher_usd"] for v in route["versions"]] == [3.0, 4.0]  # paid by each compile, not the dataset's
    assert route["frontier_monthly_usd"] == pytest.approx(route["frontier"]["usd"] * 30 / route["days"])
    assert [e["action"] for e in report["events"] if e["specialist"] == "route"] == ["publish", "publish", "promote",
                                                                                      "rollback"]
    text = page.read_text()
    assert "Plotly.newPlot" in text and not re.search(r"<script[^>]*\bsrc=", text)  # plotly.js inlined: offline

    # The page after its scripts ran.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=20000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, check=False,
                         timeout=180).stdout
    for key in ("calls", "cost", "k"):
        plot = dom[dom.index(f'id="plot-{key}"'):]
        plot = plot[: plot.index("</section>")] if "</section>" in plot else plot
        assert 'class="main-svg"' in plot, f"plot {key} did not render"
        traces = plot.split('class="trace ')[1:]  # plotly's SVG groups, one per trace drawn
        assert traces and all(re.search(r'<path[^>]* d="M[\d.]', t) for t in traces), f"plot {key}: no drawn trace"
    assert len(re.findall(r'class="trace bars"', dom)) == 3  # a bar trace per Specialist
    notes = [html.unescape(t) for t in re.findall(r'class="annotation-text"[^>]*>(.*?)</text>', dom)]
    assert any("promote route 1.1" in n for n in notes) and any("rollback route 1.1" in n for n in notes), notes

    # Every figure in the table equals the JSON's.
    from kolm_ray.report.compute import Line
    from kolm_ray.report.render import COLUMNS, cell

    cells = dict(re.findall(r'<td data-key="([^"]+)">([^<]*)</td>', dom))
    rows = {s["name"]: s for s in report["specialists"]} | {"total": report["total"]}
    assert len(cells) == len(rows) * len(COLUMNS)
    for name, row in rows.items():
        for _, field, fmt in COLUMNS:
            shown = html.unescape(cells[f"{name}.{field}"])
            assert shown == cell(Line.model_validate(row), field, fmt), (name, field, shown)
            if row[field] is not None:
                number = float(re.sub(r"[^0-9.\-]", "", shown))
                assert number == pytest.approx(row[field], abs=0.05 + 1e-9 * abs(row[field])), (name, field)
    assert float(cells["total.calls"].replace(",", "")) == report["total"]["calls"]

    # The screenshot is not blank, and holds the plots' colours (plotly's first trace colour, #636efa).
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1280,2600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=180, check=False)
    from PIL import Image, ImageStat

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2600)
    assert max(ImageStat.Stat(img.convert("L")).stddev) > 10
    blue = sum(1 for r, g, b in img.getdata() if abs(r - 99) < 20 and abs(g - 110) < 20 and abs(b - 250) < 20)
    assert blue > 500, "no plot colour in the screenshot"


def test_the_text_report_is_the_before_after_table(env):
    res = _kolm(env["home"], "report", "--env", "prod", "--gpu-share", "0.25")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("kolm report · prod") and "0.25 of a GPU" in lines[0]
    assert lines[2].split()[:2] == ["Specialist", "calls"]
    assert [ln.split()[0] for ln in lines[3:6]] == ["idle", "route", "tldr"] and lines[7].startswith("total")
