"""`kolm verify`, `kolm inspect`, `kolm compare`, `kolm base`: parse, call ``kolm_ray.artifact``
/ ``compare`` / ``train.base``, print."""

from __future__ import annotations

import json

import click

from kolm_ray.artifact import CONTENT_DIR, open_verified, read_manifest, unpacked
from kolm_ray.cli.app import cli
from kolm_ray.cli.options import epilog, trust_options, trust_or_default
from kolm_ray.compare import compare, load_side
from kolm_ray.provenance import lineage, lineage_lines
from kolm_ray.train.base import build_tiny_base


@cli.command(short_help="Check an artifact's signature.", epilog=epilog(
    "kolm verify ~/.kolm/artifacts/routing-1.0.kolm              # kolm's own key",
    "kolm verify routing-1.0.kolm --key signing.pub",
    "kolm verify routing-1.0.kolm --identity ci@example.com --issuer https://accounts.example.com",
    codes={0: "verified", 1: "rejected: a file changed, was added or removed, or another signer signed it",
           2: "bad input: no such artifact, not a .kolm file, a private or unusable key"}))
@click.argument("artifact", type=click.Path(dir_okay=False))
@trust_options("the artifact")
def verify(artifact: str, key: str | None, identity: str | None, issuer: str | None) -> None:
    """Verify ARTIFACT's signature: exits non-zero on any change, addition or removal, or another
    signer. Without --key or --identity it trusts kolm's own key and says so."""
    trust = trust_or_default(key, identity, issuer)
    with open_verified(artifact, trust) as (_, manifest):
        k = (manifest.get("kscore") or {}).get("student", {}).get("k")
        click.echo(f"verified    {artifact}: {manifest.get('name')} {manifest.get('version')}, K {k}, "
                   f"signed by {trust.describe()}")


@cli.command(short_help="Show an artifact's manifest and lineage (unverified).", epilog=epilog(
    "kolm inspect ~/.kolm/artifacts/routing-1.0.kolm",
    "kolm inspect routing-1.0.kolm --json | jq .lineage",
    codes={0: "shown", 2: "bad input: no such artifact, or not a readable .kolm file"}))
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest, its lineage and the file list as JSON.")
def inspect(artifact: str, as_json: bool) -> None:
    """Show ARTIFACT's manifest and lineage: the base's pinned commit or content hash, the
    teacher and its prompt digest, the rows' digests, the parent version, the package versions
    (unverified: use `kolm verify` to check the signature)."""
    with unpacked(artifact) as root:
        m = read_manifest(root)
        files = sorted(p.relative_to(root / CONTENT_DIR).as_posix() for p in (root / CONTENT_DIR).rglob("*") if p.is_file())
    if as_json:
        click.echo(json.dumps({**m, "lineage": lineage(m), "files": files}, indent=2))
        return
    for k, v in inspect_rows(m, files):
        click.echo(f"{k:<12}{v}")


def inspect_rows(m: dict, files: list[str]) -> list[tuple[str, str]]:
    """`kolm inspect`'s text: (label, value) rows of a manifest, its lineage last."""
    ks, kb = m["kscore"]["student"], m["kscore"]["base"]

    def line(k: dict) -> str:
        f = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
        return f"K {k['k']:.1f} (T {f(k['t'])} / C {f(k['c'])} / L {f(k['l'])}), {k['passed']}/{k['n']} rows pass"

    return [
        ("specialist", f"{m['name']} {m['version']}  (format {m['format_version']}, created {m['created_at']})"),
        ("task", m["task"]),
        ("teacher", teacher_line(m["teacher"])),
        ("fit", f"{m['fit']['steps']} steps on {m['fit']['examples']} examples, loss "
                f"{m['fit']['loss_start']} → {m['fit']['loss_end']}"),
        ("student", line(ks)),
        ("base model", line(kb)),
        ("gate", "none" if not m.get("gate") else f"K={m['gate']['k']:g} passed"),
        ("compute", ", ".join(f"{k} {v}" for k, v in m["compute"].items())),
        ("files", ", ".join(files)),
        ("lineage", ""),
        *((f"  {k}", v) for k, v in lineage_lines(lineage(m), m.get("format_version"))),
    ]


@cli.command(name="compare", short_help="Compare two artifacts' holdout scores.", epilog=epilog(
    "kolm compare ~/.kolm/artifacts/routing-1.0.kolm ~/.kolm/artifacts/routing-1.1.kolm",
    "kolm compare old.kolm new.kolm --json --max-regressions 2 --key signing.pub",
    codes={0: "compared, whatever the recommendation (it is a report)",
           1: "a signature does not verify", 2: "bad input: a missing or unreadable artifact, an unusable key"}))
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--tolerance", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="K points NEW may fall below OLD and still be promoted.")
@click.option("--max-regressions", default=0, show_default=True, type=click.IntRange(0),
              help="Rows that passed in OLD and fail in NEW allowed for a promote.")
@trust_options("both artifacts")
def compare_cmd(old: str, new: str, as_json: bool, tolerance: float, max_regressions: int, key: str | None,
                identity: str | None, issuer: str | None) -> None:
    """Compare two signed artifacts on their shared holdout rows: K/T/C/L deltas, regressed rows,
    and whether to promote NEW. Exits 0 whatever the recommendation (it is a report)."""
    trust = trust_or_default(key, identity, issuer)
    old_report, old_meta = load_side(old, trust)
    new_report, new_meta = load_side(new, trust)
    result = compare(old_report, new_report, old_meta, new_meta, tolerance=tolerance, max_regressions=max_regressions)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    for line in result.lines():
        click.echo(line)


@cli.group(short_help="Base models (a tiny one for offline runs).", epilog=epilog(
    "kolm base tiny ./tiny-base",
    codes={0: "done", 1: "a runtime failure", 2: "bad arguments"}))
def base() -> None:
    """Base models."""


@base.command(name="tiny", short_help="Write a tiny random-init base model.", epilog=epilog(
    "kolm base tiny ./tiny-base",
    "kolm base tiny ./tiny-base --hidden-size 64 --layers 1 --seed 3",
    codes={0: "written", 1: "a runtime failure (the model could not be built or saved)",
           2: "bad arguments (OUT is a file, a size out of range)"}))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--hidden-size", default=128, show_default=True, type=click.IntRange(16),
              help="Width of the model: a multiple of 8 (4 attention heads of an even width).")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(1), help="Number of decoder layers.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random initialization.")
def base_tiny(out: str, hidden_size: int, layers: int, seed: int) -> None:
    """Write a tiny random-init Qwen2 causal LM with an offline tokenizer to OUT."""
    if hidden_size % 8:
        raise click.BadParameter(f"{hidden_size} is not a multiple of 8 (4 attention heads of an even width)",
                                 param_hint="'--hidden-size'")
    path = build_tiny_base(out, hidden_size=hidden_size, layers=layers, seed=seed)
    click.echo(f"wrote a tiny Qwen2 base to {path}")


def teacher_line(t: dict) -> str:
    """The manifest's teacher entry, each cost figure saying what it covers."""
    source = "recorded answers, nothing paid" if t.get("recorded") else t["mode"]
    paid = t.get("paid_this_run_usd")
    cost = f"${t['cost_usd']:.4f} at list price for the {t['samples']} samples"
    if not t.get("recorded") and paid is not None:
        cost += (" (all paid by the compile that made it)" if abs(paid - t["cost_usd"]) < 5e-5 else
                 f" (${paid:.4f} paid by the compile that made it; the rest came from the cache)")
    return f"{t['model']} k={t.get('samples_per_input', t.get('k'))} ({source}), {cost}"
