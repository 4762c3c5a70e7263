"""A report from embeddings, labels and an image loader: the Python entry point behind
``deepmetric report`` (a run's report adds its metrics, settings and curves, see
:mod:`.run`), usable on saved embeddings of any size::

    from deepmetric.report import build_report
    build_report(embeddings, labels, dataset.load_image, "report.html",
                 class_names=dataset.class_names)

Reads top to bottom: choose the queries (all, or whole random classes up to
``max_queries``); their AP@R and Recall@1 by the evaluation's search; the worst and some random
queries with their top-k; the per-class table; the 2-D map; the verification section (every
pair of the set, not only the sampled queries'); the thumbnails those need, within
a byte budget; the page.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.evaluation import result_keys
from deepmetric.evaluation.verification import pair_score_counts

from . import numbers
from .content import MetricsTable, ReportContent, ReportOptions
from .html import render_html
from .thumbnails import Thumbnails

__all__ = ["build_report", "gather_report", "grid_titles", "write_report"]


def gather_report(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    load_image: Callable[[int], Any],
    *,
    class_names: Sequence[Any] | None = None,
    query_mask: np.ndarray | torch.Tensor | None = None,
    gallery_mask: np.ndarray | torch.Tensor | None = None,
    content: ReportContent | None = None,
    options: ReportOptions | None = None,
) -> ReportContent:
    """Fill ``content`` (default: an untitled one) with the numbers and thumbnails of a set.

    Args:
        embeddings: (N, d) float embeddings (L2-normalised, as the evaluation expects).
        labels: (N,) integer labels in 0..C-1.
        load_image: row -> the image (PIL, or a (C, H, W) float tensor in [0, 1]); called only
            for the images shown (at most 2 x queries x (k + 1) + max_points of them).
        class_names: (C,) display name of each label (default: the number).
        query_mask, gallery_mask: (N,) bool roles (In-Shop style); without them every item is
            searched against the others, its own row excluded.
        content: title, facts, metrics, settings and curves already known (a run's).
        options: see :class:`~.content.ReportOptions`.
    """
    options = options or ReportOptions()
    x = embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if content is None:
        facts = [("images", f"{len(y):,}"), ("classes", f"{len(np.unique(y)):,}")]
        content = ReportContent("deepmetric report", [*facts, ("embeddings", f"{x.shape[1]}-d")])
    names = numbers.class_names(y, class_names)
    if (query_mask is None) != (gallery_mask is None):
        raise ValueError("give both query_mask and gallery_mask, or neither")
    roles = query_mask is not None
    candidates = np.flatnonzero(np.asarray(query_mask)) if roles else np.arange(len(y))
    gallery_rows = np.flatnonzero(np.asarray(gallery_mask)) if roles else None

    sample = numbers.sample_query_rows(y[candidates], options.max_queries, options.seed)
    results = numbers.query_results(x, y, candidates[sample], gallery_rows)
    if len(sample) < len(candidates):
        content.notes.append(
            f"Per-query and per-class numbers are computed for the {len(sample):,} queries of "
            f"{len(np.unique(results.labels)):,} randomly drawn classes (of "
            f"{len(np.unique(y[candidates])):,} classes, {len(candidates):,} queries), each "
            "searched against the whole gallery (ReportOptions.max_queries)."
        )
    _note_summary(content, results)

    worst = numbers.pick_worst(results, options.queries)
    drawn = numbers.pick_random(results, options.queries, options.seed)
    for title, positions in grid_titles(worst, drawn, options.seed):
        if len(positions):
            hits, scores = numbers.top_k(x, results.rows[positions], gallery_rows, options.k)
            content.grids.append(numbers.grid(title, results, positions, hits, scores, y, names))
    if results.valid.any():
        size_name = "queries" if roles else "images"
        content.classes = numbers.class_table(results, names, options.max_classes, size_name)
    content.embedding_map = numbers.embedding_map(
        x, y, names, options.max_points, options.map, options.seed
    )
    _add_verification(content, x, y, candidates if roles else None, gallery_rows)

    thumbnails = Thumbnails(
        lambda key: load_image(int(key)), options.thumbnail, options.max_thumbnail_bytes
    )
    for g in content.grids:
        thumbnails.add(key for row in g.rows for key in [row.query, *row.items])
    thumbnails.add(content.embedding_map.keys, required=False)
    if thumbnails.refused:
        content.notes.append(
            f"{thumbnails.refused:,} map points have no hover image: the thumbnail budget "
            f"({options.max_thumbnail_bytes / 1e6:.0f} MB) was spent."
        )
    content.thumbnails = thumbnails.uris
    return content


def grid_titles(
    worst: np.ndarray | None, drawn: np.ndarray, seed: int
) -> list[tuple[str, np.ndarray]]:
    """(title, positions) of the query grids: the worst queries (when known), random ones."""
    titled = [(f"The {len(worst)} worst queries (lowest AP@R)", worst)] if worst is not None else []
    return [*titled, (f"{len(drawn)} random queries (seed {seed})", drawn)]


def _note_summary(content: ReportContent, results: numbers.QueryResults) -> None:
    """The report's own means: the metrics table when the caller has none, else a caption."""
    means = results.summary
    if content.metrics is None:
        keys = result_keys(numbers.REPORTED, recall_at=(1,))
        content.metrics = MetricsTable(
            keys, [("this report's search", means)], f"over {means['num_queries']:,} queries"
        )
        return
    content.metrics.note = (
        f"{content.metrics.note} Recomputed by this report over {means['num_queries']:,} "
        f"queries: Recall@1 {means['recall@1']:.4f}, MAP@R {means['map@r']:.4f}."
    ).strip()


def _add_verification(
    content: ReportContent,
    x: np.ndarray,
    y: np.ndarray,
    query_rows: np.ndarray | None,
    gallery_rows: np.ndarray | None,
) -> None:
    """The verification section over all pairs of the set (x (N, d), y (N,)), as the evaluation
    counts them: the unordered pairs i < j, or every (query, gallery) pair with roles; a note
    instead when the set lacks positive or negative pairs."""
    if query_rows is None or gallery_rows is None:
        counts = pair_score_counts(x, y)
    else:
        q, g = query_rows, gallery_rows
        counts = pair_score_counts(x[q], y[q], x[g], y[g])
    if counts.num_positive and counts.num_negative:
        content.verification = numbers.verification(counts)
    else:
        content.notes.append(
            f"No verification section: the set has {counts.num_positive:,} positive and "
            f"{counts.num_negative:,} negative pairs, and the ROC needs both."
        )


def write_report(content: ReportContent, out: str | os.PathLike) -> Path:
    """Render ``content`` and write it to ``out`` (through a temporary file, then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_html(content), encoding="utf-8")
    tmp.replace(out)
    return out


def build_report(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    load_image: Callable[[int], Any],
    out: str | os.PathLike,
    **kwargs: Any,
) -> Path:
    """:func:`gather_report` then :func:`write_report`; the page says how long it took."""
    start = time.perf_counter()
    content = gather_report(embeddings, labels, load_image, **kwargs)
    content.facts.append(("built in", f"{time.perf_counter() - start:.1f} s"))
    return write_report(content, out)
