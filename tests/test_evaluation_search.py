"""The search entry point and what evaluate() asks of it: the faiss tie rule on duplicates at
scale, a query set that is part of the gallery (``self_index``), lists only as long as the
metrics need, and the doctests of the metric functions."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deepmetric.evaluation.blocks as blocks_module
import deepmetric.evaluation.faiss_index as faiss_index_module
import deepmetric.evaluation.metrics as metrics_module
import deepmetric.evaluation.open_set as open_set_module
import deepmetric.evaluation.registry as registry_module
import deepmetric.evaluation.retrieval as retrieval_module
import deepmetric.evaluation.topk as topk_module
from deepmetric.evaluation import FaissSearcher, evaluate, knn, search
from evaluation_reference import (
    KS,
    assert_metrics_equal,
    clustered,
    evaluate_budgets,
    pml_calculator,
    quantised,
    ref_knn,
    ref_metrics,
    with_duplicates,
)

ALL_RETRIEVAL = ("recall", "precision_at_1", "map_at_r", "r_precision")


@pytest.mark.parametrize(
    "module",
    [metrics_module, topk_module, blocks_module, registry_module, open_set_module],
    ids=["metrics", "topk", "blocks", "registry", "open_set"],
)
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0


# ------------------------------------------------------------------------------------------
# faiss: exact duplicates ordered by index, as the torch backend orders them


def triplicated(num: int = 1500, dim: int = 64, seed: int = 0):
    """``num`` random unit vectors, each present 3 times (rows i, i + num, i + 2 num), with
    random labels over 100 classes."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    return np.concatenate([base, base, base]), rng.integers(0, 100, 3 * num)


def test_faiss_equals_torch_on_duplicates_at_scale():
    # 4,500 queries in one faiss call: IndexFlatIP scores copies of a vector an ulp apart, so
    # ordering by its scores put copies out of index order (Recall@1 0.012667 vs 0.012 here)
    x, labels = triplicated()
    kwargs = {"recall_at": (1, 2, 4, 8, 16, 32), "metrics": ALL_RETRIEVAL, "per_class": True}
    torch_metrics = evaluate(x, labels, backend="torch", **kwargs)
    faiss_metrics = evaluate(x, labels, backend="faiss", **kwargs)
    torch_classes = torch_metrics.pop("per_class")
    faiss_classes = faiss_metrics.pop("per_class")
    assert faiss_metrics == torch_metrics
    for key, value in torch_classes.items():
        assert torch.equal(faiss_classes[key], value), key
    for k in (2, 7, 40):
        tv, ti = knn(x, None, k, exclude_self=True, backend="torch")
        fv, fi = knn(x, None, k, exclude_self=True, backend="faiss")
        assert torch.equal(fi, ti)
        torch.testing.assert_close(fv, tv, rtol=0, atol=1e-6)  # rounding may differ
        for values, indices in ((tv, ti), (fv, fi)):  # the copies tie, in index order
            tied = values[:, 1:] == values[:, :-1]
            assert tied.double().mean() > 0.6
            assert (indices[:, 1:][tied] > indices[:, :-1][tied]).all()


def test_faiss_searches_again_when_the_cut_is_not_separated(monkeypatch):
    # no spare candidates: the k-th item's copies straddle faiss's cut (k = 3: two copies of
    # the query, then the first copy of the next vector), faiss returns the copy it scored
    # highest, and only the margin check (search again, longer) finds the lowest-index copy
    monkeypatch.setattr(faiss_index_module, "EXTRA_CANDIDATES", 0)
    x, _ = triplicated(num=1000, dim=32, seed=3)
    searcher = FaissSearcher(torch.from_numpy(x))
    calls = []
    real = searcher.index.search
    monkeypatch.setattr(searcher.index, "search", lambda q, n: calls.append(n) or real(q, n))
    own = torch.arange(len(x))
    for k in (3, 4, 7):
        calls.clear()
        _, fi = searcher.search(torch.from_numpy(x), k, own)
        _, ti = knn(x, x, k, self_index=own)
        assert torch.equal(fi, ti)
        assert len(calls) > 1  # some rows were searched again
        searcher.exact = False  # the same search without the check goes wrong
        _, unchecked = searcher.search(torch.from_numpy(x), k, own)
        searcher.exact = True
        assert (unchecked != ti).any(dim=1).double().mean() > 0.3
    # quantised data: whole runs of exactly equal scores across the cut
    q = with_duplicates(quantised(400, 6, seed=4, levels=1), seed=5)
    searcher = FaissSearcher(torch.from_numpy(q))
    for k in (1, 3, 9):
        _, fi = searcher.search(torch.from_numpy(q), k)
        np.testing.assert_array_equal(fi.numpy(), ref_knn(q, q, k, False)[1])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_copies_tie_in_narrow_products(backend):
    # MKL multiplies products with a few gallery columns by kernels that can score two copies
    # of one vector differently by their column (15 of these 60 cases before the padding)
    gen = torch.Generator().manual_seed(0)
    for dim in (64, 512):
        for size in (3, 5, 10, 20, 40):
            for num_query in (1, 3, 8, 64):
                base = F.normalize(torch.randn(size, dim, generator=gen), dim=1)
                query = F.normalize(torch.randn(num_query, dim, generator=gen), dim=1)
                values, indices = knn(query, torch.cat([base, base]), 2 * size, backend=backend)
                assert torch.equal(values[:, 0::2], values[:, 1::2])  # each pair of copies ties
                assert torch.equal(indices[:, 1::2], indices[:, 0::2] + size)  # in index order
    x = torch.cat([base, base])  # the set against itself, one narrow block
    values, indices = knn(x, None, 2 * size - 1, exclude_self=True, backend=backend)
    assert torch.equal(indices[:, 0], (torch.arange(2 * size) + size) % (2 * size))


# ------------------------------------------------------------------------------------------
# a query set that is part of the gallery: self_index


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_self_index_of_the_whole_set_equals_the_query_set_search(backend):
    rng = np.random.default_rng(40)
    x = with_duplicates(quantised(300, 6, seed=41, levels=2), seed=42)
    labels = rng.integers(0, 50, 300)
    labels[:8] = 500 + np.arange(8)  # singletons: no positive once their own copy is excluded
    kwargs = {"recall_at": KS, "metrics": ALL_RETRIEVAL, "backend": backend, "per_class": True}
    alone = evaluate(x, labels, **kwargs)
    within = evaluate(x, labels, x, labels, self_index=torch.arange(300), **kwargs)
    per_class_alone, per_class_within = alone.pop("per_class"), within.pop("per_class")
    assert within == alone
    for key, value in per_class_alone.items():
        assert torch.equal(per_class_within[key], value), key
    assert_metrics_equal(within, ref_metrics(x, labels))
    assert within["num_queries_without_positive"] >= 8
    # without self_index each query's own copy is a gallery item like any other
    kept = evaluate(x, labels, x, labels, **kwargs)
    assert kept["num_queries_without_positive"] == 0
    # continuous data: the symmetric self-search and the query x gallery search agree
    y, y_labels = clustered(1000, 40, 32, seed=50, noise=1.0)
    kwargs.pop("per_class")
    alone = evaluate(y, y_labels, **kwargs)
    assert evaluate(y, y_labels, y, y_labels, self_index=np.arange(1000), **kwargs) == alone
    assert_metrics_equal(kept, ref_metrics(x, labels, x, labels, self_index=-np.ones(300, int)))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_self_index_query_subset_of_a_larger_gallery_with_missing_entries(backend):
    rng = np.random.default_rng(43)
    g = with_duplicates(quantised(260, 6, seed=44, levels=2), seed=45)
    gl = rng.integers(0, 40, 260)
    sub = rng.permutation(260)[:110]
    q, ql = g[sub], gl[sub]
    own = sub.copy()
    own[::4] = -1  # these queries keep their copy in the gallery: it counts as a positive
    ref = ref_metrics(q, ql, g, gl, self_index=own)
    for budget in evaluate_budgets(ql, gl):
        ours = evaluate(q, ql, g, gl, recall_at=KS, metrics=ALL_RETRIEVAL, self_index=own,
                        backend=backend, memory_budget_bytes=budget)  # fmt: skip
        assert_metrics_equal(ours, ref)
    # R_i does not count the excluded own item: a query whose class has one other member
    found = search(q, g, 1, self_index=own, query_labels=ql, gallery_labels=gl)
    same = (gl[None, :] == ql[:, None]).sum(1) - (own >= 0)
    np.testing.assert_array_equal(found.num_relevant.numpy(), same)
    for k in (1, 6, 30):
        _, i = knn(q, g, k, self_index=own, backend=backend)
        np.testing.assert_array_equal(i.numpy(), ref_knn(q, g, k, False, self_index=own)[1])
        assert not (i == torch.from_numpy(own)[:, None]).any()


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_self_index_mixed_entries_keep_whole_lists(backend):
    """A query without an own copy can retrieve all G items: its MAP@R list is not cut to
    G - 1 because other queries exclude theirs (one class: every metric is 1)."""
    x = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.zeros(6, dtype=torch.long)
    own = torch.tensor([-1, 1, 2, 3, 4, 5])
    ours = evaluate(
        x,
        labels,
        x,
        labels,
        recall_at=(1, 2),
        metrics=ALL_RETRIEVAL,
        self_index=own,
        backend=backend,
    )
    assert ours["map@r"] == ours["r_precision"] == ours["recall@1"] == 1.0
    rng = np.random.default_rng(47)
    g, gl = quantised(90, 5, seed=48, levels=2), rng.integers(0, 3, 90)
    own = np.where(rng.random(90) < 0.5, np.arange(90), -1)
    ours = evaluate(
        g, gl, g, gl, recall_at=KS, metrics=ALL_RETRIEVAL, self_index=own, backend=backend
    )
    assert_metrics_equal(ours, ref_metrics(g, gl, g, gl, self_index=own))


def test_self_index_matches_pml_ref_includes_query():
    calc = pml_calculator()
    x, labels = clustered(700, 35, 32, seed=46, noise=1.2)
    q, ql = torch.from_numpy(x[:250]), torch.from_numpy(labels[:250])
    theirs = calc.get_accuracy(q, ql, torch.from_numpy(x), torch.from_numpy(labels), True)
    ours = evaluate(x[:250], labels[:250], x, labels, recall_at=(1,), metrics=ALL_RETRIEVAL,
                    self_index=np.arange(250))  # fmt: skip
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


def test_self_index_errors():
    x = np.eye(5, dtype=np.float32)
    labels = np.arange(5) % 2
    with pytest.raises(ValueError, match="needs a gallery"):
        evaluate(x, labels, self_index=np.arange(5))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        evaluate(x, labels, x, labels, self_index=np.arange(4))
    with pytest.raises(ValueError, match=r"self_index\[2\] = 7"):
        evaluate(x, labels, x, labels, self_index=np.array([0, 1, 7, 3, 4]))
    with pytest.raises(ValueError, match="integers"):
        knn(x, x, 1, self_index=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="not both"):
        knn(x, x, 1, exclude_self=True, self_index=np.arange(5))
    with pytest.raises(ValueError, match="k must be"):
        knn(x, x, 5, self_index=np.array([-1, -1, 2, -1, -1]))  # one own item: 4 available
    bad = x.copy()
    bad[3, 0] = -np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate(x, labels, bad, labels, self_index=np.arange(5))


# ------------------------------------------------------------------------------------------
# lists only as long as the metrics need


@pytest.fixture
def searches(monkeypatch):
    """The Neighbours of every search() that evaluate() runs."""
    found = []
    real = retrieval_module.search

    def spy(*args, **kwargs):
        found.append(real(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(retrieval_module, "search", spy)
    return found


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_list_length_follows_the_metrics(searches, backend):
    x = with_duplicates(quantised(240, 5, seed=47, levels=2), seed=48)
    labels = np.repeat(np.arange(30), 8)  # R = 7 for every query
    ref = ref_metrics(x, labels, ks=(1, 20))
    cases = [  # metrics, recall_at -> list length, rank limit
        (("recall",), (1,), 1, 1),
        (("precision_at_1",), (5,), 1, 1),
        (("recall",), (1, 20), 7, 20),  # R_max < max K: ranks beyond 7 counted or extended
        (("map_at_r",), (1,), 7, 0),
        (("recall", "r_precision"), (1, 20), 7, 20),
        (("nmi",), (1,), None, None),
    ]
    for metrics, recall_at, length, rank_limit in cases:
        searches.clear()
        out = evaluate(x, labels, recall_at=recall_at, metrics=metrics, backend=backend)
        if length is None:
            assert searches == [] and set(out) == {"nmi"}
            continue
        (found,) = searches
        assert found.indices.shape == (240, length) and found.rank_limit == rank_limit
        assert (found.first_positive is None) == (rank_limit == 0)
        for key in ("recall@1", "recall@20", "map@r", "r_precision"):
            if key in out:
                assert out[key] == pytest.approx(ref[key], abs=1e-12), (metrics, key)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_classes", [1, 2, 10])
def test_identical_points_recall_at_1_searches_one_neighbour(searches, num_classes):
    # PML's 10,000 identical points: every score ties, so the tie rule alone ranks the
    # gallery by index; for Recall@1 only the first item (0, or 1 for query 0) matters
    labels = np.random.default_rng(num_classes).integers(0, num_classes, 10_000)
    x = np.full((10_000, 8), 8**-0.5, np.float32)
    out = evaluate(x, labels, metrics=("recall",), recall_at=(1,))
    (found,) = searches
    assert found.indices.shape == (10_000, 1)
    first = np.where(np.arange(10_000) == 0, 1, 0)
    hit = labels[first] == labels
    has_positive = np.bincount(labels)[labels] > 1
    assert out["recall@1"] == pytest.approx(hit[has_positive].mean(), abs=1e-12)
    np.testing.assert_array_equal(found.indices[:, 0].numpy(), first)


def test_identical_points_every_metric_matches_the_reference():
    labels = np.random.default_rng(49).integers(0, 3, 1500)
    x = np.full((1500, 4), 0.5, np.float32)
    ours = evaluate(x, labels, recall_at=KS, metrics=ALL_RETRIEVAL)
    assert_metrics_equal(ours, ref_metrics(x, labels))
    one_class = evaluate(x, np.zeros(1500, np.int64), recall_at=KS, metrics=ALL_RETRIEVAL)
    assert one_class["recall@1"] == one_class["map@r"] == one_class["r_precision"] == 1.0
