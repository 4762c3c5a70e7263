"""Decisions instead of rankings: a score threshold calibrated on labelled pairs, and the
open-set evaluation of the "match" / "no match" answers it gives.

A query *matches* when its best gallery score is >= the threshold. :func:`calibrate_threshold`
chooses the threshold over every pair i < j of a labelled calibration set (validation classes,
never the test classes) for a target FAR (share of the negative pairs accepted; the lowest
threshold whose FAR <= the target) or a target precision (the lowest threshold whose
TP / (TP + FP) >= the target), from the exact pair counts of :mod:`.verification`.

:func:`open_set_metrics` removes a seeded share of an evaluation set's classes from its gallery
(:func:`held_out_classes`), so that their queries have nothing to match, and reports at the
threshold:

- ``open_set/precision``: of the queries answered "match", the share that have a match (an item
  of their class in the gallery, their own copy excluded);
- ``open_set/recall``: of the queries that have a match, the share answered "match";
- ``open_set/no_match_recall``: of the queries without a match, the share answered "no match";
- ``open_set/recall@K``: Recall@K of the queries that have a match, in the reduced gallery;
- ``open_set/threshold``, ``open_set/queries_with_match``, ``open_set/queries_without_match``.

>>> emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
>>> r = open_set_metrics(emb, [0, 0, 1, 1], 0.7, held_out=[1], recall_at=(1,))
>>> round(r["open_set/precision"], 4), r["open_set/recall"], r["open_set/no_match_recall"]
(0.6667, 1.0, 0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checks import as_embeddings, as_labels
from .neighbours import knn
from .retrieval import evaluate
from .verification import float_of_key, pair_score_counts

__all__ = ["calibrate_threshold", "held_out_classes", "open_set_metrics"]

PREFIX = "open_set/"


def calibrate_threshold(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | Sequence[int],
    *,
    far: float | None = None,
    precision: float | None = None,
    memory_budget_bytes: int = 2**30,
) -> dict[str, Any]:
    """The score threshold at a target ``far`` or ``precision`` over every pair i < j of a
    labelled set: embeddings (N, d) (L2-normalised: cosine scores), integer labels (N,).

    Returns ``{"value", "target": {"far": f} | {"precision": p}, "achieved": {"far", "tar"}
    | {"precision", "recall"}, "pairs": {"positive", "negative"}}`` (achieved: the exact
    rates of the pairs at ``score >= value``).

    Raises:
        ValueError: both targets or neither; fewer than 2 classes; a FAR target that the
            set's negative pairs cannot resolve (far x negatives < 1), or no threshold
            reaching the target.
    """
    if (far is None) == (precision is None):
        raise ValueError("give one target: far or precision")
    labels = as_labels(labels, len(embeddings), "labels", torch.device("cpu"))
    num_classes = int(torch.unique(labels).numel())
    if num_classes < 2:
        raise ValueError(f"calibration needs images of at least 2 classes, got {num_classes}")
    counts = pair_score_counts(
        embeddings,
        labels,
        fars=() if far is None else (far,),
        resolve_all=True,  # every distinct score: the achieved rates are exact
        memory_budget_bytes=memory_budget_bytes,
    )
    if far is not None:
        value = counts.threshold_at_far(far)
    else:
        value = counts.threshold_at_precision(precision)
    if not np.isfinite(value):
        raise ValueError(f"no score threshold reaches a FAR of {far:g} (the top scores tie)")
    accepted = float_of_key(counts.keys) >= value
    tp, fp = int(counts.positive[accepted].sum()), int(counts.negative[accepted].sum())
    num_pos, num_neg = counts.num_positive, counts.num_negative
    if far is not None:
        target, achieved = {"far": far}, {"far": fp / num_neg, "tar": tp / num_pos}
    else:
        target, achieved = {"precision": precision}, {"precision": tp / (tp + fp)}
        achieved["recall"] = tp / num_pos
    return {
        "value": float(value),
        "target": target,
        "achieved": achieved,
        "pairs": {"positive": num_pos, "negative": num_neg},
    }


def held_out_classes(classes: Sequence[int] | np.ndarray, fraction: float, seed: int) -> list[int]:
    """round(``fraction`` x C) of the C ``classes`` (at least 1, at most C - 1), drawn with
    ``seed``: the classes an open-set evaluation removes from the gallery, sorted.

    >>> held_out_classes([3, 5, 7, 9], 0.5, seed=0)
    [7, 9]
    """
    classes = np.unique(np.asarray(classes))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out share of the classes must lie in (0, 1), got {fraction}")
    if len(classes) < 2:
        raise ValueError(f"open-set evaluation needs at least 2 classes, got {len(classes)}")
    count = min(max(1, round(fraction * len(classes))), len(classes) - 1)
    chosen = np.random.default_rng(seed).choice(len(classes), count, replace=False)
    return sorted(classes[chosen].tolist())


def open_set_metrics(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | Sequence[int],
    threshold: float,
    *,
    held_out: Sequence[int],
    recall_at: Sequence[int] = (1, 2, 4, 8),
    query: Tensor | None = None,
    gallery: Tensor | None = None,
    memory_budget_bytes: int = 2**30,
) -> dict[str, float | int]:
    """Open-set metrics (module docstring) of an evaluation set whose classes ``held_out``
    are removed from the gallery.

    Args:
        embeddings: (N, d); labels: (N,) integers.
        threshold: a query matches when its best gallery score is >= this.
        held_out: the labels whose items leave the gallery (:func:`held_out_classes`).
        query, gallery: (N,) bool masks (In-Shop style); None: every item is a query and a
            gallery item, its own copy never retrieved.

    Returns:
        ``open_set/...`` keys: floats (NaN where nothing is counted), counts as ints.
    """
    emb = as_embeddings(embeddings, "embeddings")
    labels = as_labels(labels, emb.shape[0], "labels", emb.device)
    every = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    is_query = every if query is None else query.to(emb.device).bool()
    in_gallery = every if gallery is None else gallery.to(emb.device).bool()
    held = torch.as_tensor(list(held_out), dtype=labels.dtype, device=labels.device)
    in_gallery = in_gallery & ~torch.isin(labels, held)
    q_rows, g_rows = torch.nonzero(is_query)[:, 0], torch.nonzero(in_gallery)[:, 0]
    if g_rows.numel() < 2:
        raise ValueError(f"open-set evaluation: {g_rows.numel()} gallery item(s) left")
    q_labels, g_labels = labels[q_rows], labels[g_rows]
    # own copy: the gallery position of each query's item (no masks), else none
    own = torch.full((emb.shape[0],), -1, dtype=torch.int64, device=emb.device)
    if query is None and gallery is None:
        own[g_rows] = torch.arange(g_rows.numel(), device=emb.device)
    own = own[q_rows]

    best, _ = knn(
        emb[q_rows], emb[g_rows], 1, self_index=own, memory_budget_bytes=memory_budget_bytes
    )
    answered = best[:, 0].double() >= threshold  # (Q,) "match"
    classes, size = torch.unique(g_labels, return_counts=True)
    at = torch.searchsorted(classes, q_labels).clamp(max=classes.numel() - 1)
    relevant = torch.where(classes[at] == q_labels, size[at], 0) - (own >= 0).long()
    has_match = relevant > 0  # (Q,)

    result: dict[str, float | int] = {
        PREFIX + "threshold": float(threshold),
        PREFIX + "precision": _share(answered & has_match, answered),
        PREFIX + "recall": _share(answered & has_match, has_match),
        PREFIX + "no_match_recall": _share(~answered & ~has_match, ~has_match),
        PREFIX + "queries_with_match": int(has_match.sum()),
        PREFIX + "queries_without_match": int((~has_match).sum()),
    }
    if bool(has_match.any()):
        ranked = evaluate(
            emb[q_rows][has_match],
            q_labels[has_match],
            emb[g_rows],
            g_labels,
            recall_at=recall_at,
            metrics=("recall",),
            self_index=own[has_match],
            memory_budget_bytes=memory_budget_bytes,
        )
        result.update({PREFIX + f"recall@{k}": ranked[f"recall@{k}"] for k in recall_at})
    else:
        result.update({PREFIX + f"recall@{k}": float("nan") for k in recall_at})
    return result


def _share(hits: Tensor, of: Tensor) -> float:
    """hits.sum() / of.sum() of two (Q,) bool masks; NaN when ``of`` is empty."""
    return float(hits.sum() / of.sum()) if bool(of.any()) else float("nan")
