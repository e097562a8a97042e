"""A ``Report`` as text (the before/after table ``kolm report`` prints) and as one self-contained
HTML page (``--html``): the same table, and three plotly charts with plotly.js inlined, so the page
opens offline: calls per day per Specialist, cost per day (frontier against self-hosted), and
online and audited K per day per version with publish, promote and rollback marked.

Every number on the page is in the table or the charts' data, taken from the ``Report`` as is; the
report's JSON is embedded too (``<script type="application/json" id="kolm-report">``), so each
figure shown can be checked against it. Cells carry ``data-key`` (``NAME.field``) for that.
"""

from __future__ import annotations

import html
import time

from kolm_ray.report.compute import Line, Report

COLUMNS = (  # (heading, Line field or a function of the Line, format)
    ("calls", "calls", "{:,}"),
    ("tokens in", "prompt_tokens", "{:,}"),
    ("tokens out", "completion_tokens", "{:,}"),
    ("frontier/mo", "frontier_monthly_usd", "${:,.2f}"),
    ("self-hosted/mo", "self_hosted_monthly_usd", "${:,.2f}"),
    ("savings/mo", "savings_monthly_usd", "${:,.2f}"),
    ("compile", "compile_usd", "${:,.2f}"),
    ("payback", "payback_days", "{:,.1f} d"),
)


def cell(line: Line, field: str, fmt: str) -> str:
    value = getattr(line, field)
    if value is None:
        return "never"
    return "-" + fmt.format(-value) if value < 0 else fmt.format(value)  # -$1.00, not $-1.00


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def basis_line(r: Report) -> str:
    serving = (f"{r.gpu_share:g} of a GPU at ${r.gpu_hour:,.2f}/GPU-hour for the whole period" if r.basis == "gpu_share"
               else f"the replica-seconds the calls measured at ${r.gpu_hour:,.2f}/GPU-hour")
    return (f"kolm report · {r.env} · {r.days:.1f} days, {_when(r.start)} to {_when(r.end)} · "
            f"frontier {r.frontier_model} · self-hosted: {serving}; compiles at ${r.gpu_hour:,.2f}/GPU-hour, "
            f"${r.cpu_hour:,.2f}/CPU-hour · prices: {', '.join(r.price_sources)}")


def text(r: Report) -> str:
    rows = [("Specialist", *(h for h, _, _ in COLUMNS))]
    rows += [(x.name, *(cell(x, f, fmt) for _, f, fmt in COLUMNS)) for x in [*r.specialists, r.total]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = [basis_line(r), ""]
    for n, row in enumerate(rows):
        if n == len(rows) - 1:
            out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out + [f"note: {n}" for n in notes(r)])


def notes(r: Report) -> list[str]:
    """What the table's figures rest on that the reader should know: per version, per Specialist."""
    out = [f"{x.name} {v.version}: {v.note}" for x in r.specialists for v in x.versions if v.note]
    out += [f"{x.name}: {x.audits_uncosted} audits not costed (no price for the teacher)"
            for x in r.specialists if x.audits_uncosted]
    out += [f"{x.name}: {n}" for x in r.specialists for n in x.notes]
    return out


# ----- HTML ---------------------------------------------------------------------------------


def _figures(r: Report) -> list[tuple[str, str, object]]:
    import plotly.graph_objects as go

    days = [d.day for d in r.daily]
    calls = go.Figure([go.Bar(name=x.name, x=days, y=[d.calls.get(x.name, 0) for d in r.daily])
                       for x in r.specialists])
    calls.update_layout(barmode="stack", title="Calls per day per Specialist", xaxis_title="day (UTC)",
                        yaxis_title="calls")
    cost = go.Figure([
        go.Scatter(name=f"frontier ({r.frontier_model})", x=days, y=[d.frontier_usd for d in r.daily],
                   mode="lines+markers"),
        go.Scatter(name="self-hosted", x=days, y=[d.self_hosted_usd for d in r.daily], mode="lines+markers")])
    cost.update_layout(title="Cost per day (US dollars)", xaxis_title="day (UTC)", yaxis_title="USD")
    k = go.Figure()
    for name, version in sorted({(p.specialist, p.version) for p in r.k_series}):
        pts = [p for p in r.k_series if (p.specialist, p.version) == (name, version)]
        k.add_scatter(name=f"{name} {version} online K", x=[p.day for p in pts], y=[p.online_k for p in pts],
                      mode="lines+markers")
        if any(p.audited_k is not None for p in pts):
            k.add_scatter(name=f"{name} {version} audited K", x=[p.day for p in pts], y=[p.audited_k for p in pts],
                          mode="markers", marker_symbol="diamond")
    for e in r.events:
        at = time.strftime("%Y-%m-%d", time.gmtime(e.time))
        k.add_vline(x=at, line_dash="dot", line_color={"publish": "#2a6", "promote": "#26a", "rollback": "#c33"}[e.action],
                    annotation_text=f"{e.action} {e.specialist} {e.version}", annotation_textangle=-90)
    k.update_layout(title="K over time per version (online: every call; audited: teacher-judged)",
                    xaxis_title="day (UTC)", yaxis_title="K (0-100)", yaxis_range=[0, 105])
    return [("calls", "Calls per day", calls), ("cost", "Cost per day", cost), ("k", "K over time", k)]


def _notes_html(r: Report) -> str:
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(r))
    return f'<ul class="notes">{items}</ul>' if items else ""


def html_page(r: Report) -> str:
    """One self-contained page (plotly.js inlined: no network needed to open it)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("Specialist", *(h for h, _, _ in COLUMNS)))
    body = []
    for x in [*r.specialists, r.total]:
        cells = "".join(f'<td data-key="{html.escape(x.name)}.{f}">{html.escape(cell(x, f, fmt))}</td>'
                        for _, f, fmt in COLUMNS)
        body.append(f'<tr class="{"total" if x is r.total else "specialist"}"><th>{html.escape(x.name)}</th>{cells}</tr>')
    charts = []
    for i, (key, title, fig) in enumerate(_figures(r)):
        charts.append(f'<section class="chart" id="chart-{key}"><h2>{html.escape(title)}</h2>'
                      + fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{key}",
                                    config={"displaylogo": False, "responsive": True}) + "</section>")
    data = r.model_dump_json().replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kolm report · {html.escape(r.env)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }}
tr th:first-child {{ text-align: left; }}
tr.total {{ font-weight: bold; border-top: 2px solid #222; }}
p.basis {{ color: #555; }}
</style></head><body>
<h1>kolm report · {html.escape(r.env)}</h1>
<p class="basis">{html.escape(basis_line(r))}</p>
<table id="bill"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
{_notes_html(r)}
{"".join(charts)}
<script type="application/json" id="kolm-report">{data}</script>
</body></html>
"""
