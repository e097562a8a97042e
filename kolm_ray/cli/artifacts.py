"""`kolm verify`, `kolm inspect`, `kolm compare`, `kolm base`."""

from __future__ import annotations

import json

import click

from kolm_ray.cli.app import cli
from kolm_ray.cli.options import trust_from, trust_or_default


@cli.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--key", type=click.Path(dir_okay=False), help="Public key (PEM) the artifact must be signed with.")
@click.option("--identity", help="Sigstore signer identity (e.g. an e-mail or workflow URI).")
@click.option("--issuer", help="Sigstore OIDC issuer URL of that identity.")
def verify(artifact: str, key: str | None, identity: str | None, issuer: str | None) -> None:
    """Verify ARTIFACT's signature: exits non-zero on any change, addition or removal, or another signer."""
    from kolm_ray.artifact import open_verified

    with open_verified(artifact, trust_from(key, identity, issuer)) as (_, manifest):
        click.echo(f"verified    {artifact}: {manifest['name']} {manifest['version']}, "
                   f"K {manifest['kscore']['student']['k']}")


@cli.command()
@click.argument("artifact", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact: str, as_json: bool) -> None:
    """Show ARTIFACT's manifest (unverified: use `kolm verify` to check the signature)."""
    from kolm_ray.artifact import CONTENT_DIR, read_manifest, unpacked

    with unpacked(artifact) as root:
        m = read_manifest(root)
        files = sorted(p.relative_to(root / CONTENT_DIR).as_posix() for p in (root / CONTENT_DIR).rglob("*") if p.is_file())
    if as_json:
        click.echo(json.dumps({**m, "files": files}, indent=2))
        return
    ks, kb = m["kscore"]["student"], m["kscore"]["base"]

    def line(k: dict) -> str:
        f = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
        return f"K {k['k']:.1f} (T {f(k['t'])} / C {f(k['c'])} / L {f(k['l'])}), {k['passed']}/{k['n']} rows pass"

    rows = [
        ("specialist", f"{m['name']} {m['version']}  (format {m['format_version']}, created {m['created_at']})"),
        ("task", m["task"]),
        ("base", f"{m['base'].get('name')}  {m['base'].get('revision') or m['base'].get('sha256', '')[:16]}"),
        ("teacher", f"{m['teacher']['model']} k={m['teacher']['k']} ({m['teacher']['mode']}), "
                    f"{m['teacher']['samples']} samples, ${m['teacher']['cost_usd']:.4f}"),
        ("fit", f"{m['fit']['steps']} steps on {m['fit']['examples']} examples, loss "
                f"{m['fit']['loss_start']} → {m['fit']['loss_end']}"),
        ("student", line(ks)),
        ("base model", line(kb)),
        ("gate", "none" if not m.get("gate") else f"K={m['gate']['k']:g} passed"),
        ("compute", ", ".join(f"{k} {v}" for k, v in m["compute"].items())),
        ("files", ", ".join(files)),
    ]
    for k, v in rows:
        click.echo(f"{k:<12}{v}")


@cli.command(name="compare")
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--tolerance", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="K points NEW may fall below OLD and still be promoted.")
@click.option("--max-regressions", default=0, show_default=True, type=click.IntRange(0),
              help="Rows that passed in OLD and fail in NEW allowed for a promote.")
@click.option("--key", type=click.Path(dir_okay=False), help="Public key (PEM) both artifacts must be signed with "
              "[default: kolm's own key, $KOLM_HOME/keys/signing.pub].")
@click.option("--identity", help="Sigstore signer identity (e.g. an e-mail or workflow URI).")
@click.option("--issuer", help="Sigstore OIDC issuer URL of that identity.")
def compare_cmd(old: str, new: str, as_json: bool, tolerance: float, max_regressions: int, key: str | None,
                identity: str | None, issuer: str | None) -> None:
    """Compare two signed artifacts on their shared holdout rows: K/T/C/L deltas, regressed rows,
    and whether to promote NEW. Exits 0 whatever the recommendation (it is a report)."""
    from kolm_ray.compare import compare, load_side

    trust = trust_or_default(key, identity, issuer)
    old_report, old_meta = load_side(old, trust)
    new_report, new_meta = load_side(new, trust)
    result = compare(old_report, new_report, old_meta, new_meta, tolerance=tolerance, max_regressions=max_regressions)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    for line in result.lines():
        click.echo(line)



@cli.group()
def base() -> None:
    """Base models."""


@base.command(name="tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--hidden-size", default=128, show_default=True, type=click.IntRange(16))
@click.option("--layers", default=2, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
def base_tiny(out: str, hidden_size: int, layers: int, seed: int) -> None:
    """Write a tiny random-init Qwen2 causal LM with an offline tokenizer to OUT."""
    from kolm_ray.train.base import build_tiny_base

    path = build_tiny_base(out, hidden_size=hidden_size, layers=layers, seed=seed)
    click.echo(f"wrote a tiny Qwen2 base to {path}")


