"""`kolm report`: the bill from logged usage (parse, call ``kolm_ray.report``, print)."""

from __future__ import annotations

import click

from kolm_ray.cli.app import cli
from kolm_ray.cli.options import epilog


@cli.command(name="report", short_help="The bill: frontier cost against self-hosted, payback.", epilog=epilog(
    "kolm report --env prod",
    "kolm report --env prod --since 7d --frontier claude-sonnet-4-6 --gpu-hour-price 2.50 --gpu-share 0.25",
    "kolm report --env prod --gpu-share 0",
    "kolm report --env prod --json",
    "kolm report --env prod --html report.html",
    codes={0: "reported", 1: "a runtime failure (an unwritable --html file)",
           2: "bad input: no such environment, a bad --since, an unknown frontier model, a bad price file "
              "(named with its line)"}))
@click.option("--env", required=True, help="Environment, as given to `kolm publish --to` (e.g. prod).")
@click.option("--since", default="30d", show_default=True, help="How far back: e.g. 30d, 12h, 90m.")
@click.option("--frontier", default=None, help="Frontier model the calls are priced on [default: the price "
              "file's default_frontier].")
@click.option("--gpu-hour-price", type=click.FloatRange(0), default=None,
              help="US dollars per GPU-hour of the lease [default: the price file's lease.gpu_hour].")
@click.option("--gpu-share", type=click.FloatRange(0), default=None,
              help="GPUs the serving replicas hold (0.25: a quarter of one); 0: price the replica-seconds the "
                   "calls measured instead, whatever the price file says [default: the price file's "
                   "lease.gpu_share; none: the replica-seconds the calls measured].")
@click.option("--prices", "prices_file", type=click.Path(dir_okay=False), default=None,
              help="Price file (YAML) laid over kolm's default [default: $KOLM_HOME/prices.yaml if present].")
@click.option("--artifacts", default=None, help="Where to look for released versions' artifacts not named in "
              "the release state [default: $KOLM_HOME/artifacts].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write one self-contained HTML page with plots here.")
def report_cmd(env: str, since: str, frontier: str | None, gpu_hour_price: float | None, gpu_share: float | None,
               prices_file: str | None, artifacts: str | None, as_json: bool, html_file: str | None) -> None:
    """Per Specialist and in total: calls and tokens, what they would have cost on a frontier
    model, what they cost self-hosted, what compiling it cost, monthly savings and payback days."""
    import time
    from pathlib import Path

    from kolm_ray.errors import KolmRuntimeError
    from kolm_ray.home import artifacts_uri, kolm_home
    from kolm_ray.publish.release import check_env
    from kolm_ray.publish.service import parse_duration
    from kolm_ray.report import load_price_book, load_report
    from kolm_ray.report.render import html_page, text

    check_env(env)
    since_s = parse_duration(since)
    book = load_price_book(prices_file, kolm_home())
    report = load_report(kolm_home(), env, book, since_s=since_s, now=time.time(),
                         artifacts_store=artifacts or artifacts_uri(), frontier=frontier,
                         gpu_hour=gpu_hour_price, gpu_share=gpu_share)
    if html_file:
        try:
            Path(html_file).write_text(html_page(report), encoding="utf-8")
        except OSError as e:
            raise KolmRuntimeError(f"cannot write {html_file}: {e.strerror or e}") from None
    click.echo(report.model_dump_json(indent=2) if as_json else text(report))
    if html_file and not as_json:
        click.echo(f"wrote       {html_file}")
