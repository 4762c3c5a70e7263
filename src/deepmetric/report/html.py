"""One self-contained HTML page from a :class:`~.content.ReportContent`: inline CSS, inline SVG
charts, thumbnails as ``data:`` URIs in one JSON block, and a few lines of plain JavaScript
(fill the images, sort the per-class table, the map's hover tooltip). Nothing is fetched.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from deepmetric.evaluation import display_name

from .content import (
    ClassTable,
    ConfigDiff,
    Curves,
    EmbeddingMap,
    Grid,
    MetricsTable,
    ReportContent,
    Verification,
)
from .numbers import far_name
from .svg import PALETTE, histogram_chart, line_chart, roc_chart, scatter

__all__ = ["render_html"]

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,
 sans-serif;margin:0;color:#1d1d1f;background:#f4f4f2}
header{padding:12px 24px 10px;background:#fff;border-bottom:1px solid #d8d8d8}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}
h3{font-size:15px;margin:4px 0 8px}
.facts{margin:0;color:#444}.facts span{margin-right:16px;white-space:nowrap}
.facts b{color:#777;font-weight:500}
main{max-width:1240px;margin:0 auto;padding:12px 16px 40px}
.row{display:flex;gap:12px;flex-wrap:wrap;align-items:stretch;margin-bottom:12px}
.panel{background:#fff;border:1px solid #d8d8d8;border-radius:6px;padding:10px 14px;
 margin-bottom:12px;min-width:0}
.row>.panel{flex:1 1 460px;margin-bottom:0}
.caption{color:#555;font-size:13px;margin:0 0 8px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 12px;text-align:right;border-bottom:1px solid #ececec}
th:first-child,td:first-child{text-align:left}
th{font-weight:600;background:#fff}
td.code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;text-align:left;
 overflow-wrap:anywhere}
.scroll{max-height:360px;overflow:auto}#class-table{width:100%}
#config-diff{width:100%;table-layout:fixed}#config-diff th,#config-diff td{text-align:left}
#config-diff th:nth-child(1){width:45%}#config-diff th:nth-child(2){width:25%}
.query-grid+h3{margin-top:16px}
table.sortable th{cursor:pointer;position:sticky;top:0;user-select:none}
table.sortable th:hover{background:#f0f4fa}
table.sortable th[data-dir=asc]::after{content:" \\25B2";font-size:10px}
table.sortable th[data-dir=desc]::after{content:" \\25BC";font-size:10px}
.charts{display:flex;gap:12px;flex-wrap:wrap}
svg text{font-size:11px;fill:#444}svg .chart-title{font-size:13px;font-weight:600;fill:#1d1d1f}
svg .grid{stroke:#ececec}svg .frame{fill:none;stroke:#bbb}svg .axis{fill:#888}
svg .halo{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
#verification-table{margin-top:8px}
.grid-row{display:flex;gap:5px;align-items:flex-start;padding:6px 0;border-top:1px solid #eee}
figure{margin:0;width:102px;font-size:11.5px;text-align:center}
figure img{display:block;width:102px;height:102px;object-fit:contain;background:#f0f0f0;
 border:3px solid #bbb;border-radius:4px}
figure.query{margin-right:12px}figure.query img{border-color:#2b5fa8}
figure.ok img{border-color:#1a9641}figure.bad img{border-color:#d7191c}
figcaption span{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
figure.ok .score{color:#1a7a36}figure.bad .score{color:#c0171a}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:12px;margin-top:6px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:6px;margin-right:4px;
 vertical-align:-1px}
#tip{position:absolute;pointer-events:none;background:#fff;border:1px solid #999;border-radius:4px;
 padding:4px;box-shadow:0 2px 8px rgba(0,0,0,.25);font-size:12px;text-align:center;z-index:9}
#tip[hidden]{display:none}#tip img{display:block;width:96px;height:96px;object-fit:contain}
svg.map circle{stroke:#fff;stroke-width:.6;cursor:crosshair}
svg.map circle:hover{stroke:#000;stroke-width:2}
ul.notes{margin:0;padding-left:20px;color:#444}
"""

JS = """
"use strict";
const thumbs = JSON.parse(document.getElementById("thumbnails").textContent);
for (const img of document.querySelectorAll("img[data-t]")) {
  if (thumbs[img.dataset.t]) img.src = thumbs[img.dataset.t];
}
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, col) => th.addEventListener("click", () => {
    const dir = th.dataset.dir === "asc" ? "desc" : "asc";
    heads.forEach(h => delete h.dataset.dir);
    th.dataset.dir = dir;
    const rows = [...table.tBodies[0].rows].sort((a, b) => {
      const x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      const order = isNaN(x) || isNaN(y) ? x.localeCompare(y) : Number(x) - Number(y);
      return dir === "asc" ? order : -order;
    });
    table.tBodies[0].append(...rows);
  }));
}
const tip = document.getElementById("tip");
for (const map of document.querySelectorAll("svg.map")) {
  map.addEventListener("mousemove", event => {
    const dot = event.target.closest("circle");
    if (!dot) { tip.hidden = true; return; }
    const img = tip.querySelector("img"), uri = thumbs[dot.dataset.t];
    img.hidden = !uri;
    if (uri) img.src = uri;
    tip.querySelector("span").textContent = dot.dataset.label;
    tip.style.left = event.pageX + 14 + "px";
    tip.style.top = event.pageY + 14 + "px";
    tip.hidden = false;
  });
  map.addEventListener("mouseleave", () => { tip.hidden = true; });
}
"""


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&#8212;"
    return f"{value:.{digits}f}"


def _cell(value: float | int | str | None, shown: str, attributes: str = "") -> str:
    """A table cell whose ``data-value`` holds the exact value (what sorting and tests read)."""
    raw = "" if value is None else (repr(value) if isinstance(value, float) else str(value))
    return f'<td{attributes} data-value="{escape(raw)}">{shown}</td>'


def _metrics(table: MetricsTable) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h, _ in table.columns)
    rows = []
    for key in table.keys:
        cells = "".join(
            _cell(values.get(key), _number(values.get(key)), f' data-key="{escape(key)}"')
            for _, values in table.columns
        )
        rows.append(f"<tr><td>{escape(display_name(key))}</td>{cells}</tr>")
    note = f'<p class="caption">{escape(table.note)}</p>' if table.note else ""
    return (
        f'<h2>Retrieval metrics</h2>{note}<table id="metrics-table"><thead><tr><th>metric</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _config_diff(diff: ConfigDiff) -> str:
    heading = "<h2>Settings changed from the preset"
    heading += f" {escape(Path(diff.preset).name)}</h2>" if diff.preset else "</h2>"
    if not diff.rows:
        return f'{heading}<p class="caption">{escape(diff.note)}</p>'
    rows = "".join(
        f'<tr><td class="code">{escape(key)}{" *" if cli else ""}</td>'
        f'<td class="code">{escape(_value(a))}</td><td class="code">{escape(_value(b))}</td></tr>'
        for key, a, b, cli in diff.rows
    )
    return (
        f'{heading}<p class="caption">Preset {escape(diff.preset)} read again now; * = set on the '
        'command line.</p><div class="scroll"><table id="config-diff"><thead><tr><th>setting'
        f"</th><th>preset</th><th>run</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _value(value: object) -> str:
    """A setting as the command line takes it (JSON is valid YAML)."""
    return json.dumps(value, default=str)


def _curves(curves: Curves) -> str:
    its, losses = curves.loss
    loss = line_chart(
        [("loss", its, losses)], title="Training loss", x_label="iteration", y_label="loss"
    )
    recall = line_chart(
        [(split, *points) for split, points in curves.recall_at_1.items()],
        title="Recall@1 at each evaluation",
        x_label="iteration",
        y_label="Recall@1",
        y_range=(0.0, 1.0),
        markers=True,
    )
    return f'<h2>Training</h2><div class="charts">{loss}{recall}</div>'


def _figure(key: str, css: str, lines: list[str], label: str | None) -> str:
    spans = "".join(lines)
    title = f' title="{escape(label)}"' if label is not None else ""
    data_label = f' data-label="{escape(label)}"' if label is not None else ""
    return (
        f'<figure class="{css}" data-t="{escape(key)}"{data_label}{title}>'
        f'<img data-t="{escape(key)}" alt=""><figcaption>{spans}</figcaption></figure>'
    )


def _grid(grid: Grid, number: int) -> str:
    rows = []
    for row in grid.rows:
        query_lines = [f'<span class="label">query &#183; {escape(row.query_label or "?")}</span>']
        if row.ap is not None:
            query_lines.append(f"<span>AP@R {row.ap:.3f}</span>")
        figures = [_figure(row.query, "query", query_lines, row.query_label)]
        for key, label, score, correct in zip(row.items, row.labels, row.scores, row.correct):
            css = "hit " + {True: "ok", False: "bad", None: "unknown"}[correct]
            lines = [f'<span class="score">{score:.3f}</span>']
            lines.append(
                f'<span class="label">{escape(label if label is not None else "?")}</span>'
            )
            figures.append(_figure(key, css, lines, label))
        rows.append(f'<div class="grid-row">{"".join(figures)}</div>')
    return (
        f'<h3>{escape(grid.title)}</h3><div class="query-grid" id="grid-{number}">'
        f"{''.join(rows)}</div>"
    )


def _classes(table: ClassTable) -> str:
    rows = "".join(
        f"<tr>{_cell(name, escape(name))}{_cell(size, f'{size:,}')}"
        f"{_cell(r1, _number(r1))}{_cell(mapr, _number(mapr))}</tr>"
        for name, size, r1, mapr in zip(table.names, table.size, table.recall_at_1, table.map_at_r)
    )
    shown = (
        f"The {len(table.names):,} worst of {table.total:,} classes"
        if len(table.names) < table.total
        else f"{table.total:,} classes"
    )
    return (
        f'<h2>Per class</h2><p class="caption">{shown}, worst first (Recall@1, then MAP@R); click '
        "a heading to sort by it, again to reverse.</p>"
        f'<div class="scroll"><table class="sortable" id="class-table"><thead><tr><th>class</th>'
        f"<th>{escape(table.size_name)}</th><th>Recall@1</th><th>MAP@R</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div>"
    )


def _map(m: EmbeddingMap) -> str:
    count = len(m.points)
    which = f"all {count:,}" if count == m.total else f"a random sample of {count:,} of {m.total:,}"
    svg = scatter(m.points, m.colours, m.keys, m.labels, axis_name=m.method)
    names = dict(zip(m.colours, m.labels))
    legend = ""
    if len(names) <= len(PALETTE):
        legend = '<div class="legend">' + "".join(
            f'<span><i style="background:{PALETTE[c]}"></i>{escape(names[c])}</span>'
            for c in sorted(names)
        )
        legend += "</div>"
    repeat = "" if legend else f" {len(names):,} classes: colours repeat."
    return (
        f'<h2>Map of the embeddings</h2><p class="caption">{m.method} of {which} embeddings, '
        f"coloured by class; hover a point to see its image.{repeat}</p>{svg}{legend}"
    )


def _verification(v: Verification) -> str:
    far, tar = v.roc
    marks = [
        (f, t, f"TAR@FAR={far_name(f)}: {t:.4f} (threshold {threshold:.4f})")
        for f, t, threshold in v.tar_at_far
        if math.isfinite(t)
    ]
    roc = roc_chart(far, tar, marks, far_min=v.far_min, title="ROC")
    width = [b - a for a, b in zip(v.edges[:-1], v.edges[1:])]
    densities = [
        (name, colour, [c / (total * w) for c, w in zip(counts, width)])
        for name, colour, counts, total in (
            ("positive pairs", PALETTE[2], v.positive, v.num_positive),
            ("negative pairs", PALETTE[3], v.negative, v.num_negative),
        )
    ]
    histograms = histogram_chart(
        v.edges,
        densities,
        v.thresholds,
        title="Pair scores",
        x_label="score (inner product)",
        y_label="density",
    )
    rows = [
        ("roc_auc", v.auc, None),
        ("eer", v.eer[0], v.eer[1]),
        *((f"tar@far={far_name(f)}", t, threshold) for f, t, threshold in v.tar_at_far),
    ]
    cells = ""
    for key, value, threshold in rows:
        shown = _cell(value, _number(value), f' data-key="{escape(key)}"')
        cells += f"<tr><td>{escape(display_name(key))}</td>{shown}"
        cells += f"{_cell(threshold, _number(threshold))}</tr>"
    cells += "".join(
        f"<tr><td>{name}</td>{_cell(count, f'{count:,}')}<td></td></tr>"
        for name, count in (("positive pairs", v.num_positive), ("negative pairs", v.num_negative))
    )
    eer, eer_threshold = v.eer
    return (
        '<h2>Verification</h2><p class="caption">Every pair of the evaluation set, accepted when '
        f"its score is at least a threshold: ROC AUC {v.auc:.4f}, EER {eer:.4f} (threshold "
        f"{eer_threshold:.4f}). Left: TAR against FAR, dots at TAR@FAR (hover for the threshold), "
        "dashed: chance. Right: the scores of the positive (same class) and negative pairs, each "
        f"normalised to unit area (negative pairs outnumber positive ones "
        f"{v.num_negative / v.num_positive:,.0f} to 1), dashed lines at the thresholds. A dash "
        "in the table: the set has too few negative pairs for that FAR.</p>"
        f'<div class="charts">{roc}{histograms}</div><table id="verification-table"><thead><tr>'
        f"<th>metric</th><th>value</th><th>threshold</th></tr></thead><tbody>{cells}</tbody>"
        "</table>"
    )


def render_html(content: ReportContent) -> str:
    """The page of ``content``: one HTML document, nothing outside it."""
    facts = "".join(
        f"<span><b>{escape(name)}</b> {escape(value)}</span>" for name, value in content.facts
    )
    body = [f'<header><h1>{escape(content.title)}</h1><p class="facts">{facts}</p></header><main>']
    top = []
    if content.metrics is not None:
        top.append(f'<div class="panel" id="metrics">{_metrics(content.metrics)}</div>')
    if content.config_diff is not None:
        top.append(f'<div class="panel" id="config">{_config_diff(content.config_diff)}</div>')
    if top:
        body.append(f'<section class="row">{"".join(top)}</section>')
    if content.curves is not None:
        body.append(f'<section class="panel" id="curves">{_curves(content.curves)}</section>')
    if content.verification is not None:
        body.append(
            f'<section class="panel" id="verification">{_verification(content.verification)}'
            "</section>"
        )
    if content.grids:
        grids = "".join(_grid(g, n) for n, g in enumerate(content.grids))
        legend = (
            '<p class="caption">Each row: a query (blue frame) and its nearest gallery images, '
            "nearest first, with their similarity scores and labels; green frame = same class as "
            "the query, red = another class, grey = a label is unknown.</p>"
        )
        body.append(f'<section class="panel" id="grids"><h2>Queries</h2>{legend}{grids}</section>')
    bottom = []
    if content.classes is not None:
        bottom.append(f'<div class="panel" id="classes">{_classes(content.classes)}</div>')
    if content.embedding_map is not None:
        bottom.append(f'<div class="panel" id="map">{_map(content.embedding_map)}</div>')
    if bottom:
        body.append(f'<section class="row">{"".join(bottom)}</section>')
    if content.notes:
        notes = "".join(f"<li>{escape(n)}</li>" for n in content.notes)
        body.append(
            f'<section class="panel" id="notes"><h2>Notes</h2><ul class="notes">{notes}</ul>'
            "</section>"
        )
    body.append('</main><div id="tip" hidden><img alt=""><span></span></div>')
    data = json.dumps(content.thumbnails, separators=(",", ":")).replace("</", "<\\/")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{escape(content.title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}"
        f'<script type="application/json" id="thumbnails">{data}</script>'
        f"<script>{JS}</script></body></html>\n"
    )
