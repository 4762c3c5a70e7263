"""An index's report: query images searched in a gallery index (:mod:`deepmetric.retrieval`),
shown as query grids only. Frames are green / red where both the query's label (its class
folder, as :func:`~deepmetric.retrieval.read_gallery` reads it) and the gallery item's are
known, grey otherwise; with labels, the worst queries (lowest AP@R) come first.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from deepmetric.data import open_image
from deepmetric.evaluation import map_at_r
from deepmetric.retrieval import Retriever, read_gallery

from .build import grid_titles, write_report
from .content import Grid, GridRow, ReportContent, ReportOptions
from .thumbnails import Thumbnails

__all__ = ["report_index"]

#: Longest list searched to compute AP@R (a query whose class has more gallery items than this
#: gets the AP@R of its first MAX_LIST items).
MAX_LIST = 1000


def report_index(
    index: str | os.PathLike,
    images: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    options: ReportOptions | None = None,
    progress: bool = True,
) -> Path:
    """Write the report of the query images ``images`` (a folder, list file or CSV) searched in
    the index folder ``index`` with the model recorded in it (or ``checkpoint``, which must
    match). Default ``out``: ``INDEX-report.html`` beside the index folder."""
    options = options or ReportOptions()
    start = time.perf_counter()
    retriever = Retriever.load(index)
    retriever.use_checkpoint(checkpoint, overrides)
    paths, query_labels = read_gallery(images)
    gallery_count = Counter(label for label in retriever.items.labels if label is not None)
    labelled = bool(gallery_count) and all(label is not None for label in query_labels)
    relevant = np.array([gallery_count.get(label, 0) for label in query_labels])
    length = min(len(retriever.items), max(options.k, min(int(relevant.max()), MAX_LIST)))
    found = retriever.search(paths, length if labelled else options.k, progress=progress)

    gallery = f"{len(retriever.items):,} items, {sum(gallery_count.values()):,} labelled"
    content = ReportContent(
        title=f"deepmetric report: index {Path(index).name}",
        facts=[
            ("index", str(index)),
            ("gallery", gallery),
            ("queries", f"{len(paths):,} images from {images}"),
            ("model", str(retriever.manifest["fingerprint"].get("checkpoint", "?"))),
        ],
    )
    ap, worst = None, None
    if labelled:
        # (Q, L) rel(i); an approximate index may return shorter lists: padded with False
        same = np.zeros((len(paths), max(map(len, found.labels))), dtype=bool)
        for q, row in enumerate(found.labels):
            same[q, : len(row)] = [label == query_labels[q] for label in row]
        ap = map_at_r(torch.from_numpy(same), torch.as_tensor(relevant)).numpy()
        valid = np.flatnonzero(relevant > 0)
        worst = valid[np.lexsort((valid, same[valid, 0], ap[valid]))][: options.queries]
        if int(relevant.max()) > MAX_LIST:
            content.notes.append(
                f"AP@R of queries with more than {MAX_LIST} gallery items of their class is "
                f"computed on their first {MAX_LIST} results."
            )
    rng = np.random.default_rng(options.seed)
    drawn = np.sort(rng.choice(len(paths), size=min(options.queries, len(paths)), replace=False))
    picks = grid_titles(worst, drawn, options.seed)
    if not labelled:
        content.notes.append(
            "Frames are grey: the queries' labels (class folders) or the gallery's labels are "
            "unknown, so no result can be called right or wrong."
        )

    for title, rows in picks:
        grid_rows = []
        for q in rows:
            k = min(options.k, len(found.paths[q]))
            labels = found.labels[q][:k]
            grid_rows.append(
                GridRow(
                    query=paths[q],
                    query_label=query_labels[q],
                    ap=None if ap is None else float(ap[q]),
                    items=found.paths[q][:k],
                    labels=labels,
                    scores=found.scores[q][:k],
                    correct=[
                        None
                        if label is None or query_labels[q] is None
                        else label == query_labels[q]
                        for label in labels
                    ],
                )
            )
        content.grids.append(Grid(title, grid_rows))

    thumbnails = Thumbnails(open_image, options.thumbnail, options.max_thumbnail_bytes)
    for g in content.grids:
        thumbnails.add(key for row in g.rows for key in [row.query, *row.items])
    content.thumbnails = thumbnails.uris
    content.facts.append(("built in", f"{time.perf_counter() - start:.1f} s"))
    if out is None:
        out = Path(index).with_name(Path(index).name + "-report.html")
    return write_report(content, out)
