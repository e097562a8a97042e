"""`kolm compare`: the pure comparison and decision, then the command on real signed artifacts."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from kolm_ray.artifact import ARTIFACT_FORMAT_VERSION, CONTENT_DIR, pack
from kolm_ray.cli import cli
from kolm_ray.compare import SideMeta, compare, recommend
from kolm_ray.errors import InputError
from kolm_ray.signing import KeySigner, ensure_default_key

RUNNER = CliRunner()
OLD = SideMeta(name="tldr", version="1.0", source="old.kolm")
NEW = SideMeta(name="tldr", version="1.1", source="new.kolm")


def _side(k, passed, output="out", t=0.9, c=0.9, l=0.9):  # noqa: E741
    return {"output": output, "t": t, "c": c, "l": l, "k": k, "passed": passed}


def _report(*rows):
    """rows: (id, student side[, input]) -> an eval.json of the shape compile writes."""
    out = []
    for row in rows:
        rid, student = row[0], row[1]
        inp = row[2] if len(row) > 2 else f"input {rid}"
        out.append({"id": rid, "input": inp, "reference": f"ref {rid}", "student": student,
                    "base": _side(0.1, False, output="base")})
    return {"student": {}, "base": {}, "rows": out}


# ----- the pure function ----------------------------------------------------------------------


def test_improvement_is_promoted_and_printed_in_the_documented_form():
    old = dict(k=0.928, t=0.949, c=0.910, l=0.929)
    new = dict(k=0.934, t=0.951, c=0.920, l=0.928)
    r = compare(
        _report(("a", _side(passed=True, **old)), ("b", _side(passed=False, **old)),
                ("c", _side(passed=False, **old)), ("d", _side(passed=False, **old))),
        _report(*[(rid, _side(passed=True, **new)) for rid in "abcd"]),
        OLD, NEW,
    )
    assert r.recommendation == "promote" and r.improvements == 3 and r.improved == ["b", "c", "d"]
    assert r.regressions == [] and r.notes == [] and r.shared_rows == 4
    assert r.lines() == [
        "K-score          93.4 ↑ from 92.8 (+0.6)",
        "T / C / L        95.1 / 92.0 / 92.8  (+0.2 / +1.0 / -0.1)",
        "regressions      0",
        "improvements     3",
        "recommended      promote new artifact",
    ]


def test_k_drop_beyond_tolerance_is_rejected():
    r = compare(_report(("a", _side(0.90, True)), ("b", _side(0.80, True))),
                _report(("a", _side(0.88, True)), ("b", _side(0.80, True))),
                OLD, NEW, tolerance=0.5)
    assert r.delta_k == pytest.approx(-1.0)
    assert r.recommendation == "reject" and "fell by 1.0" in r.reason
    assert r.lines()[0] == "K-score          84.0 ↓ from 85.0 (-1.0)"


def test_equal_k_with_a_regression_is_held_unless_allowed():
    old = _report(("a", _side(0.80, True, output="the old answer")), ("b", _side(0.70, False)))
    new = _report(("a", _side(0.70, False, output="the new answer")), ("b", _side(0.80, True)))
    held = compare(old, new, OLD, NEW, max_regressions=0)
    assert held.delta_k == pytest.approx(0.0) and held.recommendation == "hold"
    assert held.improvements == 1
    [reg] = held.regressions
    assert (reg.id, reg.old_output, reg.new_output) == ("a", "the old answer", "the new answer")
    assert reg.old_k == pytest.approx(80.0) and reg.new_k == pytest.approx(70.0)
    lines = held.lines()
    assert lines[0] == "K-score          75.0 = from 75.0 (+0.0)"
    assert lines[4].startswith("recommended      hold: ")
    assert "  a  (k 80.0 → 70.0)" in lines and "    old  the old answer" in lines and "    new  the new answer" in lines

    assert compare(old, new, OLD, NEW, max_regressions=1).recommendation == "promote"


def test_decision_at_the_tolerance_boundary():
    assert recommend(-0.5, 0, tolerance=0.5, max_regressions=0)[0] == "promote"
    assert recommend(-0.51, 0, tolerance=0.5, max_regressions=0)[0] == "reject"
    assert recommend(-0.51, 5, tolerance=0.5, max_regressions=0)[0] == "reject"  # reject outranks hold
    assert recommend(3.0, 1, tolerance=0.5, max_regressions=0)[0] == "hold"
    assert recommend(0.0, 0, tolerance=0.0, max_regressions=0)[0] == "promote"


def test_differing_holdouts_are_noted_and_only_shared_rows_compared():
    old = _report(("a", _side(0.50, False)), ("b", _side(0.90, True)), ("c", _side(0.10, False)))
    # b keeps its id but its input changed: not the same row; d is new; c is gone.
    new = _report(("a", _side(0.70, True)), ("b", _side(0.20, False), "another input"),
                  ("d", _side(0.99, True)))
    r = compare(old, new, OLD, NEW)
    assert r.shared_rows == 1 and r.old.n == 1 and r.new.n == 1
    assert r.old.k == pytest.approx(50.0) and r.new.k == pytest.approx(70.0)
    assert r.regressions == [] and r.improved == ["a"]  # b's pass -> fail is not a regression: different row
    [note] = r.notes
    assert note == ("holdouts differ (1 row(s) only in old, 1 only in new, 1 with a different input or reference): "
                    "compared on the 1 shared row(s) only")
    assert r.lines()[-1] == f"note             {note}"


def test_checks_that_do_not_apply_are_na():
    old = _report(("a", _side(0.80, True, t=None, l=None, c=0.8)))
    new = _report(("a", _side(0.90, True, t=None, l=None, c=0.9)))
    r = compare(old, new, OLD, NEW)
    assert r.delta_t is None and r.delta_l is None and r.delta_c == pytest.approx(10.0)
    assert r.lines()[1] == "T / C / L        n/a / 90.0 / n/a  (n/a / +10.0 / n/a)"


def test_long_outputs_are_clipped_in_print_but_kept_whole():
    long_new = "word " * 100
    r = compare(_report(("a", _side(0.9, True))), _report(("a", _side(0.9, False, output=long_new))), OLD, NEW)
    assert r.regressions[0].new_output == long_new
    shown = next(x for x in r.lines() if x.startswith("    new  "))
    assert len(shown) == len("    new  ") + 100 and shown.endswith("…")


def test_different_names_and_verifiers_are_noted():
    other = SideMeta(name="routing", version="2.0", verifier_sha256="b" * 64)
    r = compare(_report(("a", _side(0.9, True))), _report(("a", _side(0.9, True))),
                OLD.model_copy(update={"verifier_sha256": "a" * 64}), other)
    assert any("different Specialists" in n for n in r.notes)
    assert any("verifiers differ" in n for n in r.notes)


def test_holdouts_with_nothing_in_common_are_refused():
    with pytest.raises(InputError, match="share no row"):
        compare(_report(("a", _side(0.9, True))), _report(("z", _side(0.9, True))), OLD, NEW)


def test_report_row_without_checks_is_refused():
    bad = _report(("a", {"output": "x"}))
    with pytest.raises(InputError, match=r"old.kolm: .*row 'a' lacks the verifier's checks"):
        compare(bad, _report(("a", _side(0.9, True))), OLD, NEW)


def test_duplicate_row_ids_are_refused():
    dup = _report(("a", _side(0.9, True)), ("a", _side(0.8, True)))
    with pytest.raises(InputError, match="row id 'a' twice"):
        compare(_report(("a", _side(0.9, True))), dup, OLD, NEW)


def test_negative_tolerance_is_refused():
    with pytest.raises(InputError, match="tolerance"):
        compare(_report(("a", _side(0.9, True))), _report(("a", _side(0.9, True))), OLD, NEW, tolerance=-1)


# ----- the command, on real signed artifacts ----------------------------------------------------


def _artifact(d: Path, version: str, report: dict, private_key: Path) -> Path:
    """A signed .kolm of the real layout, without training: manifest, eval, verifier, adapter."""
    content = d / f"content-{version}"
    (content / "adapter").mkdir(parents=True)
    (content / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (content / "verifier.json").write_text('{"format_version": 1, "kind": "label"}')
    (content / "eval.json").write_text(json.dumps(report))
    (content / "manifest.json").write_text(json.dumps({
        "format_version": ARTIFACT_FORMAT_VERSION, "name": "tldr", "version": version,
        "kscore": {"student": {"k": 0.0}},
    }))
    sig = d / f"content-{version}.sig"
    KeySigner(private_key).sign(content, sig)
    return pack(content, sig, d / "store" / f"tldr-{version}.kolm")


@pytest.fixture
def pair(tmp_path):
    """OLD and NEW signed with kolm's default key; NEW regresses row a and fixes row b."""
    key = ensure_default_key()
    old = _artifact(tmp_path, "1.0", _report(("a", _side(0.80, True, output="old a")), ("b", _side(0.60, False))), key)
    new = _artifact(tmp_path, "1.1", _report(("a", _side(0.70, False, output="new a")), ("b", _side(0.90, True))), key)
    return old, new


def test_cli_compare_prints_the_report_with_the_default_key(pair):
    old, new = pair
    res = RUNNER.invoke(cli, ["compare", str(old), str(new)])
    assert res.exit_code == 0, res.output
    assert "trusted     key " in res.stderr and "(kolm's own)" in res.stderr
    out = res.stdout.splitlines()
    assert out[0] == "K-score          80.0 ↑ from 70.0 (+10.0)"
    assert out[2:4] == ["regressions      1", "improvements     1"]
    assert out[4].startswith("recommended      hold: ")  # a report: exit 0 even when not promoting
    assert "    old  old a" in out and "    new  new a" in out


def test_cli_compare_json_and_thresholds(pair):
    old, new = pair
    res = RUNNER.invoke(cli, ["compare", str(old), str(new), "--json", "--max-regressions", "1"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["recommendation"] == "promote"
    assert (data["old"]["version"], data["new"]["version"]) == ("1.0", "1.1")
    assert [r["id"] for r in data["regressions"]] == ["a"] and data["improved"] == ["b"]


def test_cli_compare_tampered_eval_report_is_rejected(pair, tmp_path):
    old, new = pair
    forged = tmp_path / "forged.kolm"
    with tarfile.open(new) as tin, tarfile.open(forged, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == f"{CONTENT_DIR}/eval.json":  # mark every row passing: no regressions to see
                report = json.loads(data)
                for row in report["rows"]:
                    row["student"].update(k=1.0, passed=True)
                data = json.dumps(report).encode()
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    res = RUNNER.invoke(cli, ["compare", str(old), str(forged)])
    assert res.exit_code == 1 and "signature verification failed" in res.output, res.output
    assert "K-score" not in res.stdout


def test_cli_compare_without_trust_or_default_key_is_an_input_error(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    # Signed with some other key, and no default key on this machine.
    priv = tmp_path / "other.pem"
    priv.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    art = _artifact(tmp_path, "1.0", _report(("a", _side(0.9, True))), priv)
    res = RUNNER.invoke(cli, ["compare", str(art), str(art)])
    assert res.exit_code == 2 and "--key PUB" in res.output, res.output
    half = RUNNER.invoke(cli, ["compare", str(art), str(art), "--identity", "me@example.com"])
    assert half.exit_code == 2 and "--issuer" in half.output, half.output


def test_cli_compare_missing_file_is_an_input_error(pair, tmp_path):
    old, _ = pair
    res = RUNNER.invoke(cli, ["compare", str(old), str(tmp_path / "nope.kolm")])
    assert res.exit_code == 2 and "artifact not found" in res.output, res.output
