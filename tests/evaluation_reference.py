"""Brute-force references and test data of the evaluation tests (full float64 matrices, loops).

Tie-heavy data uses quantised embeddings (multiples of 1/4, small d): their float32 dot
products are exact, so float32 chunked search and the float64 reference see the same ties.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from deepmetric.evaluation.blocks import LIST_BYTES, SCORE_BYTES, plan_chunks

KS = (1, 2, 3, 5, 10, 50)


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (it is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# references


def ref_order(scores_row: np.ndarray, skip: int | None) -> np.ndarray:
    """Gallery indices by score descending, then index ascending; ``skip`` removed."""
    order = np.lexsort((np.arange(scores_row.size), -scores_row))
    return order if skip is None else order[order != skip]


def ref_knn(q: np.ndarray, g: np.ndarray, k: int, exclude_self: bool, self_index=None):
    """Top-k by float64 scores and the tie rule; query i's own item is gallery i with
    ``exclude_self``, ``self_index[i]`` otherwise (-1: none)."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        self_index = np.arange(len(q))
    skips = [None if self_index is None or self_index[i] < 0 else int(self_index[i])
             for i in range(len(q))]  # fmt: skip
    idx = np.stack([ref_order(s[i], skips[i])[:k] for i in range(len(q))])
    return np.take_along_axis(s, idx, 1), idx


def ref_metrics(q, ql, g=None, gl=None, ks=KS, self_index=None) -> dict:
    """Metrics by loops over full float64 score rows; ``self_index`` (Q,) removes each query's
    own gallery item (-1: none), as gallery None does for the query set."""
    if g is None:
        g, gl, self_index = q, ql, np.arange(len(q))
    s = q.astype(np.float64) @ g.astype(np.float64).T
    out = {f"recall@{k}": [] for k in ks}
    out.update({"map@r": [], "r_precision": [], "label": []})
    missing = 0
    for i in range(len(q)):
        skip = None if self_index is None or self_index[i] < 0 else int(self_index[i])
        order = ref_order(s[i], skip)
        rel = gl[order] == ql[i]
        r = int(rel.sum())
        if r == 0:
            missing += 1
            continue
        first = int(np.argmax(rel))
        for k in ks:
            out[f"recall@{k}"].append(first < k)
        top = rel[:r]
        precision = np.cumsum(top) / np.arange(1, r + 1)
        out["map@r"].append(float((precision * top).sum() / r))
        out["r_precision"].append(float(top.sum() / r))
        out["label"].append(ql[i])
    labels = np.array(out.pop("label"))
    per_query = {key: np.array(v, dtype=np.float64) for key, v in out.items()}
    result = {key: float(v.mean()) for key, v in per_query.items()}
    result["num_queries_without_positive"] = missing
    result["per_class"] = {
        int(c): {key: float(per_query[key][labels == c].mean()) for key in per_query}
        for c in np.unique(labels)
    }
    return result


# ------------------------------------------------------------------------------------------
# data


def quantised(n: int, d: int, seed: int, levels: int = 3) -> np.ndarray:
    """Values in {-levels..levels}/4: exact float32 products, many equal scores."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-levels, levels + 1, size=(n, d)) / 4).astype(np.float32)


def clustered(n: int, num_classes: int, d: int, seed: int, noise: float = 0.6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    centers = rng.standard_normal((num_classes, d))
    x = centers[labels] + noise * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def with_duplicates(x: np.ndarray, seed: int) -> np.ndarray:
    """Copy some rows onto others (exact duplicates: equal scores, as in SOP/In-Shop)."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    src = rng.integers(0, len(x), len(x) // 5)
    dst = rng.integers(0, len(x), len(x) // 5)
    x[dst] = x[src]
    return x


def budgets(num_query: int, num_gallery: int, list_size: int) -> tuple[int, int, int]:
    """Budgets giving: one chunk; query chunks only; query chunks and gallery blocks."""
    list_row = 2 * LIST_BYTES * (list_size + 1)
    query_chunked = 16 * (SCORE_BYTES * num_gallery + list_row)
    gallery_chunked = 4 * (list_row + SCORE_BYTES * 7)
    plan = plan_chunks(num_query, num_gallery, list_size, query_chunked)
    assert plan[0] < num_query and plan[1] == num_gallery
    plan = plan_chunks(num_query, num_gallery, list_size, gallery_chunked)
    assert plan[1] < num_gallery
    return 2**30, query_chunked, gallery_chunked


def evaluate_budgets(ql, gl=None, ks=KS, rows=4) -> tuple[int, int, int]:
    """Budgets for evaluate(): one chunk; query chunks of whole gallery rows (counting);
    gallery blocks (lists). evaluate() gives the lists of a group of queries (LIST_BYTES per
    entry, k = R_max) at most half the budget and the search the rest: the second budget keeps
    one group (so the query set can still be searched against itself) and leaves the search
    room for 32 whole rows; the third leaves it room for ``rows`` rows' long lists only."""
    exclude_self = gl is None
    gl = ql if exclude_self else gl
    counts = np.array([(gl == y).sum() for y in ql])
    list_size = max(1, int(counts.max()) - exclude_self)
    lists = len(ql) * list_size * LIST_BYTES
    long_list = min(len(gl) - exclude_self, max(list_size, max(ks)))
    row = SCORE_BYTES * len(gl) + 2 * LIST_BYTES * (list_size + 1) + 4 * counts.max()
    query_chunked = lists + max(lists, 32 * row)
    search_part = rows * (2 * LIST_BYTES * (long_list + 1) + SCORE_BYTES * 40)
    gallery_chunked = search_part + min(lists, search_part)
    return 2**30, int(query_chunked), int(gallery_chunked)


def assert_metrics_equal(ours: dict, ref: dict, ks=KS) -> None:
    """evaluate()'s Recall@K, MAP@R, R-precision and count of queries without a positive equal
    the reference's."""
    for key in [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["num_queries_without_positive"] == ref["num_queries_without_positive"]


def pml_calculator():
    """PML's AccuracyCalculator for P@1, MAP@R and R-precision with k = the largest class
    (the test is skipped without pytorch-metric-learning)."""
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    return pml.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
    )
