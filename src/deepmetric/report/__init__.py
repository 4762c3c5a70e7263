"""Self-contained HTML report of a run or an index: one file that opens offline.

    deepmetric report --checkpoint RUN [--split test|val] [--out report.html]
    deepmetric report --index INDEX --images QUERIES [--out report.html]

A run's report shows the retrieval metrics next to the untrained network's, the settings
changed from the preset, the training curves, per-class results (sortable, worst first), the
worst and random queries with their top-k retrievals framed green (same class) or red, and a
2-D map of the embeddings with the images on hover, and the verification over all pairs (ROC,
positive / negative score histograms with the thresholds, AUC, EER, TAR@FAR). Every section
is bounded (:class:`ReportOptions`), so a report of SOP's 60,502 images stays a few MB.

Modules: ``content`` (what a report shows, as data), ``numbers`` (per-query and per-class
numbers, grids, map, from embeddings and labels), ``build`` (:func:`build_report`: embeddings,
labels and an image loader -> file), ``run`` (a run folder: records, settings, curves;
:func:`report_run`), ``index`` (:func:`report_index`), ``thumbnails`` (JPEG data URIs),
``html`` and ``svg`` (the page).
"""

from __future__ import annotations

from .build import build_report, gather_report, write_report
from .content import ReportContent, ReportOptions
from .html import render_html
from .index import report_index
from .run import report_run

__all__ = [
    "ReportContent",
    "ReportOptions",
    "build_report",
    "gather_report",
    "render_html",
    "report_index",
    "report_run",
    "write_report",
]
